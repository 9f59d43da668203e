"""The micro config end to end (real bundled models): rounds, outputs, resume without regeneration."""

import json
import sqlite3
from pathlib import Path

import pytest

from expandr_haystack.training.config import JointConfig
from expandr_haystack.training.rounds import JointTrainer

pytestmark = pytest.mark.integration
MICRO = Path(__file__).parents[2] / "training" / "configs" / "micro.yaml"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("micro")
    JointTrainer(JointConfig.from_yaml(MICRO), out, progress_bar=False).run()
    return out


def test_every_step_finished_and_metrics_recorded(run_dir):
    state = json.loads((run_dir / "state.json").read_text())
    for step in ("baselines.zero-shot", "baselines.supervised", "baselines.eval", "round1.expand",
                 "round1.retriever", "round1.pairs", "round1.dpo", "round1.eval", "round1.save"):
        assert step in state["done"], step
    metrics = json.loads((run_dir / "metrics.json").read_text())
    labels = {(m["round"], m["label"], m["method"]) for m in metrics}
    assert (0, "supervised, no expansion", "dense") in labels
    assert (1, "round 1: encoder_1 + LLM_1", "expand") in labels
    for m in metrics:
        assert 0.0 <= m["ndcg@10"] <= 1.0 and m["queries"] == 4
    assert (run_dir / "metrics.png").stat().st_size > 1000


def test_outputs_load_with_stock_and_our_components(run_dir):
    from haystack import Document, Pipeline
    from haystack_integrations.components.embedders.sentence_transformers import (
        SentenceTransformersDocumentEmbedder,
    )

    import expandr_haystack  # noqa: F401 - allow-list
    from expandr_haystack import LLMQueryExpander

    r1 = run_dir / "round_1"
    emb = SentenceTransformersDocumentEmbedder(model=str(r1 / "encoder"), local_files_only=True)
    emb.warm_up()
    assert len(emb.run([Document(content="lift of a wing")])["documents"][0].embedding) == 384
    assert (r1 / "adapter" / "adapter_config.json").exists()
    exp = LLMQueryExpander(adapter=str(r1 / "adapter"), max_new_tokens=8)
    assert exp.run(query="what is lift ?")["expansions"][0]
    pairs = [json.loads(x) for x in (r1 / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all(p["chosen"][0]["content"] != p["rejected"][0]["content"] for p in pairs)
    p = Pipeline.loads((r1 / "pipeline.yaml").read_text())
    assert p.get_component("expander").adapter == str((r1 / "adapter").resolve())


def test_resume_redoes_only_unfinished_steps_without_generating(run_dir):
    state_path = run_dir / "state.json"
    state = json.loads(state_path.read_text())
    for step in ("round1.eval", "round1.save"):
        del state["done"][step]
    state_path.write_text(json.dumps(state))
    (run_dir / "round_1" / "pipeline.yaml").unlink()
    pairs_before = (run_dir / "round_1" / "pairs.jsonl").read_text()
    cache_before = sqlite3.connect(run_dir / "cache.sqlite").execute("SELECT count(*) FROM expansions").fetchone()
    adapter_mtime = (run_dir / "round_1" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns

    JointTrainer(JointConfig.from_yaml(MICRO), run_dir, progress_bar=False).run(resume=True)

    assert (run_dir / "round_1" / "pipeline.yaml").exists()
    assert (run_dir / "round_1" / "pairs.jsonl").read_text() == pairs_before
    assert sqlite3.connect(run_dir / "cache.sqlite").execute("SELECT count(*) FROM expansions").fetchone() == \
        cache_before
    assert (run_dir / "round_1" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == adapter_mtime


def test_existing_run_needs_resume(run_dir):
    with pytest.raises(FileExistsError, match="--resume"):
        JointTrainer(JointConfig.from_yaml(MICRO), run_dir, progress_bar=False).run()


def test_resume_refuses_a_changed_config(run_dir):
    cfg = JointConfig.from_yaml(MICRO, {"seed": 7})
    with pytest.raises(ValueError, match="seed"):
        JointTrainer(cfg, run_dir, progress_bar=False).run(resume=True)
