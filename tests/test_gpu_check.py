"""benchmarks/gpu_check.sh (issue #14): its dry run does every step on the CPU; its config has paper-gpu's settings."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from expandr_haystack.training.config import JointConfig

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
CONFIG = ROOT / "training" / "configs" / "gpu-check.yaml"
STEPS = ["env", "models", "components", "training", "multi-gpu", "gpu-tests"]


def _run(*args, timeout=300, **env):
    return subprocess.run(["bash", str(SCRIPT), "--python", sys.executable, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **env}, check=False)


@pytest.mark.integration
def test_dry_run_does_every_step_on_the_cpu(tmp_path):
    """About 45 s on the 2-core machine (tiny random models from the bundled tokenizers, 4 new tokens)."""
    out, work = tmp_path / "logs", tmp_path / "work"
    done = _run("--dry-run", "--out", str(out), "--work", str(work))
    assert done.returncode == 0, done.stdout + done.stderr
    summary = (out / "summary.txt").read_text().splitlines()
    assert [line.split()[0] for line in summary] == STEPS
    assert all(line.split()[1] == "ok" for line in summary), summary
    assert {p.name for p in out.glob("*.log")} == {f"{s}.log" for s in STEPS}

    report = json.loads((out / "components.json").read_text())
    assert report["device"] == "cpu" and report["failed"] == []
    checks = {row["check"]: row for row in report["checks"]}
    assert set(checks) == {"expander[float32]", "expander[bfloat16]", "cache keys per dtype", "embedder",
                           "document store", "retriever mean/rrf/filters", "reward scorer", "yaml round trip"}
    f32 = checks["expander[float32]"]["details"]
    # the float32 contract, on the tiny model too (a row the random model leaves empty is dropped in both)
    assert f32["queries_equal_alone_vs_batch"] == "4/4" and f32["rows_equal_alone_vs_batch"] == f32["rows"] >= 6
    assert checks["cache keys per dtype"]["details"]["identities"] == ["float32", "bfloat16"]
    assert (work / "models" / "llm" / "config.json").exists() and (work / "models" / "encoder").is_dir()

    assert "valid (2 rounds, device cpu" in (out / "training.log").read_text()
    assert "skipped: " in (out / "multi-gpu.log").read_text()
    tests_log = (out / "gpu-tests.log").read_text()
    assert "tests/training/test_gpu_path.py" in tests_log and "tests/generation/test_precision.py" in tests_log
    if not torch.cuda.is_available():
        assert "needs a CUDA GPU" in tests_log and " passed" not in tests_log


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run")
def test_without_a_gpu_the_real_check_stops_and_says_why(tmp_path):
    done = _run("--out", str(tmp_path / "logs"), timeout=120)
    assert done.returncode == 2 and "no CUDA GPU" in done.stderr and "--dry-run" in done.stderr


def test_arguments():
    assert "--dry-run" in _run("--help").stdout
    bad = _run("--fast")
    assert bad.returncode == 2 and "unknown argument --fast" in bad.stderr


def test_the_gpu_check_config_has_the_paper_gpu_settings_at_micro_scale():
    paper = yaml.safe_load((ROOT / "training" / "configs" / "paper-gpu.yaml").read_text())
    config = JointConfig.from_yaml(CONFIG, {"device": "cpu"})  # validates here; the script sets the device
    assert yaml.safe_load(CONFIG.read_text())["device"] == paper["device"] == "cuda"
    assert config.rounds == 2 and config.max_train_queries <= 8  # round 2 continues round 1's adapter
    assert config.retriever.bf16 is paper["retriever"]["bf16"] is True
    assert config.retriever.hard_negatives == paper["retriever"]["hard_negatives"] == 7
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps", "gradient_checkpointing"):
        assert getattr(config.dpo, key) == paper["dpo"][key], key
    assert config.llm_engine == "auto" and config.dpo.max_steps <= 2 and config.retriever.max_steps <= 2
