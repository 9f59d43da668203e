"""BEIR-comparable evaluation: BEIR's own numbers on the same run, BEIR's data loader, BEIR dataset names."""

import copy
import json
import random

import pytest

from expandr_haystack.evaluation.data import DataError, bundled_path, load_collection
from expandr_haystack.evaluation.metrics import K_VALUES, beir_metrics, evaluate_run


def _synthetic():
    """Graded qrels and a run with tied scores, identical-id hits (one of them relevant), a judged query without
    hits, a judged query without relevant documents, and one query deep enough for the @1000 cut-offs."""
    rng = random.Random(7)
    docs = [f"d{i}" for i in range(1300)]
    qrels = {
        "q1": {"d1": 2, "d2": 1, "d7": 0},
        "q2": {"d3": 1, "q2": 1},            # the query's own id is judged relevant: ignore_identical_ids drops it
        "d5": {"d5": 1, "d6": 2, "d9": 1},   # a query id that is also a document id (ArguAna/Quora style)
        "q4": {"d10": 1},                    # judged, but no hit at all
        "q5": {"d11": 0, "d12": 0},          # judged, no relevant document
        "q6": {d: 1 for d in rng.sample(docs, 40)},
    }
    run = {
        "q1": {"d7": 3.0, "d1": 2.0, "d9": 2.0, "d2": 2.0, "d4": 1.0},     # ties among d1, d9, d2
        "q2": {"q2": 5.0, "d8": 1.0, "d3": 1.0, "d4": 0.5},                # identical id on top; tie d8/d3
        "d5": {"d5": 0.9, "d9": 0.9, "d6": 0.8, "d1": 0.8, "d2": 0.1},
        "q5": {"d11": 1.0, "d13": 1.0},
        "q6": {d: round(rng.random(), 2) for d in rng.sample(docs, 1200)},  # 2-decimal scores: many ties
    }
    return qrels, run


def _beir(qrels, run, ignore_identical_ids=True):
    from beir.retrieval.evaluation import EvaluateRetrieval

    run = copy.deepcopy(run)  # BEIR pops identical ids from the run it is given, then MRR reads that same run
    ndcg, _map, recall, precision = EvaluateRetrieval.evaluate(qrels, run, list(K_VALUES),
                                                               ignore_identical_ids=ignore_identical_ids)
    mrr = EvaluateRetrieval.evaluate_custom(qrels, run, [10], metric="mrr")
    return {**ndcg, **_map, **recall, **precision, **mrr}


@pytest.mark.parametrize("ignore_identical_ids", [True, False])
def test_metrics_equal_beir_evaluate(ignore_identical_ids):
    qrels, run = _synthetic()
    before = copy.deepcopy(run)
    ours = beir_metrics(qrels, run, ignore_identical_ids=ignore_identical_ids)
    assert run == before  # unlike BEIR, the run is not modified
    expected = _beir(qrels, run, ignore_identical_ids)
    assert ours == expected  # identical keys, identical (rounded) values
    assert list(ours) == list(expected)
    assert len(ours) == 4 * len(K_VALUES) + 1


def test_identical_ids_matter_on_the_synthetic_run():
    qrels, run = _synthetic()
    dropped, kept = beir_metrics(qrels, run), beir_metrics(qrels, run, ignore_identical_ids=False)
    assert dropped["NDCG@10"] != kept["NDCG@10"] and dropped["MRR@10"] != kept["MRR@10"]


def test_headline_metrics_are_beirs_unrounded():
    qrels, run = _synthetic()
    del qrels["q4"]  # every judged query has a hit: both average over the same queries
    expected = _beir(qrels, run)
    means, per_query = evaluate_run(qrels, run)
    assert round(means["ndcg@10"], 5) == expected["NDCG@10"]
    assert round(means["recall@100"], 5) == expected["Recall@100"]
    assert round(means["mrr@10"], 5) == expected["MRR@10"]
    assert per_query["q2"]["mrr@10"] == 0.5  # q2 itself dropped; the tie d8/d3 keeps the run's order
    kept, _ = evaluate_run(qrels, run, ignore_identical_ids=False)
    assert round(kept["ndcg@10"], 5) == _beir(qrels, run, ignore_identical_ids=False)["NDCG@10"]


@pytest.mark.parametrize("split", ["test", "train"])
def test_loader_reads_what_beirs_generic_data_loader_reads(split):
    from beir.datasets.data_loader import GenericDataLoader

    corpus, queries, qrels = GenericDataLoader(data_folder=str(bundled_path("cranfield"))).load(split=split)
    ours = load_collection(bundled_path("cranfield"), split=split)
    assert ours.corpus == corpus
    assert ours.queries == queries
    assert ours.qrels == qrels
    assert not ours.warnings


def _tiny_beir(root, name="scifact"):
    folder = root / name
    (folder / "qrels").mkdir(parents=True)
    docs = [("d1", "Nozzles", "flow separation in overexpanded rocket nozzles with thin walls"),
            ("d2", "Shells", "buckling of thin cylindrical shells under axial compression"),
            ("d3", "Flutter", "swept wings flutter at transonic speeds")]
    (folder / "corpus.jsonl").write_text("\n".join(json.dumps({"_id": i, "title": t, "text": x}) for i, t, x in docs))
    # query "d2" is (like in ArguAna) the text of document d2; its relevant document is d1
    queries = [("q1", "flow separation in rocket nozzles"), ("d2", "buckling of thin cylindrical shells")]
    (folder / "queries.jsonl").write_text("\n".join(json.dumps({"_id": i, "text": q}) for i, q in queries))
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nd2\td1\t1\n")
    return folder


def test_beir_name_downloads_once_through_beir_util(tmp_path, monkeypatch):
    from beir import util

    calls = []

    def fake_download(url, out_dir, chunk_size=1024):
        calls.append(url)
        return str(_tiny_beir(tmp_path / "server" / str(len(calls))))  # what download_and_unzip returns

    monkeypatch.setenv("EXPANDR_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(util, "download_and_unzip", fake_download)
    c = load_collection("scifact", "test")
    assert calls == ["https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/scifact.zip"]
    assert c.path == tmp_path / "home" / "beir" / "scifact" and len(c.corpus) == 3
    assert load_collection("scifact", "test").queries == c.queries and len(calls) == 1  # cached: no second download


def test_beir_name_offline_says_what_to_do(tmp_path, monkeypatch, capsys):
    import requests
    from beir import util

    from expandr_haystack.cli import main

    def offline(url, out_dir, chunk_size=1024):
        raise requests.exceptions.ConnectionError("Failed to resolve 'public.ukp.informatik.tu-darmstadt.de'")

    monkeypatch.setenv("EXPANDR_HOME", str(tmp_path))
    monkeypatch.setattr(util, "download_and_unzip", offline)
    with pytest.raises(DataError) as info:
        load_collection("scifact")
    message = str(info.value)
    cache = tmp_path / "beir"
    assert "Offline?" in message and "scifact.zip" in message and "ConnectionError" in message
    assert str(cache / "scifact" / "corpus.jsonl") in message and "expandr eval /path/to/scifact" in message
    assert list(cache.iterdir()) == []  # nothing half-written left behind

    assert main(["eval", "scifact", "--methods", "bm25"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("expandr eval: error: Could not download the BEIR dataset 'scifact'") and "Offline?" in err


def test_unknown_name_lists_bundled_and_beir_names():
    with pytest.raises(DataError, match=r"No bundled collection or BEIR dataset 'scifakt'.*cranfield.*scifact"):
        load_collection("scifakt")


def test_eval_json_keeps_its_keys_and_adds_beirs(tmp_path):
    from expandr_haystack.cli import main

    folder = _tiny_beir(tmp_path)
    out = tmp_path / "out.json"
    assert main(["eval", str(folder), "--methods", "bm25", "--json", str(out), "--no-progress"]) == 0
    payload = json.loads(out.read_text())
    assert set(payload["methods"]["bm25"]) == {"ndcg@10", "recall@100", "mrr@10", "queries"}
    assert {"settings", "expansion_failures"} <= set(payload)
    assert payload["settings"]["ignore_identical_ids"] is True and payload["settings"]["depth"] == 100
    beir = payload["beir"]["bm25"]
    assert set(beir) == {f"{m}@{k}" for m in ("NDCG", "MAP", "Recall", "P") for k in (1, 3, 5, 10, 100)} | {"MRR@10"}
    assert beir["NDCG@10"] == round(payload["methods"]["bm25"]["ndcg@10"], 5)
    # query d2 retrieves document d2 first: dropped by default (BEIR), scored with --keep-identical-ids
    per_query = json.loads((tmp_path / "out.per_query.json").read_text())["bm25"]
    assert per_query["d2"]["mrr@10"] == 1.0
    kept = tmp_path / "kept.json"
    assert main(["eval", str(folder), "--methods", "bm25", "--json", str(kept), "--no-progress",
                 "--keep-identical-ids"]) == 0
    assert json.loads((tmp_path / "kept.per_query.json").read_text())["bm25"]["d2"]["mrr@10"] == 0.5
    assert json.loads(kept.read_text())["settings"]["ignore_identical_ids"] is False
