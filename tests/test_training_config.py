"""JointConfig validation: clear errors before any model loads."""

from pathlib import Path

import pytest

from expandr_haystack.training.config import ConfigError, JointConfig

CONFIGS = Path(__file__).parents[1] / "training" / "configs"


@pytest.mark.parametrize("name", ["micro.yaml", "tiny-cpu.yaml"])
def test_shipped_cpu_configs_validate(name):
    cfg = JointConfig.from_yaml(CONFIGS / name)
    assert cfg.rounds >= 1 and cfg.train_split != cfg.eval_split


def test_paper_gpu_config_explains_why_it_cannot_run_here():
    import torch

    with pytest.raises(ConfigError) as err:
        JointConfig.from_yaml(CONFIGS / "paper-gpu.yaml")
    assert "data" in str(err.value) or ("cuda" in str(err.value).lower() and not torch.cuda.is_available())
    # with a local collection it parses; on a machine without CUDA the device check names the reason
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            JointConfig.from_yaml(CONFIGS / "paper-gpu.yaml", {"data": "cranfield", "eval_split": "test",
                                                                "llm": None})


@pytest.mark.parametrize("raw,match", [
    ({"roundz": 2}, r"unknown key\(s\) \['roundz'\]"),
    ({"rounds": 0}, "`rounds` must be an integer >= 1"),
    ({"eval_split": "train"}, "eval_split"),
    ({"retriever": {"temperature": 0}}, r"retriever\.temperature"),
    ({"retriever": {"temprature": 0.02}}, "unknown key"),
    ({"retriever": {"batch_size": 1}}, "in-batch"),
    ({"pairs": {"n_candidates": 1}}, "n_candidates"),
    ({"dpo": {"beta": -1}}, "beta"),
    ({"data": "/no/such/folder"}, "data"),
    ({"eval_methods": ["dense", "magic"]}, "eval_methods"),
    ({"eval_split": "validation"}, "validation"),
    ({"llm": "./no/such/llm"}, "llm"),
    ({"retriever": {"restart_each_round": "yes"}}, "true or false"),
])
def test_bad_settings_are_named(raw, match):
    with pytest.raises(ConfigError, match=match):
        JointConfig.from_dict(raw)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="--config"):
        JointConfig.from_yaml("/no/such.yaml")
