"""`expandr_haystack.evaluation` and the `expandr eval` command line."""

import json
import re
import subprocess
import sys

import pytest

from expandr_haystack.cli import main
from expandr_haystack.evaluation import METHODS, EvalResult, evaluate, format_table, parse_methods, plot_metrics
from expandr_haystack.evaluation.cli import per_query_path
from expandr_haystack.evaluation.data import bundled_path, load_collection

QUERIES = [
    ("1", "what problems of heat conduction in composite slabs have been solved"),
    ("2", "similarity laws for aeroelastic models of heated aircraft"),
    ("3", "buckling of cylindrical shells under axial compression"),
    ("4", "a query without judgements"),
]
QRELS = "query-id\tcorpus-id\tscore\n1\td1\t2\n2\td2\t1\n2\td6\t1\n3\td4\t1\n3\tnot-in-corpus\t1\n"


@pytest.fixture()
def beir(write_beir):
    """A tiny BEIR folder: 6 documents, 3 judged queries, one judgement of a document missing from the corpus."""
    return write_beir(QUERIES, QRELS, splits=("test",))


def _check_shape(results, methods, queries):
    assert list(results) == list(methods)
    for row in results.values():
        assert set(row) == {"ndcg@10", "recall@100", "mrr@10", "queries"}
        assert row["queries"] == queries and isinstance(row["queries"], int)
        assert all(isinstance(row[m], float) and 0.0 <= row[m] <= 1.0 for m in ("ndcg@10", "recall@100", "mrr@10"))


# -- no model loading --------------------------------------------------------------------------------------------
def test_parse_methods():
    assert parse_methods("bm25, dense,bm25") == ["bm25", "dense"]
    assert parse_methods(("expand-rrf", "dense")) == ["expand-rrf", "dense"]
    with pytest.raises(ValueError, match=r"`methods`.*\[.sparse.\].*bm25, dense, prf, expand, expand-rrf, grounded"):
        parse_methods("bm25,sparse")
    with pytest.raises(ValueError, match="`methods` is empty"):
        parse_methods(" , ")


def test_evaluate_rejects_bad_arguments(beir):
    c = load_collection(beir, "test")
    with pytest.raises(ValueError, match="`methods`"):
        evaluate(c, methods=["bm25", "colbert"])
    with pytest.raises(TypeError, match="`collection`"):
        evaluate(str(beir), methods=["bm25"])
    with pytest.raises(ValueError, match="`query_weight`"):
        evaluate(c, methods=["expand"], query_weight=1.5)
    with pytest.raises(TypeError, match="`expansions`"):
        evaluate(c, methods=["expand"], expansions=[["a passage"]])


def test_bm25_evaluate(beir):
    c = load_collection(beir, "test")
    result = evaluate(c, methods="bm25", progress_bar=False)
    assert isinstance(result, EvalResult) and isinstance(result, dict)
    _check_shape(result, ["bm25"], 3)
    assert result.per_query["bm25"]["1"]["mrr@10"] == 1.0  # exact keyword match ranks first
    assert set(result.per_query["bm25"]) == {"1", "2", "3"}
    assert result.warnings and "1 judgement(s)" in result.warnings[0]
    assert result.expansions == {} and "bm25" in result.timings
    assert json.loads(json.dumps(result)) == result.metrics


def test_cli_bm25_json_plot_and_warning_count(beir, tmp_path, capsys):
    out = tmp_path / "out" / "res.json"
    plot = tmp_path / "out" / "res.png"
    rc = main(["eval", str(beir), "--methods", "bm25", "--json", str(out), "--plot", str(plot), "--no-progress"])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "nDCG@10" in stdout and "bm25" in stdout and "data warnings: 1" in stdout
    written = json.loads(out.read_text())
    _check_shape(written["methods"], ["bm25"], 3)
    assert written["expansion_failures"] == 0 and written["settings"]["query_weight"] == 0.5
    per_query = json.loads(per_query_path(out).read_text())
    assert per_query_path(out).name == "res.per_query.json"
    assert set(per_query["bm25"]) == {"1", "2", "3"}
    assert plot.stat().st_size > 1000


def test_format_table_and_plot(tmp_path):
    results = {"bm25": {"ndcg@10": 0.3445, "recall@100": 0.6671, "mrr@10": 0.5, "queries": 75},
               "dense": {"ndcg@10": 0.3904, "recall@100": 0.7536, "mrr@10": 0.6, "queries": 75}}
    table = format_table(results, title="t")
    assert "34.45" in table and "75.36" in table and table.splitlines()[0] == "t"
    assert plot_metrics(results, tmp_path / "p.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="empty"):
        plot_metrics({}, tmp_path / "q.png")


@pytest.mark.parametrize("setup,argv,match", [
    (None, ["eval", "{root}/nowhere"], r"nowhere does not exist"),
    (None, ["eval", "{root}", "--methods", "bm25,splade"], r"unknown method\(s\) \['splade'\].*valid"),
    (None, ["eval", "{root}", "--split", "dev"], r"dev\.tsv.*splits available: \['test'\]"),
    ("empty_split", ["eval", "{root}", "--methods", "bm25"], r"test\.tsv: split 'test' has no judged query"),
    ("bad_json", ["eval", "{root}", "--methods", "bm25"], r"corpus\.jsonl:7: not valid JSON"),
    ("no_queries", ["eval", "{root}", "--methods", "bm25"], r"Missing file .*queries\.jsonl"),
    (None, ["eval", "{root}", "--max-queries", "0"], r"--max-queries must be an integer >= 1"),
    (None, ["eval", "{root}", "--json", "{root}"], r"--json .*is a directory"),
])
def test_cli_errors_are_one_line(beir, capsys, monkeypatch, setup, argv, match):
    if setup == "empty_split":
        (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n")
    elif setup == "bad_json":
        with (beir / "corpus.jsonl").open("a") as f:
            f.write("\n{not json\n")
    elif setup == "no_queries":
        (beir / "queries.jsonl").unlink()
    rc = main([a.replace("{root}", str(beir)) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc == 1
    assert len(err.splitlines()) == 1 and err.startswith(f"expandr {argv[0]}: error: ")
    assert "Traceback" not in err
    assert re.search(match, err), err


def test_cli_usage_errors_exit_2(capsys):
    assert main(["eval"]) == 2
    assert main([]) == 2
    assert main(["eval", "x", "--n-expansions", "two"]) == 2
    capsys.readouterr()


def test_python_m_expandr_haystack_reports_errors_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "expandr_haystack", "eval", str(tmp_path / "missing")],
                          check=False, capture_output=True, text=True, timeout=120,
                          env={"HAYSTACK_TELEMETRY_ENABLED": "False", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("expandr eval: error: Collection folder")


# -- real bundled models ---------------------------------------------------------------------------------------
@pytest.mark.integration
def test_cli_bm25_and_dense(beir, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["eval", str(beir), "--methods", "bm25,dense", "--json", str(out), "--no-progress"]) == 0
    results = json.loads(out.read_text())["methods"]
    _check_shape(results, ["bm25", "dense"], 3)
    assert results["dense"]["mrr@10"] == 1.0  # every query's judged document is the obvious match
    assert "dense" in capsys.readouterr().out


@pytest.mark.integration
def test_expand_path_shares_expansions_store_and_cache(beir, tmp_path):
    from expandr_haystack import LLMQueryExpander
    from expandr_haystack.evaluation.indexing import build_document_store

    c = load_collection(beir, "test", max_queries=2)
    expander = LLMQueryExpander(generation={"max_new_tokens": 8}, cache=str(tmp_path / "cache.sqlite"))
    store = build_document_store(c.documents(), progress_bar=False)
    methods = ("dense", "expand", "expand-rrf")
    first = evaluate(c, methods, expander=expander, store=store, progress_bar=False)
    _check_shape(first, methods, 2)
    assert set(first.expansions) == {"1", "2"} and all(len(e) == 1 and e[0] for e in first.expansions.values())
    assert expander.cache_stats["misses"] == 2 and "index-dense" not in first.timings  # store reused
    second = evaluate(c, methods, expander=expander, store=store, progress_bar=False)
    assert expander.cache_stats["hits"] == 2 and expander.cache_stats["misses"] == 2  # rerun: no generation
    assert second.metrics == first.metrics and second.expansions == first.expansions


@pytest.mark.integration
def test_dense_parity_on_bundled_cranfield_test():
    """The bundled data README: all-MiniLM-L6-v2 zero-shot, no expansion: 39.04 nDCG@10 on Cranfield test."""
    c = load_collection(bundled_path("cranfield"), "test")
    result = evaluate(c, methods=["dense"], progress_bar=False)
    assert result["dense"]["queries"] == 75
    assert 100 * result["dense"]["ndcg@10"] == pytest.approx(39.04, abs=0.1)
    assert 100 * result["dense"]["recall@100"] == pytest.approx(75.36, abs=0.2)
    assert set(METHODS) >= set(result)
