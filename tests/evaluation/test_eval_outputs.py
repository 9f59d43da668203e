"""`expandr eval` outputs users compare and reproduce with: --json provenance, --run-file TREC runs, the default
expansion cache, and the fail-fast check of the [eval] extra."""

import argparse
import json
from datetime import UTC, datetime

import pytest

from expandr_haystack.cli import main
from expandr_haystack.evaluation import cli, evaluate
from expandr_haystack.evaluation.cli import eval_cache_path, run_file_path
from expandr_haystack.evaluation.data import load_collection
from expandr_haystack.evaluation.metrics import (
    beir_metrics,
    evaluate_run,
    read_trec_run,
    trec_run_lines,
    write_trec_run,
)

QUERIES = [
    ("1", "what problems of heat conduction in composite slabs have been solved"),
    ("2", "similarity laws for aeroelastic models of heated aircraft"),
    ("3", "buckling of cylindrical shells under axial compression"),
]
QRELS = "query-id\tcorpus-id\tscore\n1\td1\t2\n2\td2\t1\n2\td6\t1\n3\td4\t1\n"


@pytest.fixture()
def beir(write_beir, tmp_path, monkeypatch):
    monkeypatch.setenv("EXPANDR_HOME", str(tmp_path / "home"))
    return write_beir(QUERIES, QRELS, splits=("test",))


# -- TREC runs ---------------------------------------------------------------------------------------------------
def test_trec_lines_keep_scores_when_strictly_decreasing_else_the_rank():
    lines = trec_run_lines({"q1": [("a", 2.5), ("b", 1.25)], "q2": [("c", 0.5), ("d", 0.5), ("e", None)]}, "dense")
    assert lines[:2] == ["q1 Q0 a 1 2.5 dense", "q1 Q0 b 2 1.25 dense"]
    # a tie (or a hit without score) would let trec_eval re-sort by doc id: the scores encode the rank instead
    assert lines[2:] == ["q2 Q0 c 1 3.0 dense", "q2 Q0 d 2 2.0 dense", "q2 Q0 e 3 1.0 dense"]
    with pytest.raises(ValueError, match="one word"):
        trec_run_lines({"q": [("a", 1.0)]}, "two words")
    with pytest.raises(ValueError, match="whitespace"):
        trec_run_lines({"q": [("a b", 1.0)]}, "dense")


def test_write_and_read_trec_run(tmp_path):
    ranked = {"q1": [("a", 0.9), ("b", 0.8)], "q2": [("b", 1.0)]}
    path = write_trec_run(tmp_path / "sub" / "run.trec", ranked, "expand")
    assert read_trec_run(path) == {"q1": {"a": 0.9, "b": 0.8}, "q2": {"b": 1.0}}
    (tmp_path / "bad.trec").write_text("q1 Q0 a 1 0.5\n")
    with pytest.raises(ValueError, match=r"bad\.trec:1: .*6 fields"):
        read_trec_run(tmp_path / "bad.trec")


def test_run_file_path_scheme():
    assert run_file_path("out/run.trec", "dense").as_posix() == "out/run.dense.trec"
    assert run_file_path("out/run.trec", "expand-rrf", seed=3).as_posix() == "out/run.expand-rrf.seed3.trec"
    assert run_file_path("out/run", "bm25").as_posix() == "out/run.bm25"


def test_evaluated_ranking_equals_the_trec_file(beir, tmp_path):
    c = load_collection(beir, "test")
    result = evaluate(c, methods="bm25", progress_bar=False)
    path = write_trec_run(tmp_path / "run.trec", result.runs["bm25"], "bm25")
    from_file = read_trec_run(path)
    means, _ = evaluate_run(c.qrels, from_file)
    assert means["ndcg@10"] == pytest.approx(result["bm25"]["ndcg@10"])
    assert means["mrr@10"] == pytest.approx(result["bm25"]["mrr@10"])
    assert beir_metrics(c.qrels, from_file, k_values=[1, 3, 5, 10, 100]) == result.beir["bm25"]
    # the same order document by document, as sorted by score (what trec_eval does)
    for qid, hits in result.runs["bm25"].items():
        ranked = sorted(from_file[qid].items(), key=lambda kv: -kv[1])
        assert [d for d, _ in ranked] == [d for d, _ in hits]


# -- the command line --------------------------------------------------------------------------------------------
def test_cli_run_file_and_provenance(beir, tmp_path, capsys):
    out, run = tmp_path / "res.json", tmp_path / "runs" / "run.trec"
    argv = ["eval", str(beir), "--methods", "bm25", "--json", str(out), "--run-file", str(run), "--no-progress",
            "--seed", "7", "--query-weight", "expand=0.7"]
    before = datetime.now(UTC).replace(microsecond=0)
    assert main(argv) == 0
    capsys.readouterr()
    written = json.loads(out.read_text())
    assert {"methods", "settings", "expansion_failures", "beir", "provenance"} <= set(written)
    prov = written["provenance"]
    assert prov["argv"] == ["expandr", *argv]
    assert datetime.fromisoformat(prov["date"]) >= before
    assert prov["packages"]["haystack-ai"] and prov["packages"]["expandr-haystack"]
    assert set(prov["packages"]) >= {"expandr-haystack", "haystack-ai", "torch", "transformers",
                                     "sentence-transformers"}
    assert prov["encoder"] is None and prov["llm"] is None and prov["seeds"] == []  # bm25 uses neither model
    assert prov["query_weight"] == {"expand": 0.7}
    assert set(prov["timings"]) >= {"bm25", "index-bm25"}
    trec = run_file_path(run, "bm25")
    lines = trec.read_text().splitlines()
    assert lines and all(len(line.split()) == 6 and line.split()[5] == "bm25" for line in lines)
    means, _ = evaluate_run(load_collection(beir, "test").qrels, read_trec_run(trec))
    assert means["ndcg@10"] == pytest.approx(written["methods"]["bm25"]["ndcg@10"])


def test_provenance_names_models_and_fingerprints(tmp_path):
    from expandr_haystack.models import model_identity
    from expandr_haystack.options import GenerationSettings

    encoder, adapter = tmp_path / "enc", tmp_path / "lora"
    for d in (encoder, adapter):
        d.mkdir()
        (d / "config.json").write_text("{}")

    class Expander:
        prompt, system_prompt = "Write a passage: {query}", None
        generation = GenerationSettings(top_p=1.0)

    args = argparse.Namespace(encoder=str(encoder), llm="org/llm", adapter=str(adapter), engine="auto",
                              weight_precision="auto",
                              n_expansions=2, temperature=0.7, max_new_tokens=32, batch_size=4, seeds=[1, 2],
                              seed=42, query_weight="0.6")
    prov = cli.eval_provenance(args, ["dense", "expand"], Expander(), "/c.sqlite", {"expansion": 1.23456},
                               "2026-01-01T00:00:00+00:00", ["expandr", "eval"])
    assert prov["encoder"]["fingerprint"] == model_identity(str(encoder))
    assert prov["encoder"]["fingerprint"].startswith("local:") and prov["encoder"]["path"] == str(encoder)
    assert prov["llm"]["fingerprint"] == "hub:org/llm" and prov["llm"]["model"] == "org/llm"
    assert prov["adapter"]["fingerprint"] == model_identity("x", str(adapter)).split("+lora:")[1]
    assert prov["generation"] == {"n_expansions": 2, "temperature": 0.7, "top_p": 1.0, "max_new_tokens": 32,
                                  "batch_size": 4, "prompt": "Write a passage: {query}", "system_prompt": None}
    assert prov["seeds"] == [1, 2] and prov["query_weight"] == 0.6 and prov["cache"] == "/c.sqlite"
    assert prov["timings"] == {"expansion": 1.235}
    (adapter / "adapter_model.safetensors").write_bytes(b"new weights")  # retrained adapter: new fingerprint
    again = cli.eval_provenance(args, ["dense", "expand"], Expander(), None, {}, "", [])
    assert again["adapter"]["fingerprint"] != prov["adapter"]["fingerprint"]


def test_cache_defaults_to_the_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EXPANDR_HOME", str(tmp_path))
    ns = argparse.Namespace
    assert eval_cache_path(ns(cache=None, no_cache=False)) == str(tmp_path / "cache" / "expansions.sqlite")
    assert eval_cache_path(ns(cache=None, no_cache=True)) is None
    assert eval_cache_path(ns(cache=str(tmp_path / "x.sqlite"), no_cache=False)) == str(tmp_path / "x.sqlite")
    assert eval_cache_path(ns(cache="none", no_cache=False)) is None


def test_cli_cache_flags_reach_the_expander(beir, tmp_path, monkeypatch, capsys):
    """The expander `expandr eval` builds gets the user cache by default and none with --no-cache."""
    import expandr_haystack.components.expander as expander_module

    seen = []

    class Stop(RuntimeError):
        pass

    def fake(**kwargs):
        seen.append(kwargs["cache"])
        raise Stop("stop before loading the LLM")

    monkeypatch.setattr(expander_module, "LLMQueryExpander", fake)
    assert main(["eval", str(beir), "--methods", "expand", "--no-progress"]) == 1
    assert main(["eval", str(beir), "--methods", "expand", "--no-progress", "--no-cache"]) == 1
    assert seen == [str(tmp_path / "home" / "cache" / "expansions.sqlite"), None]
    assert main(["eval", str(beir), "--cache", "a.sqlite", "--no-cache"]) == 1
    assert "contradict" in capsys.readouterr().err


def test_missing_eval_extra_fails_before_loading_anything(beir, monkeypatch, capsys):
    import importlib.util

    from expandr_haystack.evaluation import data

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pytrec_eval" else real(name, *a))
    loaded = []
    monkeypatch.setattr(data, "load_collection", lambda *a, **k: loaded.append(a))
    assert main(["eval", str(beir), "--methods", "bm25,dense,expand"]) == 1
    err = capsys.readouterr().err
    assert 'pip install "expandr-haystack[eval]"' in err and "pytrec_eval" in err
    assert loaded == []  # nothing read, indexed or generated
    # a BEIR name still to download also needs beir
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "beir" else real(name, *a))
    assert cli.missing_eval_modules("scifact") == ["beir"]
    assert cli.missing_eval_modules(str(beir)) == []


def test_write_run_files_per_seed(tmp_path):
    runs = {"dense": [{"q": [("a", 1.0)]}], "expand": [{"q": [("a", 2.0)]}, {"q": [("b", 3.0)]}]}
    written = cli.write_run_files(str(tmp_path / "run.trec"), runs, seeds=[5, 6])
    assert [p.name for p in written] == ["run.dense.trec", "run.expand.seed5.trec", "run.expand.seed6.trec"]
    assert read_trec_run(tmp_path / "run.expand.seed6.trec") == {"q": {"b": 3.0}}
    one = cli.write_run_files(str(tmp_path / "one.trec"), {"expand-rrf": [{"q": [("a", 1.0)]}]}, seeds=[9])
    assert [p.name for p in one] == ["one.expand-rrf.seed9.trec"]  # --seeds names the seed even when alone
    plain = cli.write_run_files(str(tmp_path / "p.trec"), {"expand": {"q": [("a", 1.0)]}})
    assert [p.name for p in plain] == ["p.expand.trec"]


def test_seed_report_keeps_runs_and_timings(beir):
    from expandr_haystack.evaluation.protocol import evaluate_seeds

    report = evaluate_seeds(load_collection(beir, "test"), ["bm25"], seeds=[1, 2], progress_bar=False)
    assert len(report.runs["bm25"]) == 1 and set(report.runs["bm25"][0]) == {"1", "2", "3"}
    assert "bm25" in report.timings


def test_cli_expansion_with_seeds_writes_runs_per_seed_and_provenance(beir, tmp_path, monkeypatch, capsys):
    """The whole `expandr eval` path with expansions (a stand-in chat model instead of the LLM), two seeds."""
    from haystack import component
    from haystack.dataclasses import ChatMessage

    import expandr_haystack.components.expander as expander_module

    @component
    class Writer:
        @component.output_types(replies=list[ChatMessage])
        def run(self, messages: list[ChatMessage], generation_kwargs: dict | None = None):
            return {"replies": [ChatMessage.from_assistant("Heat conduction in composite slabs and shells.")]}

    real = expander_module.LLMQueryExpander
    built = []

    def with_writer(model=None, adapter=None, backend="auto", **kwargs):
        built.append(kwargs["cache"])
        return real(chat_generator=Writer(), **kwargs)

    monkeypatch.setattr(expander_module, "LLMQueryExpander", with_writer)
    llm = tmp_path / "llm"
    llm.mkdir()
    (llm / "config.json").write_text("{}")
    out, run = tmp_path / "res.json", tmp_path / "run.trec"
    rc = main(["eval", str(beir), "--methods", "dense,expand", "--seeds", "1,2", "--llm", str(llm), "--json", str(out),
               "--run-file", str(run), "--no-progress", "--n-expansions", "2", "--temperature", "0.7"])
    assert rc == 0, capsys.readouterr().err
    assert built == [str(tmp_path / "home" / "cache" / "expansions.sqlite")]
    names = sorted(p.name for p in tmp_path.glob("run.*.trec"))
    assert names == ["run.dense.trec", "run.expand.seed1.trec", "run.expand.seed2.trec"]
    prov = json.loads(out.read_text())["provenance"]
    assert prov["seeds"] == [1, 2] and prov["llm"]["path"] == str(llm)
    assert prov["llm"]["fingerprint"].startswith("local:") and prov["encoder"]["fingerprint"].startswith("local:")
    assert prov["generation"]["n_expansions"] == 2 and prov["generation"]["temperature"] == 0.7
    assert prov["adapter"] is None and "expansion" in prov["timings"]
    c = load_collection(beir, "test")
    written = json.loads(out.read_text())
    for seed in (0, 1):
        means, _ = evaluate_run(c.qrels, read_trec_run(tmp_path / f"run.expand.seed{seed + 1}.trec"))
        assert means["ndcg@10"] == pytest.approx(written["per_seed"]["expand"]["ndcg@10"][seed])
