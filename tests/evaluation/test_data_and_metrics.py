import json

import pytest

from expandr_haystack.evaluation.data import DataError, bundled_path, load_collection
from expandr_haystack.evaluation.metrics import evaluate_run


def _write(root, corpus, queries, qrels_text, split="test"):
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text("\n".join(json.dumps(d) for d in corpus))
    (root / "queries.jsonl").write_text("\n".join(json.dumps(q) for q in queries))
    (root / "qrels" / f"{split}.tsv").write_text(qrels_text)


def test_bundled_cranfield_split_sizes():
    test = load_collection(bundled_path("cranfield"), "test")
    train = load_collection(bundled_path("cranfield"), "train")
    assert len(test.corpus) == 1400
    assert (len(train.queries), len(test.queries)) == (150, 75)
    assert not set(train.queries) & set(test.queries)


def test_loads_with_and_without_header_int_ids_and_empty_title(tmp_path):
    corpus = [{"_id": 1, "title": "", "text": "a"}, {"_id": "2", "text": "b"}]
    queries = [{"_id": 7, "text": "q"}]
    for header in ("query-id\tcorpus-id\tscore\n", ""):
        root = tmp_path / f"h{len(header)}"
        _write(root, corpus, queries, header + "7\t1\t1\n7\t2\t0\n")
        c = load_collection(root, "test")
        assert c.queries == {"7": "q"}
        assert c.qrels == {"7": {"1": 1, "2": 0}}
        assert c.corpus["2"]["title"] == ""
        assert c.relevant("7") == ["1"]


def test_unknown_doc_in_qrels_is_warned_and_counted(tmp_path):
    _write(tmp_path, [{"_id": "1", "text": "a"}], [{"_id": "q", "text": "q"}], "q\t1\t1\nq\tnope\t1\n")
    c = load_collection(tmp_path, "test")
    assert c.qrels == {"q": {"1": 1}}
    assert any("1 judgement(s)" in w for w in c.warnings)


def test_missing_split_names_the_file(tmp_path):
    _write(tmp_path, [{"_id": "1", "text": "a"}], [{"_id": "q", "text": "q"}], "q\t1\t1\n", split="train")
    with pytest.raises(DataError, match=r"test\.tsv.*train"):
        load_collection(tmp_path, "test")


def test_bad_json_line_names_file_and_line(tmp_path):
    _write(tmp_path, [{"_id": "1", "text": "a"}], [{"_id": "q", "text": "q"}], "q\t1\t1\n")
    with (tmp_path / "corpus.jsonl").open("a") as f:
        f.write("\n{broken\n")
    with pytest.raises(DataError, match=r"corpus\.jsonl:2"):
        load_collection(tmp_path, "test")


def test_empty_split_is_an_error(tmp_path):
    _write(tmp_path, [{"_id": "1", "text": "a"}], [{"_id": "q", "text": "q"}], "query-id\tcorpus-id\tscore\n")
    with pytest.raises(DataError, match="no judged query"):
        load_collection(tmp_path, "test")


def test_metrics_by_hand():
    qrels = {"a": {"d1": 1}, "b": {"d2": 1}}
    run = {"a": {"d1": 2.0, "d3": 1.0}, "b": {"d3": 2.0, "d2": 1.0}}
    means, per_query = evaluate_run(qrels, run)
    assert per_query["a"]["mrr@10"] == 1.0 and per_query["b"]["mrr@10"] == 0.5
    assert per_query["b"]["ndcg@10"] == pytest.approx(1 / 1.5849625, rel=1e-5)
    assert means["recall@100"] == 1.0 and means["queries"] == 2


def test_judged_query_missing_from_run_scores_zero():
    means, per_query = evaluate_run({"a": {"d1": 1}, "b": {"d2": 1}}, {"a": {"d1": 1.0}})
    assert per_query["b"]["ndcg@10"] == 0.0 and means["ndcg@10"] == 0.5
