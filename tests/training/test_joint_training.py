"""The micro config end to end (real bundled models): rounds, outputs, resume without regeneration; then a grounded
micro variant with n expansions, a validation split and two expansion seeds (the issue #12 protocol)."""

import json
import sqlite3
from pathlib import Path

import pytest

from expandr_haystack.training.config import JointConfig
from expandr_haystack.training.rounds import JointTrainer

pytestmark = pytest.mark.integration
MICRO = Path(__file__).parents[2] / "training" / "configs" / "micro.yaml"
#: micro, grounded, 2 expansions a query, 3 validation queries, 2 seeds, shorter everything and no round 0 (the micro
#: run above covers the baselines): about 2.5 min on 2 busy cores.
GROUNDED = {"baselines": False, "expansion": {"mode": "grounded", "n_expansions": 2, "max_new_tokens": 8, "batch_size": 8, "passages_k": 2,
                          "passage_words": 12},
            "validation_queries": 3, "eval_seeds": [1, 2], "eval_methods": ["dense"], "max_train_queries": 4,
            "max_eval_queries": 3, "max_corpus_documents": 40,
            "pairs": {"n_candidates": 3, "temperatures": [0.9, 1.1], "max_new_tokens": 8, "answer_max_new_tokens": 8,
                      "threshold": 0.0, "batch_size": 8},
            "dpo": {"max_steps": 1, "per_device_train_batch_size": 1, "max_length": 384}}


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
    # every baseline of the report; each round: no expansion, PRF and ExpandR on encoder_1
    assert {(0, "zero-shot (untrained LLM)", m) for m in ("bm25", "dense", "prf", "expand", "grounded")} <= labels
    assert {(1, "round 1: encoder_1 + LLM_1", m) for m in ("dense", "prf", "expand")} <= labels
    # no validation split in micro: the config's settings, one seed (the run's `seed`)
    expand = next(m for m in metrics if (m["round"], m["method"], m["series"]) == (1, "expand", "LLM_r"))
    assert expand["settings"]["query_weight"] == 0.5 and expand["settings"]["chosen_on"] == "config"
    assert expand["seeds"] == [42] and expand["per_seed"]["ndcg@10"] == [expand["ndcg@10"]]
    assert expand["ndcg@10_sd"] == 0.0
    prf = next(m for m in metrics if (m["round"], m["method"]) == (1, "prf"))
    assert (prf["settings"]["feedback_k"], prf["settings"]["feedback_weight"]) == (3, 0.7) and prf["seeds"] == []
    dpo = state["done"]["round1.dpo"]
    assert {"rewards/margins", "rewards/accuracies"} <= set(dpo) and expand["dpo"]["pairs"] == dpo["pairs"]
    assert [c["baseline"] for c in expand["comparisons"]] == ["supervised, no expansion", "PRF on encoder_1"]


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
    exp = LLMQueryExpander(adapter=str(r1 / "adapter"), generation={"max_new_tokens": 8})
    assert exp.run(query="what is lift ?")["expansions"][0]
    pairs = [json.loads(x) for x in (r1 / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all(p["chosen"][0]["content"] != p["rejected"][0]["content"] for p in pairs)
    from expandr_haystack.training import load_round_pipeline

    assert "adapter: ./round_1/adapter" in (r1 / "pipeline.yaml").read_text()  # relative to the run folder
    p = load_round_pipeline(r1 / "pipeline.yaml")
    assert p.get_component("expander").adapter == str((r1 / "adapter").resolve())
    assert isinstance(p, Pipeline)


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


# -- the grounded variant --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def grounded_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("micro-grounded")
    trainer = JointTrainer(JointConfig.from_yaml(MICRO, GROUNDED), out, progress_bar=False)
    trainer.run()
    return out, trainer


def test_grounded_rows_hold_settings_spread_and_per_seed_values(grounded_dir):
    run_dir, _ = grounded_dir
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rows = {(m["round"], m["label"], m["method"]): m for m in metrics}
    assert set(rows) == {(1, "round 1: encoder_1 + LLM_1", m) for m in ("dense", "prf", "grounded")} | {
        (1, "round 1: encoder_1 + LLM_0", "grounded")}
    for m in metrics:
        assert {"settings", "per_seed", "seeds", "ndcg@10_sd", "recall@100_sd"} <= set(m) and m["queries"] == 3
        if m["method"] == "grounded":  # two expansion seeds: mean and sd of the per-seed values
            values = m["per_seed"]["ndcg@10"]
            assert m["seeds"] == [1, 2] and len(values) == 2
            assert m["ndcg@10"] == pytest.approx(sum(values) / 2)
            assert m["ndcg@10_sd"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
            assert m["settings"]["chosen_on"] == "validation" and m["settings"]["validation_queries"] == 3
            assert m["settings"]["query_weight"] in (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
            assert len(m["settings"]["validation_ndcg@10"]) == 6
        elif m["method"] == "prf":
            assert m["settings"]["chosen_on"] == "validation" and len(m["settings"]["validation_ndcg@10"]) == 12
            assert m["seeds"] == [] and len(m["per_seed"]["ndcg@10"]) == 1
    expandr = rows[(1, "round 1: encoder_1 + LLM_1", "grounded")]
    # no supervised baseline in this run: ExpandR is tested against PRF on the same encoder only
    assert [c["baseline"] for c in expandr["comparisons"]] == ["PRF on encoder_1"]
    assert 0 < expandr["comparisons"][0]["p_randomization"] <= 1
    state = json.loads((run_dir / "state.json").read_text())
    assert {"rewards/margins", "rewards/accuracies"} <= set(state["done"]["round1.dpo"])
    assert {"rewards/margins", "rewards/accuracies"} <= set(expandr["dpo"])
    assert state["done"]["round1.eval"]["settings"]["query_weight"]["grounded"] == expandr["settings"]["query_weight"]
    eval_file = json.loads((run_dir / "round_1" / "eval.json").read_text())
    assert len(eval_file["per_query"]["grounded"]) == 3 and "previous_llm" in eval_file


def test_validation_queries_never_train_the_retriever_or_build_pairs(grounded_dir):
    run_dir, trainer = grounded_dir
    validation, train = set(trainer.validation_data.queries), set(trainer.train_data.queries)
    assert len(validation) == 3 and len(train) == 4 and not validation & train
    expanded = set(json.loads((run_dir / "round_1" / "expansions.json").read_text()))  # the retriever's rows
    pairs = [json.loads(x) for x in (run_dir / "round_1" / "pairs.jsonl").read_text().splitlines()]
    seen = [json.loads(x) for x in (run_dir / "round_1" / "pairs.jsonl.seen.jsonl").read_text().splitlines()]
    assert expanded == train and {p["query_id"] for p in pairs} <= train and {r["query_id"] for r in seen} <= train
    state = json.loads((run_dir / "state.json").read_text())
    assert state["done"]["round1.retriever"]["examples"] == 4  # one positive for each training query


def test_grounded_pairs_expansions_and_pipeline(grounded_dir):
    from expandr_haystack.training import load_round_pipeline

    run_dir, trainer = grounded_dir
    expansions = json.loads((run_dir / "round_1" / "expansions.json").read_text())
    assert all(1 <= len(e) <= 2 for e in expansions.values())
    pairs = [json.loads(x) for x in (run_dir / "round_1" / "pairs.jsonl").read_text().splitlines()]
    assert pairs
    for p in pairs:  # DPO sees the grounded prompt: encoder_1's top-2 hits, then the question
        content = p["prompt"][-1]["content"]
        assert content.startswith("Passages:\n[1] ") and "\n[2] " in content and "[3] " not in content
        assert f"Question: {trainer.train_data.queries[p['query_id']]}" in content
    pipeline = load_round_pipeline(run_dir / "round_1" / "pipeline.yaml")
    state = json.loads((run_dir / "state.json").read_text())
    assert pipeline.get_component("retriever").fusion.query_weight == state["done"]["round1.save"]["query_weight"]
    assert pipeline.get_component("first_pass").top_k == 2 and pipeline.get_component("expander").grounded
    assert "grounded" in trainer.summary() and "seed(s) [1, 2]" in trainer.summary()
