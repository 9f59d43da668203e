"""Training settings (`expandr_haystack.training.config`): clear errors before any model loads."""

from pathlib import Path

import pytest

from expandr_haystack.training.config import (
    ConfigError,
    DPOSettings,
    ExpansionSettings,
    JointConfig,
    PairConfig,
    RetrieverSettings,
)

CONFIGS = Path(__file__).parents[2] / "training" / "configs"


@pytest.mark.parametrize("name", ["micro.yaml", "tiny-cpu.yaml", "small-cpu.yaml"])
def test_shipped_cpu_configs_validate(name):
    cfg = JointConfig.from_yaml(CONFIGS / name)
    assert cfg.rounds >= 1 and cfg.train_split != cfg.eval_split


@pytest.fixture(params=[(False, False), (True, False), (True, True)], ids=["no-cuda", "cuda-no-vllm", "cuda-vllm"])
def machine(request, monkeypatch):
    """This machine as (CUDA available, vLLM importable), whatever it really has."""
    import torch

    import expandr_haystack.generation.vllm as vllm_backend

    cuda, vllm = request.param
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    reason = None if cuda and vllm else ("the `vllm` package is not installed" if cuda else "no CUDA GPU is visible")
    monkeypatch.setattr(vllm_backend, "vllm_unavailable_reason", lambda: reason)
    return cuda, vllm


def test_paper_gpu_config_names_its_missing_data_on_any_machine(machine):
    # the data is checked before what the machine offers: the shipped config points at a folder nobody has here
    with pytest.raises(ConfigError, match=r"`data`: .*/data/beir/msmarco"):
        JointConfig.from_yaml(CONFIGS / "paper-gpu.yaml")


def test_paper_gpu_config_with_local_data_names_what_the_machine_lacks(machine):
    cuda, vllm = machine
    local = {"data": "cranfield", "eval_split": "test", "llm": None}
    if not cuda:
        with pytest.raises(ConfigError, match=r"`device` is 'cuda' but this machine has no CUDA GPU"):
            JointConfig.from_yaml(CONFIGS / "paper-gpu.yaml", local)
    elif not vllm:
        with pytest.raises(ConfigError, match=r"`llm_engine` is 'vllm' but the `vllm` package is not installed"):
            JointConfig.from_yaml(CONFIGS / "paper-gpu.yaml", local)
    else:
        cfg = JointConfig.from_yaml(CONFIGS / "paper-gpu.yaml", local)
        assert (cfg.device, cfg.llm_engine, cfg.dpo.gradient_checkpointing) == ("cuda", "vllm", True)


@pytest.mark.parametrize("raw,match", [
    ({"roundz": 2}, r"unknown key\(s\) \['roundz'\]"),
    ({"rounds": 0}, "`rounds` must be an integer >= 1"),
    ({"eval_split": "train"}, "eval_split"),
    ({"retriever": {"temperature": 0}}, r"retriever\.temperature"),
    ({"retriever": {"temprature": 0.02}}, "unknown key"),
    ({"retriever": {"batch_size": 1}}, "in-batch"),
    ({"pairs": {"n_candidates": 1}}, "n_candidates"),
    ({"pairs": {"temperatures": [0.8, -1]}}, r"temperatures\[1\]"),
    ({"dpo": {"beta": -1}}, "beta"),
    ({"dpo": {"lora_dropout": 1.0}}, r"`dpo\.lora_dropout` must be a number in \[0, 1\)"),
    ({"dpo": {"max_steps": 0}}, r"`dpo\.max_steps` must be -1"),
    ({"expansion": {"n_expansions": 0}}, r"`expansion\.n_expansions` must be an integer >= 1; got 0"),
    ({"expansion": {"mode": "hyde"}}, r"`expansion\.mode` must be one of 'q2d', 'grounded'; got 'hyde'"),
    ({"expansion": {"passages_k": 0}}, r"`expansion\.passages_k` must be an integer >= 1"),
    ({"expansion": {"passage_words": "many"}}, r"expansion: `passage_words` must be a number"),
    ({"validation_queries": -3}, r"`validation_queries` must be an integer >= 0; got -3"),
    ({"validation_queries": 1.5}, r"`validation_queries` must be an integer >= 0, a fraction in \(0, 1\)"),
    ({"validation_queries": "30"}, r"`validation_queries` must be an integer >= 0"),
    ({"eval_seeds": []}, r"`eval_seeds` must be a non-empty list"),
    ({"eval_seeds": 3}, r"`eval_seeds` must be a non-empty list"),
    ({"eval_seeds": [1, -2]}, r"`eval_seeds\[1\]` must be an integer >= 0; got -2"),
    ({"eval_seeds": [1, 1]}, r"`eval_seeds` must be distinct seeds"),
    ({"expansion": {"max_new_tokens": 0}}, r"`expansion\.max_new_tokens` must be an integer >= 1"),
    ({"retriever": {"hard_negative_skip": 30}}, r"retriever\.hard_negative_skip"),
    ({"retriever": {"query_weight": 1.5}}, r"`retriever\.query_weight` must be a number in \[0, 1\]"),
    ({"max_train_queries": 0}, "`max_train_queries` must be an integer >= 1"),
    ({"llm_engine": "magic"}, "`llm_engine` must be one of"),
    ({"llm_weight_precision": "int4"}, "`llm_weight_precision` must be one of"),
    ({"data": "/no/such/folder"}, "data"),
    ({"eval_methods": ["dense", "magic"]}, "eval_methods"),
    ({"eval_split": "validation"}, "validation"),
    ({"llm": "./no/such/llm"}, "llm"),
    ({"encoder": "~/no/such/encoder"}, "`encoder`: no model directory"),
    ({"retriever": {"restart_each_round": "yes"}}, "true or false"),
])
def test_bad_settings_are_named(raw, match):
    with pytest.raises(ConfigError, match=match):
        JointConfig.from_dict(raw)


def test_llm_weight_precision_reaches_the_expanders_sampler():
    assert JointConfig.from_dict({}).sampler().weight_precision == "auto"  # the behaviour before the key
    assert JointConfig.from_dict({"llm_weight_precision": "float32"}).sampler().weight_precision == "float32"


def test_new_keys_default_to_the_behaviour_before_them():
    cfg = JointConfig.from_dict({})
    assert cfg.validation_queries is None and cfg.validation_size is None and cfg.eval_seeds is None
    assert cfg.seeds == [cfg.seed] and cfg.expansion.mode == "q2d" and cfg.expansion.n_expansions == 1
    assert (cfg.expansion.passages_k, cfg.expansion.passage_words) == (3, 50) and cfg.expansion.method == "expand"
    assert JointConfig.from_dict({"validation_queries": 0}).validation_size is None


def test_new_keys_accept_their_values():
    cfg = JointConfig.from_dict({"validation_queries": 30, "eval_seeds": [1, 2, 3],
                                 "expansion": {"n_expansions": 4, "mode": "grounded", "passages_k": 5}})
    assert cfg.validation_size == 30 and cfg.seeds == [1, 2, 3] and cfg.expansion.method == "grounded"
    assert JointConfig.from_dict({"validation_queries": 0.2}).validation_size == 0.2


def test_a_validation_split_that_leaves_no_training_query_is_named(tmp_path):
    from expandr_haystack.training.rounds import JointTrainer

    trainer = JointTrainer(JointConfig.from_dict({"validation_queries": 150}), tmp_path, progress_bar=False)
    with pytest.raises(ConfigError, match=r"`validation_queries`: `size` must leave at least one query"):
        _ = trainer.train_data


def test_validation_queries_are_carved_before_max_train_queries(tmp_path):
    from expandr_haystack.evaluation.data import load_collection
    from expandr_haystack.training.rounds import JointTrainer

    cfg = JointConfig.from_dict({"validation_queries": 30, "max_train_queries": 40, "max_corpus_documents": 50})
    trainer = JointTrainer(cfg, tmp_path, progress_bar=False)
    train, validation = trainer.train_data, trainer.validation_data
    assert len(train.queries) == 40 and len(validation.queries) == 30
    assert not set(train.queries) & set(validation.queries)
    assert set(train.queries) | set(validation.queries) <= set(load_collection("cranfield", "train").queries)
    _, expected = load_collection("cranfield", "train").split_validation(30, seed=cfg.seed)
    assert set(validation.queries) == set(expected.queries)  # the whole train split's, seeded by `seed`
    judged = {d for col in (train, validation, trainer.eval_data) for j in col.qrels.values() for d in j}
    assert judged <= set(train.corpus) and train.corpus is validation.corpus is trainer.eval_data.corpus


@pytest.mark.parametrize("name", ["small-cpu.yaml", "tiny-cpu.yaml"])
def test_cpu_configs_have_the_issue_12_shape(name):
    cfg = JointConfig.from_yaml(CONFIGS / name)
    assert cfg.validation_queries and cfg.rounds == 2 and cfg.expansion.mode == "q2d"
    assert cfg.expansion.n_expansions == 4 and cfg.expansion.temperature == 0.7 and cfg.pairs.n_candidates == 8
    assert 1e-4 <= cfg.dpo.learning_rate <= 5e-4 and len(cfg.seeds) >= 2
    if name == "small-cpu.yaml":
        assert cfg.max_train_queries is None  # every train query that is not a validation query


def test_paper_config_keeps_the_paper_q2d_mode():
    import yaml

    raw = yaml.safe_load((CONFIGS / "paper-gpu.yaml").read_text())
    assert raw["expansion"].get("mode", "q2d") == "q2d" and raw["expansion"]["n_expansions"] == 1


def test_missing_config_file():
    with pytest.raises(ConfigError, match="--config"):
        JointConfig.from_yaml("/no/such.yaml")


def test_local_looking_model_path_that_does_not_exist_is_refused():
    # "org/name" is a hub id; with two or more slashes it can only be a local folder (checks.looks_like_local_path)
    with pytest.raises(ConfigError, match=r"`llm`: no model directory at 'org/sub/model'"):
        JointConfig.from_dict({"llm": "org/sub/model"})
    with pytest.raises(ConfigError, match=r"`encoder`: no model directory at 'org/sub/model'"):
        JointConfig.from_dict({"encoder": "org/sub/model"})


def test_messages_start_with_the_source_and_errors_are_value_errors():
    with pytest.raises(ValueError, match=r"^my.yaml: `retriever\.temperature` must be a number > 0; got 0"):
        JointConfig.from_dict({"retriever": {"temperature": 0}}, "my.yaml")
    assert issubclass(ConfigError, ValueError)


def test_every_settings_class_validates_in_one_style():
    assert PairConfig().validate() is None and DPOSettings().validate() is None
    assert RetrieverSettings().validate() is None and ExpansionSettings().validate() is None
    with pytest.raises(ConfigError, match=r"^`n_candidates` must be an integer >= 2; got 1\."):
        PairConfig(n_candidates=1)
    with pytest.raises(ConfigError, match=r"^`per_device_train_batch_size` must be an integer >= 1; got 0\."):
        DPOSettings(per_device_train_batch_size=0).validate()
    with pytest.raises(ConfigError, match=r"^`retriever\.batch_size` must be an integer >= 2; got 1\."):
        RetrieverSettings(batch_size=1).validate()
    config = PairConfig()
    config.top_p = 0.0
    with pytest.raises(ConfigError, match=r"^`pairs\.top_p` must be a number in \(0, 1\]; got 0\.0\."):
        config.validate("pairs")


def test_settings_have_one_definition_reexported():
    from expandr_haystack import training
    from expandr_haystack.training import dpo, pairs

    assert pairs.PairConfig is PairConfig is training.PairConfig
    assert dpo.DPOSettings is DPOSettings is training.DPOSettings


def test_config_module_imports_no_training_code():
    import ast

    from expandr_haystack.training import compat, config_checks
    from expandr_haystack.training import config as config_module

    settings_modules = {"expandr_haystack.training.config_checks", "expandr_haystack.training.compat",
                        "expandr_haystack.training.distributed"}
    for module in (config_module, config_checks, compat):  # config and the settings modules it reads with
        tree = ast.parse(Path(module.__file__).read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        training = {m for m in imported if m.startswith("expandr_haystack.training") or m in ("trl", "peft")}
        assert not training - settings_modules, module.__name__


def test_command_line_overrides_reach_nested_settings():
    from expandr_haystack.training.cli import parse_overrides

    overrides = parse_overrides(["expansion.mode=grounded", "dpo.learning_rate=1e-4", "eval_seeds=[1, 2, 3]"])
    assert overrides == {"expansion.mode": "grounded", "dpo.learning_rate": 1e-4, "eval_seeds": [1, 2, 3]}
    config = JointConfig.from_yaml(Path("training/configs/tiny-cpu.yaml"), {**overrides, "rounds": None})
    assert (config.expansion.mode, config.dpo.learning_rate, config.eval_seeds) == ("grounded", 1e-4, [1, 2, 3])
    assert config.expansion.n_expansions == 4 and config.rounds == 2  # the rest of the file is kept


@pytest.mark.parametrize("item, match", [("expansion.mode", "KEY=VALUE"), ("=3", "KEY=VALUE")])
def test_malformed_overrides_are_named(item, match):
    from expandr_haystack.training.cli import parse_overrides

    with pytest.raises(ConfigError, match=match):
        parse_overrides([item])


def test_an_override_of_an_unknown_setting_is_refused_like_the_file_would_be():
    with pytest.raises(ConfigError, match="expansion"):
        JointConfig.from_yaml(Path("training/configs/tiny-cpu.yaml"), {"expansion.no_such_key": 1})


# -- trackers and logging of both trainers (issue #13 part 5) ---------------------------------------------------------
def test_report_to_and_logging_steps_default_to_the_behaviour_before_them():
    cfg = JointConfig.from_dict({})
    assert (cfg.dpo.report_to, cfg.dpo.logging_steps) == ("none", 10)
    assert (cfg.retriever.report_to, cfg.retriever.logging_steps) == ("none", 10)  # the trainer's old fixed values


@pytest.mark.parametrize("section", ["dpo", "retriever"])
def test_report_to_and_logging_steps_are_validated(section, monkeypatch):
    from expandr_haystack.training import config_checks

    monkeypatch.setattr(config_checks, "missing_tracker", lambda value: None)  # every tracker "installed"
    for value in ("tensorboard", "wandb", "all", "none", ["tensorboard", "wandb"]):
        assert getattr(JointConfig.from_dict({section: {"report_to": value}}), section).report_to == value
    for value, match in [("tensorbord", f"`{section}.report_to`"), ([], f"`{section}.report_to`"),
                         (["none", "wandb"], "a list of them"), (3, f"`{section}.report_to`")]:
        with pytest.raises(ConfigError, match=match):
            JointConfig.from_dict({section: {"report_to": value}})
    with pytest.raises(ConfigError, match=f"`{section}.logging_steps`"):
        JointConfig.from_dict({section: {"logging_steps": 0}})


def test_a_tracker_that_is_not_installed_is_named_before_any_model_loads(monkeypatch):
    import importlib.util

    from expandr_haystack.training.compat import missing_tracker

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("wandb", "tensorboard", "tensorboardX") else real(name, *a))
    assert missing_tracker("none") is None and missing_tracker("all") is None
    assert missing_tracker(["wandb"]) == "wandb" and missing_tracker("kubeflow") is None  # unknown package: transformers
    with pytest.raises(ConfigError, match=r"`dpo.report_to` names 'tensorboard'.*pip install tensorboard"):
        JointConfig.from_dict({"dpo": {"report_to": "tensorboard"}})
    with pytest.raises(ConfigError, match=r"`retriever.report_to` names 'wandb'.*pip install wandb"):
        JointConfig.from_dict({"retriever": {"report_to": ["wandb"]}})
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "tensorboardX" else None)
    assert missing_tracker("tensorboard") is None  # tensorboardX serves transformers' callback too


def test_report_to_accepts_the_trackers_the_installed_transformers_knows(monkeypatch):
    import sys

    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    from expandr_haystack.training.compat import REPORT_TO, report_to_trackers

    for tracker in INTEGRATION_TO_CALLBACK:  # whatever this transformers release lists (5.0 has no kubeflow)
        assert RetrieverSettings(report_to=tracker).validate() is None
        assert DPOSettings(report_to=["none" if tracker == "none" else tracker]).validate() is None
    with pytest.raises(ConfigError, match="retriever.report_to"):
        RetrieverSettings(report_to="tensorbored").validate()
    assert set(REPORT_TO) >= {"tensorboard", "wandb", "mlflow"}
    monkeypatch.setitem(sys.modules, "transformers.integrations.integration_utils", None)  # no transformers
    assert report_to_trackers() == REPORT_TO


def test_report_to_logging_steps_and_the_progress_bar_reach_both_trainers_args(tmp_path):
    from sentence_transformers.sentence_transformer.training_args import SentenceTransformerTrainingArguments
    from trl import DPOConfig

    from expandr_haystack.training.dpo import dpo_config_kwargs
    from expandr_haystack.training.retriever import encoder_training_kwargs

    dpo = DPOSettings(report_to=["tensorboard"], logging_steps=3)
    args = DPOConfig(**dpo_config_kwargs(DPOConfig, dpo, tmp_path, use_cpu=True, bf16=False, logging_steps=3,
                                         progress_bar=True, run_name="run-round1-dpo"))
    assert (args.report_to, args.logging_steps, args.disable_tqdm, args.run_name) == \
        (["tensorboard"], 3, False, "run-round1-dpo")
    quiet = DPOConfig(**dpo_config_kwargs(DPOConfig, DPOSettings(), tmp_path, use_cpu=True, bf16=False,
                                          logging_steps=10))
    assert quiet.report_to in ([], "none", ["none"]) and quiet.disable_tqdm

    retriever = RetrieverSettings(report_to="tensorboard", logging_steps=7, batch_size=8)
    kwargs = encoder_training_kwargs(retriever, tmp_path, examples=5, seed=3, use_cpu=True, progress_bar=False,
                                     run_name="run-round1-retriever")
    args = SentenceTransformerTrainingArguments(**kwargs)
    assert (args.report_to, args.logging_steps, args.disable_tqdm, args.run_name) == \
        (["tensorboard"], 7, True, "run-round1-retriever")
    assert (args.per_device_train_batch_size, args.seed, args.save_strategy) == (5, 3, "no")
    default = encoder_training_kwargs(RetrieverSettings(), tmp_path, 100, 1, True, True)
    assert (default["report_to"], default["logging_steps"], default["disable_tqdm"]) == ("none", 10, False)
    assert "run_name" not in default


def test_tensorboard_event_files_go_to_the_given_folder(tmp_path, monkeypatch):
    import os

    from expandr_haystack.training.runfiles import tensorboard_logging_dir

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    with tensorboard_logging_dir(tmp_path / "logs"):
        assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(tmp_path / "logs")
    assert "TENSORBOARD_LOGGING_DIR" not in os.environ
    with tensorboard_logging_dir(None):
        assert "TENSORBOARD_LOGGING_DIR" not in os.environ
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", "/mine")  # the user's choice wins
    with tensorboard_logging_dir(tmp_path / "logs"):
        assert os.environ["TENSORBOARD_LOGGING_DIR"] == "/mine"


def test_llm_backend_is_read_as_llm_engine_with_a_deprecation_warning(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("llm_backend: transformers\nrounds: 1\n")
    with pytest.warns(DeprecationWarning, match="`llm_backend` is now `llm_engine`"):
        config = JointConfig.from_yaml(path)
    assert config.llm_engine == "transformers" and "llm_backend" not in config.to_dict()
    with pytest.raises(ConfigError, match="both `llm_backend` and its new name `llm_engine`"):
        JointConfig.from_dict({"llm_backend": "auto", "llm_engine": "auto"})


def test_expanders_are_built_from_the_settings_groups():
    """The rounds and `expandr pairs` take their GenerationSettings/SamplerOptions from the config, one mapping."""
    from expandr_haystack.options import GenerationSettings

    config = JointConfig.from_dict({"seed": 7, "llm_engine": "transformers",
                                    "expansion": {"temperature": 0.3, "top_p": 0.5, "max_new_tokens": 12},
                                    "pairs": {"temperatures": [0.6, 1.2], "top_p": 0.8, "batch_size": 4}})
    assert config.expansion.generation(config.seed) == GenerationSettings(temperature=0.3, top_p=0.5,
                                                                           max_new_tokens=12, seed=7)
    assert config.pairs.generation() == GenerationSettings(temperature=0.6, top_p=0.8, batch_size=4, seed=42)
    assert config.sampler().engine == "transformers"


def test_llm_engine_kwargs_reach_the_sampler_and_are_vllm_only():
    from expandr_haystack.options import SamplerOptions

    assert SamplerOptions(engine="vllm", engine_kwargs={"tensor_parallel_size": 2}).engine_kwargs == {
        "tensor_parallel_size": 2}
    with pytest.raises(ConfigError, match="`llm_engine_kwargs`: .*vLLM"):
        JointConfig.from_dict({"llm_engine_kwargs": {"tensor_parallel_size": 2}})  # llm_engine auto
    with pytest.raises(ConfigError, match="`llm_engine_kwargs`"):
        JointConfig.from_dict({"llm_engine": "transformers", "llm_engine_kwargs": [2]})


def test_pair_threshold_above_a_summed_cosine_is_refused():
    with pytest.raises(ConfigError, match=r"pairs: `threshold` must be a number <= 2; got 5.0. A summed cosine"):
        JointConfig.from_dict({"pairs": {"threshold": 5}})


def test_gather_across_devices_is_true_false_or_null():
    assert JointConfig.from_dict({"retriever": {"gather_across_devices": False}}).retriever.gather_across_devices is False
    with pytest.raises(ConfigError, match="`retriever.gather_across_devices` must be true, false or null"):
        JointConfig.from_dict({"retriever": {"gather_across_devices": "yes"}})
