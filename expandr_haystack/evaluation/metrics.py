"""Retrieval metrics through pytrec_eval: nDCG@10, Recall@100, MRR@10 over judged queries."""

from __future__ import annotations

from collections.abc import Sequence

from haystack import Document

METRICS = ("ndcg@10", "recall@100", "mrr@10")


def run_from_documents(query_ids: Sequence[str], results: Sequence[Sequence[Document]]) -> dict[str, dict[str, float]]:
    """A TREC run ``{query_id: {doc_id: score}}`` from ranked Haystack documents (rank order kept via scores)."""
    run = {}
    for qid, docs in zip(query_ids, results):
        # pytrec_eval sorts by score (ties by doc id); encode rank into the score so ties keep our order
        run[str(qid)] = {d.id: float(len(docs) - rank) for rank, d in enumerate(docs)}
    return run


def evaluate_run(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]
                 ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """
    Score a run against qrels over the judged queries (a judged query missing from the run scores 0).

    :returns: (means ``{"ndcg@10", "recall@100", "mrr@10", "queries"}``, per-query ``{qid: {metric: value}}``).
    """
    try:
        import pytrec_eval
    except ImportError as exc:  # pragma: no cover
        raise ImportError("Evaluation needs pytrec_eval: pip install 'expandr-haystack[eval]'.") from exc
    run = {q: run.get(q, {}) for q in qrels}
    measures = {"ndcg_cut.10", "recall.100", "recip_rank"}
    # MRR@10: reciprocal rank within the top 10 -> evaluate on the run cut to 10
    full = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    top10 = {q: dict(sorted(docs.items(), key=lambda x: (-x[1], x[0]))[:10]) for q, docs in run.items()}
    cut = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)
    per_query = {}
    for q in qrels:
        f = full.get(q, {})
        per_query[q] = {"ndcg@10": f.get("ndcg_cut_10", 0.0), "recall@100": f.get("recall_100", 0.0),
                        "mrr@10": cut.get(q, {}).get("recip_rank", 0.0)}
    n = len(per_query)
    means = {m: sum(v[m] for v in per_query.values()) / n if n else 0.0 for m in METRICS}
    means["queries"] = n
    return means, per_query
