"""The run folder of joint training (state, resume, ranks), its plots and pipeline YAML: fast, no model loads."""

import json
import threading
import time

import pytest

from expandr_haystack.training.config import JointConfig
from expandr_haystack.training.runfiles import RunFolder, RunFolderError, is_main_process, replace_dir

CONFIG = {"data": "cranfield", "rounds": 2, "seed": 42, "pairs": {"temperatures": (0.8, 1.0)}}


def test_new_run_then_resume(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.open(CONFIG, resume=False)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["pairs"]["temperatures"] == [0.8, 1.0]
    folder.finish("round1.pairs", kept=3)
    folder.record(1, "round 1", {"dense": {"ndcg@10": 0.2}}, series="LLM_r")
    folder.record(1, "round 1", {"dense": {"ndcg@10": 0.3}}, series="LLM_r")  # replaces the row

    with pytest.raises(FileExistsError, match="--resume"):
        RunFolder(tmp_path / "run").open(CONFIG, resume=False)
    with pytest.raises(RunFolderError, match=r"\['seed'\]"):
        RunFolder(tmp_path / "run").open({**CONFIG, "seed": 7}, resume=True)
    again = RunFolder(tmp_path / "run")
    again.open({**CONFIG, "rounds": 3}, resume=True)  # only `rounds` may change
    assert again.is_done("round1.pairs") and again.step_info("round1.pairs")["kept"] == 3
    assert not again.is_done("round1.dpo")
    assert again.metrics == [{"round": 1, "label": "round 1", "series": "LLM_r", "method": "dense", "ndcg@10": 0.3}]
    assert json.loads((tmp_path / "run" / "state.json").read_text())["config"]["rounds"] == 3
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]  # no temporary file left


def test_a_run_folder_written_before_the_restructure_resumes(tmp_path):
    """state.json / metrics.json exactly as the 0.1.0 JointTrainer wrote them (json.dump, no final newline)."""
    config = json.loads(json.dumps(JointConfig().to_dict(), default=str))
    done = {"baselines.zero-shot": {"at": "2026-11-25T10:00:00"}, "round1.pairs": {"at": "x", "kept": 5, "seen": 6}}
    (tmp_path / "state.json").write_text(json.dumps({"done": done, "config": config}, indent=2))
    rows = [{"round": 0, "label": "zero-shot (untrained LLM)", "series": None, "method": "dense", "ndcg@10": 0.25,
             "recall@100": 0.7, "mrr@10": 0.3, "queries": 4}]
    (tmp_path / "metrics.json").write_text(json.dumps(rows, indent=2))
    folder = RunFolder(tmp_path)
    folder.open(JointConfig().to_dict(), resume=True)
    assert folder.is_done("baselines.zero-shot") and folder.step_info("round1.pairs")["kept"] == 5
    assert folder.metrics == rows


def test_other_ranks_wait_for_the_main_process(tmp_path, monkeypatch):
    folder = RunFolder(tmp_path)
    folder.open(CONFIG, resume=False)
    monkeypatch.setenv("RANK", "1")
    assert not is_main_process()
    ran = []
    other = RunFolder(tmp_path)
    other.poll_seconds = 0.02

    def main_process_finishes():
        time.sleep(0.2)
        main = RunFolder(tmp_path)
        main.state = json.loads((tmp_path / "state.json").read_text())
        main.state["done"]["round1.expand"] = {"at": "now"}
        (tmp_path / "state.json").write_text(json.dumps(main.state))

    thread = threading.Thread(target=main_process_finishes)
    thread.start()
    other.run_on_main("round1.expand", lambda: ran.append(1))  # rank 1 does not work: it polls state.json
    thread.join()
    assert ran == [] and other.is_done("round1.expand")


def test_wait_for_polls(tmp_path, monkeypatch):
    folder = RunFolder(tmp_path)
    folder.open(CONFIG, resume=False)
    writer = RunFolder(tmp_path)
    writer.state = json.loads((tmp_path / "state.json").read_text())
    timer = threading.Timer(0.1, lambda: writer.finish("round1.eval"))
    timer.start()
    folder.wait_for("round1.eval", poll_seconds=0.02)
    assert folder.is_done("round1.eval")


def test_stale_work_and_replace_dir(tmp_path, monkeypatch):
    (tmp_path / "round_1" / ".dpo-abc").mkdir(parents=True)
    (tmp_path / "baseline" / ".train-xyz").mkdir(parents=True)
    # (several processes: rank 0 removes them, then every rank passes a barrier before starting the step: the
    # torchrun test, tests/training/test_distributed.py)
    RunFolder(tmp_path).remove_stale_work()
    assert not (tmp_path / "round_1" / ".dpo-abc").exists() and not (tmp_path / "baseline" / ".train-xyz").exists()

    new = tmp_path / "new"
    new.mkdir()
    (new / "weights").write_text("2")
    target = tmp_path / "round_1" / "adapter"
    target.mkdir()
    (target / "weights").write_text("1")
    assert replace_dir(new, target) == target
    assert (target / "weights").read_text() == "2" and not new.exists()
    assert sorted(p.name for p in target.parent.iterdir()) == ["adapter"]


def test_plots_are_written_atomically(tmp_path):
    from expandr_haystack.evaluation.report import plot_pair_margins, plot_rounds
    from expandr_haystack.training.pairs import PairStats

    rows = [{"round": 0, "label": "supervised, no expansion", "series": None, "method": "dense", "ndcg@10": 0.3},
            {"round": 0, "label": "zero-shot (untrained LLM)", "series": None, "method": "expand", "ndcg@10": 0.2},
            {"round": 1, "label": "round 1", "series": "LLM_r", "method": "dense", "ndcg@10": 0.32},
            {"round": 1, "label": "round 1", "series": "LLM_r", "method": "expand", "ndcg@10": 0.35},
            {"round": 1, "label": "round 1 old", "series": "LLM_r-1", "method": "expand", "ndcg@10": 0.34}]
    assert plot_rounds(rows, tmp_path / "metrics.png", "test").stat().st_size > 1000
    with pytest.raises(ValueError, match="empty"):
        plot_rounds([], tmp_path / "none.png")
    stats = PairStats(out_path="pairs.jsonl", kept=2, queries_seen=3, kept_fraction=2 / 3,
                      margin_histogram={"edges": [0.0, 1.0, 2.0], "counts": [1, 1]},
                      best_score_histogram={"edges": [0.0, 1.0, 2.0], "counts": [1, 2]}, config={"use_answer": True})
    pairs = [{"rewards": {"margin": 0.5}}, {"rewards": {"margin": 1.5}}]
    records = [{"best_score": 0.9}, {"best_score": 1.4}, {"best_score": None}]
    assert plot_pair_margins(stats, pairs, records, tmp_path / "m.png", 0.6).stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.png", "metrics.png"]


def test_round_pipeline_yaml_loads(tmp_path):
    from haystack import Pipeline

    import expandr_haystack  # noqa: F401 - allow-list
    from expandr_haystack import LLMQueryExpander
    from expandr_haystack.training.round_pipeline import round_pipeline_yaml

    (tmp_path / "encoder").mkdir()
    text = round_pipeline_yaml(2, LLMQueryExpander(generation={"max_new_tokens": 8}), tmp_path / "encoder",
                               query_weight=0.3)
    assert text.startswith("# Search pipeline of round 2: index documents with SentenceTransformersDocumentEmbedder(")
    p = Pipeline.loads(text)
    assert p.get_component("retriever").fusion.query_weight == 0.3
    assert p.get_component("expander").generation.max_new_tokens == 8


def test_evaluation_uses_the_configured_settings_without_validation(tmp_path, monkeypatch):
    from expandr_haystack.evaluation import protocol
    from expandr_haystack.training.rounds import JointTrainer

    seen = {}

    def fake_evaluate_seeds(collection, methods, seeds, **kwargs):
        seen.update(kwargs, methods=methods, seeds=seeds)
        return {}

    monkeypatch.setattr(protocol, "evaluate_seeds", fake_evaluate_seeds)
    config = JointConfig.from_dict({"max_eval_queries": 2, "retriever": {"query_weight": 0.3}})
    JointTrainer(config, tmp_path, progress_bar=False)._evaluate(None, ["dense"], None)
    assert seen["query_weight"] == {"expand": 0.3, "grounded": 0.3} and seen["expander"] is None
    assert (seen["feedback_k"], seen["feedback_weight"]) == (3, 0.7) and seen["seeds"] == [42]
    config = JointConfig.from_dict({"max_eval_queries": 2, "eval_seeds": [1, 2]})
    JointTrainer(config, tmp_path, progress_bar=False)._evaluate(None, ["dense", "expand"], 0)
    assert seen["seeds"] == [1, 2] and seen["expander"].generation.seed == 42 and seen["grounded_expander"].grounded


def test_round_methods_follow_the_mode(tmp_path):
    from expandr_haystack.training.rounds import JointTrainer

    q2d = JointTrainer(JointConfig.from_dict({"eval_methods": ["bm25", "dense", "expand-rrf"]}), tmp_path)
    assert q2d._methods == ["dense", "prf", "expand", "expand-rrf"]
    assert q2d._baseline_methods == ["bm25", "dense", "prf", "expand", "grounded", "haystack_multiquery",
                                     "expand-rrf"]
    grounded = JointTrainer(JointConfig.from_dict({"expansion": {"mode": "grounded"}}), tmp_path)
    assert grounded._methods == ["dense", "prf", "grounded", "expand"]  # eval_methods' default adds q2d's expand


def test_zero_shot_report_tests_every_expansion_method_and_keeps_the_multiquery_parse_counts(tmp_path):
    """Round 0 with Haystack's multi-query baseline (the report stands in for `evaluate_seeds`' output): each
    expansion method paired-tested against dense and PRF, QueryExpander's parse counts per seed in its row, a note in
    the summary, a line in the plot."""
    from expandr_haystack.evaluation.protocol import SeedReport
    from expandr_haystack.training.round_eval import BASELINE_METHODS
    from expandr_haystack.training.rounds import JointTrainer

    assert "haystack_multiquery" in BASELINE_METHODS
    trainer = JointTrainer(JointConfig.from_dict({"max_eval_queries": 3, "eval_seeds": [1, 2]}), tmp_path / "run",
                           progress_bar=False)
    trainer.folder.open(trainer.config.to_dict(), resume=False)
    methods = trainer._baseline_methods
    report = SeedReport(multiquery=[{"queries": 3, "json_parsed": 0, "fallback": 3, "searched": 3},
                                    {"queries": 3, "json_parsed": 1, "fallback": 2, "searched": 4}])
    for i, m in enumerate(methods):
        expanding = m in ("expand", "grounded", "haystack_multiquery")
        report.rows[m] = {"ndcg@10": 0.3 + i / 100, "recall@100": 0.7, "mrr@10": 0.5, "ndcg@10_sd": 0.01,
                          "recall@100_sd": 0.0, "mrr@10_sd": 0.0, "seeds": 2 if expanding else 0,
                          "per_seed": {"ndcg@10": [0.3, 0.31]}}
        report.per_query[m] = {"1": 0.2 + i / 100, "2": 0.5, "3": 0.4 - i / 200}
    settings = {"chosen_on": "config", "query_weight": {"expand": 0.5, "grounded": 0.5}, "feedback_k": 3,
                "feedback_weight": 0.7, "validation_queries": 0, "validation_ndcg@10": {}}
    trainer._store = lambda encoder: None
    trainer._settings = lambda *args, **kwargs: settings
    trainer._evaluate = lambda *args, **kwargs: report
    trainer._zero_shot()
    rows = {m["method"]: m for m in trainer.metrics}
    assert set(rows) == set(methods)
    for m in ("expand", "grounded", "haystack_multiquery"):
        assert [c["baseline"] for c in rows[m]["comparisons"]] == ["dense", "prf"]
        assert 0 < rows[m]["comparisons"][0]["p_randomization"] <= 1 and rows[m]["seeds"] == [1, 2]
    assert "comparisons" not in rows["prf"] and "multiquery" not in rows["expand"]
    assert rows["haystack_multiquery"]["multiquery"] == report.multiquery
    text = trainer.summary()
    assert "haystack_multiquery" in text and "round 0: haystack_multiquery vs dense:" in text
    assert ("round 0: haystack_multiquery: QueryExpander read the LLM's JSON in 1 of 6 replies (16.7%); 5 of 6 "
            "queries (83.3%) fell back to the original query alone over 2 seeds") in text
    saved = json.loads((tmp_path / "run" / "baseline" / "zero-shot.json").read_text())
    assert saved["report"]["multiquery"] == report.multiquery
    trainer._plot()
    assert (tmp_path / "run" / "metrics.png").stat().st_size > 1000


def test_a_run_folder_without_the_new_keys_resumes_while_they_keep_their_defaults(tmp_path):
    """state.json written before validation_queries, eval_seeds and expansion.mode/passages_* existed."""
    config = json.loads(json.dumps(JointConfig().to_dict(), default=str))
    for key in ("validation_queries", "eval_seeds"):
        del config[key]
    for key in ("mode", "passages_k", "passage_words"):
        del config["expansion"][key]
    (tmp_path / "state.json").write_text(json.dumps({"done": {"baselines.zero-shot": {"at": "x"}}, "config": config}))
    folder = RunFolder(tmp_path)
    folder.open(JointConfig().to_dict(), resume=True, defaults=JointConfig.defaults())
    assert folder.is_done("baselines.zero-shot")
    for changed, key in [({"validation_queries": 30}, "validation_queries"), ({"eval_seeds": [1, 2]}, "eval_seeds"),
                         ({"expansion": {"mode": "grounded"}}, "expansion")]:
        with pytest.raises(RunFolderError, match=key):
            RunFolder(tmp_path).open(JointConfig.from_dict(changed).to_dict(), resume=True,
                                     defaults=JointConfig.defaults())


def test_grounded_round_pipeline_has_a_first_pass(tmp_path):
    from haystack import Pipeline

    import expandr_haystack  # noqa: F401 - allow-list
    from expandr_haystack import GROUNDED_PROMPT, LLMQueryExpander
    from expandr_haystack.training.round_pipeline import round_pipeline_yaml

    (tmp_path / "encoder").mkdir()
    expander = LLMQueryExpander(prompt=GROUNDED_PROMPT, passages_k=4, n_expansions=2)
    text = round_pipeline_yaml(1, expander, tmp_path / "encoder", query_weight=0.8)
    assert '{"first_pass": {"query": q}, "expander": {"query": q}}' in text.splitlines()[0]
    p = Pipeline.loads(text)
    assert p.get_component("first_pass").top_k == 4 and p.get_component("retriever").fusion.query_weight == 0.8
    assert p.get_component("expander").grounded and p.get_component("expander").n_expansions == 2
    assert ("first_pass", "expander") in set(p.graph.edges())


def test_final_dpo_metrics_are_the_last_logged_values():
    from expandr_haystack.training.config import DPOSettings
    from expandr_haystack.training.dpo import _optimizer_steps, final_dpo_metrics

    history = [{"loss": 0.69, "rewards/margins": 0.01, "rewards/accuracies": 0.5, "step": 10},
               {"loss": 0.6, "rewards/margins": 0.2, "rewards/accuracies": 1.0, "step": 20},
               {"train_loss": 0.65, "train_runtime": 12.0, "step": 25}]
    assert final_dpo_metrics(history) == {"loss": 0.6, "rewards/margins": 0.2, "rewards/accuracies": 1.0,
                                          "steps": 25}
    assert final_dpo_metrics([]) == {}
    assert _optimizer_steps(62, DPOSettings(per_device_train_batch_size=4, num_train_epochs=2)) == 32
    assert _optimizer_steps(5, DPOSettings(max_steps=1)) == 1
    assert _optimizer_steps(3, DPOSettings(per_device_train_batch_size=4, gradient_accumulation_steps=4)) == 2


def test_plot_and_summary_show_every_baseline_and_the_spread(tmp_path):
    from expandr_haystack.evaluation.report import plot_rounds
    from expandr_haystack.training.rounds import JointTrainer

    def row(round_, label, method, ndcg, series=None, sd=0.0, **extra):
        return {"round": round_, "label": label, "series": series, "method": method, "ndcg@10": ndcg,
                "recall@100": 0.7, "ndcg@10_sd": sd, "seeds": [1, 2] if sd else [], **extra}

    w = {"fusion": "mean", "query_weight": 0.8, "feedback_k": 0, "chosen_on": "validation"}
    prf = {"fusion": "mean", "feedback_k": 5, "feedback_weight": 0.8, "chosen_on": "validation"}
    rows = [row(0, "zero-shot (untrained LLM)", m, v) for m, v in
            [("bm25", 0.34), ("dense", 0.39), ("prf", 0.40), ("expand", 0.35), ("grounded", 0.38)]]
    rows += [row(0, "supervised, no expansion", "dense", 0.395),
             row(1, "round 1: encoder_1 + LLM_1", "dense", 0.39, "LLM_r"),
             row(1, "round 1: encoder_1 + LLM_1", "prf", 0.41, "LLM_r", settings=prf),
             row(1, "round 1: encoder_1 + LLM_1", "expand", 0.37, "LLM_r", sd=0.01, settings=w,
                 comparisons=[{"method": "ExpandR (expand): encoder_1 + LLM_1", "baseline": "supervised, no expansion",
                               "delta_ndcg@10": -2.5, "p_randomization": 0.21}],
                 dpo={"pairs": 30, "rewards/margins": 0.12, "rewards/accuracies": 0.9}),
             row(1, "round 1: encoder_1 + LLM_0", "expand", 0.36, "LLM_r-1", sd=0.005)]
    assert plot_rounds(rows, tmp_path / "metrics.png", "test").stat().st_size > 1000
    trainer = JointTrainer(JointConfig.from_dict({"eval_seeds": [1, 2]}), tmp_path / "run")
    trainer.folder.metrics = rows
    text = trainer.summary()
    assert "w=0.8 (validation)" in text and "k=5 f=0.8 (validation)" in text and "1.00" in text
    assert "vs supervised, no expansion: -2.50 nDCG@10, paired randomization p = 0.2100" in text
    assert "DPO on 30 pairs, final rewards/margins 0.1200, rewards/accuracies 0.90" in text
    assert "2 seed(s) [1, 2]" in text


def _tiny_run_folder(run, encoder_source=None):
    """A run folder with what a round's pipeline.yaml names: round_1/{encoder, adapter} and cache.sqlite (an empty
    encoder folder and a bare adapter_config.json unless real ones are given)."""
    import shutil

    r1 = run / "round_1"
    if encoder_source is None:
        (r1 / "encoder").mkdir(parents=True)
    else:
        shutil.copytree(encoder_source, r1 / "encoder")
    (r1 / "adapter").mkdir(parents=True, exist_ok=True)
    if not (r1 / "adapter" / "adapter_config.json").exists():
        (r1 / "adapter" / "adapter_config.json").write_text("{}")
    return r1


def test_a_moved_run_folder_pipeline_loads_from_its_new_place(tmp_path, monkeypatch):
    import shutil

    from haystack import Pipeline

    import expandr_haystack  # noqa: F401 - allow-list
    from expandr_haystack import GROUNDED_PROMPT, LLMQueryExpander
    from expandr_haystack.training import load_round_pipeline
    from expandr_haystack.training.round_pipeline import round_pipeline_yaml

    run = tmp_path / "run"
    r1 = _tiny_run_folder(run)
    expander = LLMQueryExpander(prompt=GROUNDED_PROMPT, adapter=str(r1 / "adapter"), cache=str(run / "cache.sqlite"),
                                generation={"max_new_tokens": 8})
    text = round_pipeline_yaml(1, expander, r1 / "encoder", query_weight=0.3, base=run)
    (r1 / "pipeline.yaml").write_text(text)
    assert str(tmp_path) not in text
    for line in ("model: ./round_1/encoder", "adapter: ./round_1/adapter", "cache: ./cache.sqlite",
                 "expandr_paths_relative_to: .."):
        assert line in text

    moved = tmp_path / "elsewhere" / "renamed-run"
    moved.parent.mkdir()
    shutil.move(str(run), str(moved))
    assert not run.exists()
    p = load_round_pipeline(moved / "round_1" / "pipeline.yaml")
    new = (moved / "round_1").resolve()
    assert p.get_component("retriever").model == str(new / "encoder")
    assert p.get_component("first_pass").model == str(new / "encoder")
    assert p.get_component("expander").adapter == str(new / "adapter")
    assert p.get_component("expander").cache == str(moved.resolve() / "cache.sqlite")
    assert p.get_component("retriever").fusion.query_weight == 0.3 and (
        p.get_component("expander").generation.max_new_tokens == 8)

    monkeypatch.chdir(moved)  # plain Pipeline.loads from inside the run folder
    assert Pipeline.loads(text).get_component("expander").adapter == "./round_1/adapter"
    monkeypatch.chdir(tmp_path)  # ... but not from elsewhere: the error names the relative path
    with pytest.raises(Exception, match="round_1/"):
        Pipeline.loads(text)


def test_pipeline_paths_outside_the_run_folder_and_old_absolute_yaml_stay(tmp_path):
    from expandr_haystack import LLMQueryExpander
    from expandr_haystack.training.round_pipeline import (
        load_round_pipeline,
        relative_pipeline_paths,
        resolve_pipeline_paths,
        round_pipeline_yaml,
    )

    data = {"components": {"a": {"init_parameters": {"model": str(tmp_path / "run" / "m"), "top_k": 3,
                                                     "query_embedder": {"init_parameters": {
                                                         "model": str(tmp_path / "run" / "q")}}}},
                           "b": {"init_parameters": {"model": "org/name", "adapter": str(tmp_path / "other"),
                                                     "cache": None}}}}
    rel = relative_pipeline_paths(data, tmp_path / "run")
    assert rel["components"]["a"]["init_parameters"]["model"] == "./m"
    assert rel["components"]["a"]["init_parameters"]["query_embedder"]["init_parameters"]["model"] == "./q"
    assert rel["components"]["b"]["init_parameters"] == data["components"]["b"]["init_parameters"]
    back = resolve_pipeline_paths(rel, tmp_path / "run")
    assert back["components"]["a"]["init_parameters"]["model"] == str((tmp_path / "run" / "m").resolve())
    assert back["components"]["b"]["init_parameters"]["model"] == "org/name"

    r1 = _tiny_run_folder(tmp_path / "old")  # a pipeline.yaml written before relative paths: absolute, no metadata
    text = round_pipeline_yaml(1, LLMQueryExpander(adapter=str(r1 / "adapter")), r1 / "encoder")
    assert str(r1 / "adapter") in text
    (r1 / "pipeline.yaml").write_text(text)
    assert load_round_pipeline(r1 / "pipeline.yaml").get_component("expander").adapter == str(r1 / "adapter")


def test_a_run_folder_resumes_with_other_trackers_but_not_other_training(tmp_path):
    """report_to and logging_steps change how the trainers log, not what they train; state.json from before they
    existed (no retriever.report_to / logging_steps, no dpo.report_to) resumes."""
    from expandr_haystack.training.config import DPOSettings, RetrieverSettings

    config = json.loads(json.dumps(JointConfig().to_dict(), default=str))
    for key in ("report_to", "logging_steps"):
        del config["retriever"][key]
    del config["dpo"]["report_to"]
    (tmp_path / "state.json").write_text(json.dumps({"done": {"baselines.zero-shot": {"at": "x"}}, "config": config}))
    changed = JointConfig(rounds=3, dpo=DPOSettings(report_to="tensorboard", logging_steps=1),
                          retriever=RetrieverSettings(report_to=["wandb"], logging_steps=2))
    folder = RunFolder(tmp_path)
    folder.open(changed.to_dict(), resume=True, defaults=JointConfig.defaults())
    assert folder.is_done("baselines.zero-shot") and folder.state["config"]["dpo"]["report_to"] == "tensorboard"
    with pytest.raises(RunFolderError, match=r"\['dpo'\]"):
        RunFolder(tmp_path).open(JointConfig.from_dict({"dpo": {"beta": 0.3}}).to_dict(), resume=True,
                                 defaults=JointConfig.defaults())


def _card_rows():
    return [{"round": 1, "label": "round 1: encoder_1 + LLM_1", "method": "dense", "ndcg@10": 0.31,
             "recall@100": 0.8},
            {"round": 1, "label": "round 1: encoder_1 + LLM_1", "method": "expand", "ndcg@10": 0.3456,
             "ndcg@10_sd": 0.0123, "recall@100": 0.85}]


def test_model_card_text_names_base_models_data_round_config_and_metrics():
    from expandr_haystack.training.cards import BEGIN, END, model_card_text

    config = JointConfig.from_dict({"rounds": 3, "max_train_queries": 40, "validation_queries": 10,
                                    "llm": "HuggingFaceTB/SmolLM2-360M-Instruct", "dpo": {"beta": 0.25},
                                    "retriever": {"learning_rate": 3e-5}, "expansion": {"n_expansions": 2}})
    text = model_card_text("encoder", 2, config, _card_rows(), query_weight=0.6, info={"examples": 77})
    assert text.startswith(BEGIN) and text.rstrip().endswith(END)
    for part in ("round 2 encoder", "sentence-transformers/all-MiniLM-L6-v2", "`HuggingFaceTB/SmolLM2-360M-Instruct`",
                 "`cranfield`", "split `train`, the first 40 queries", "10 of them held out", "split `test`",
                 "| Round | 2 of 3", "learning rate 3e-05", "beta 0.25", "2 per query", "w = 0.6", "77 examples",
                 "| round 1: encoder_1 + LLM_1 | expand | 34.56 | 1.23 | 85.00 |", "| dense | 31.00 |  | 80.00 |",
                 'load_round_pipeline("<run folder>/round_2/pipeline.yaml")'):
        assert part in text, part
    adapter = model_card_text("adapter", 2, config, [], info={"pairs": 9, "rewards/margins": 0.0412,
                                                               "rewards/accuracies": 0.75})
    for part in ("round 2 adapter", "round 1's adapter", "(9 pairs)", "rewards/margins 0.0412", "(not evaluated)"):
        assert part in adapter, part
    with pytest.raises(ValueError, match="kind"):
        model_card_text("llm", 1, config, [])


def test_model_cards_merge_into_the_libraries_readme_once(tmp_path):
    from expandr_haystack.training.cards import BEGIN, write_model_card

    library = "---\nlibrary_name: sentence-transformers\n---\n\n# SentenceTransformer\n\nTheir card.\n"
    (tmp_path / "README.md").write_text(library)
    write_model_card(tmp_path, f"{BEGIN}\nfirst\n<!-- /expandr-haystack -->\n")
    write_model_card(tmp_path, f"{BEGIN}\nsecond\n<!-- /expandr-haystack -->\n")
    text = (tmp_path / "README.md").read_text()
    assert text.startswith(library.rstrip("\n")) and text.count(BEGIN) == 1
    assert "second" in text and "first" not in text
    write_model_card(tmp_path / "new", f"{BEGIN}\nonly\n<!-- /expandr-haystack -->\n")
    assert (tmp_path / "new" / "README.md").read_text().startswith(BEGIN)


def test_the_save_step_writes_pipeline_and_model_cards(tmp_path):
    from expandr_haystack.training import load_round_pipeline
    from expandr_haystack.training.cards import BEGIN
    from expandr_haystack.training.rounds import JointTrainer

    config = JointConfig.from_dict({"rounds": 1})
    trainer = JointTrainer(config, tmp_path / "run", progress_bar=False)
    trainer.folder.open(config.to_dict(), resume=False, defaults=JointConfig.defaults())
    r1 = _tiny_run_folder(tmp_path / "run")
    (r1 / "encoder" / "README.md").write_text("# sentence-transformers card\n")
    trainer.folder.finish("round1.retriever", examples=12)
    trainer.folder.finish("round1.dpo", pairs=3, **{"rewards/margins": 0.5})
    trainer.folder.finish("round1.eval", settings={"query_weight": {"expand": 0.7}})
    trainer.folder.metrics = _card_rows()
    trainer._save(1)
    encoder_card = (r1 / "encoder" / "README.md").read_text()
    assert encoder_card.startswith("# sentence-transformers card") and BEGIN in encoder_card
    assert "12 examples" in encoder_card and "w = 0.7" in encoder_card and "34.56" in encoder_card
    assert "(3 pairs)" in (r1 / "adapter" / "README.md").read_text()
    trainer._save(1)  # a resumed save step rewrites our section, never repeats it
    assert (r1 / "encoder" / "README.md").read_text().count(BEGIN) == 1
    assert load_round_pipeline(r1 / "pipeline.yaml").get_component("retriever").fusion.query_weight == 0.7


def test_the_retriever_steps_pass_logging_folders_and_run_names(tmp_path, monkeypatch):
    import inspect

    import expandr_haystack.training.retriever as retriever_module
    from expandr_haystack.training.rounds import JointTrainer

    calls = []
    signature = inspect.signature(retriever_module.train_encoder)

    def fake_train_encoder(*args, **kwargs):
        signature.bind(*args, **kwargs)  # the real function takes these arguments
        calls.append(kwargs)

    monkeypatch.setattr(retriever_module, "train_encoder", fake_train_encoder)
    monkeypatch.setattr(retriever_module, "mine_hard_negatives", lambda collection, ids, *a, **k: {q: [] for q in ids})
    trainer = JointTrainer(JointConfig.from_dict({"max_train_queries": 3, "max_eval_queries": 2}), tmp_path / "run",
                           progress_bar=False)
    monkeypatch.setattr(trainer, "_store", lambda encoder: None)
    (tmp_path / "run" / "baseline").mkdir(parents=True)
    trainer._write_examples("baselines.examples", None)  # rank 0's step: the rows (into run/baseline)
    trainer._supervised_baseline()
    (tmp_path / "run" / "round_1").mkdir(parents=True)
    (tmp_path / "run" / "round_1" / "expansions.json").write_text(
        json.dumps({q: ["an expansion"] for q in trainer.train_data.queries}))
    trainer._write_examples("round1.examples", 1)
    rows = json.loads((tmp_path / "run" / "round_1" / "examples.json").read_text())
    assert trainer.folder.step_info("round1.examples")["examples"] == len(rows) >= 3 and "expansion_1" in rows[0]
    trainer._train_retriever(1)
    assert [(c["logging_dir"], c["run_name"], c["progress_bar"]) for c in calls] == [
        (tmp_path / "run" / "baseline" / "logs" / "retriever", "run-baseline-retriever", False),
        (tmp_path / "run" / "round_1" / "logs" / "retriever", "run-round1-retriever", False)]


def test_a_run_folder_saved_with_llm_backend_resumes_under_llm_engine(tmp_path):
    """`llm_backend` (until 2026-12-05) is `llm_engine` now: a run saved with it resumes, and a change is still seen."""
    config = json.loads(json.dumps(JointConfig.from_dict({"llm_engine": "transformers"}).to_dict(), default=str))
    config["llm_backend"] = config.pop("llm_engine")
    (tmp_path / "state.json").write_text(json.dumps({"done": {"baselines.zero-shot": {"at": "x"}}, "config": config}))
    RunFolder(tmp_path).open(JointConfig.from_dict({"llm_engine": "transformers"}).to_dict(), resume=True,
                             defaults=JointConfig.defaults(), renamed=JointConfig.RENAMED)
    with pytest.raises(RunFolderError, match="llm_engine"):
        RunFolder(tmp_path).open(JointConfig().to_dict(), resume=True, defaults=JointConfig.defaults(),
                                 renamed=JointConfig.RENAMED)
