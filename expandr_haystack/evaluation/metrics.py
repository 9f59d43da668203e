"""
Retrieval metrics through pytrec_eval.

- `beir_metrics`: exactly BEIR's numbers (``EvaluateRetrieval.evaluate`` for nDCG/MAP/Recall/P at k = 1, 3, 5, 10,
  100, 1000, and ``evaluate_custom(..., "mrr")`` for MRR@10), rounded to 5 decimals as BEIR rounds them, with BEIR's
  `ignore_identical_ids` (on by default: a hit whose document id equals the query id is dropped, which matters for
  ArguAna/Quora-style collections where queries are corpus documents). Keys as BEIR names them: ``"NDCG@10"``,
  ``"MAP@100"``, ``"Recall@100"``, ``"P@1"``, ``"MRR@10"``.
- `evaluate_run`: this package's headline metrics (nDCG@10, Recall@100, MRR@10) with per-query values, for the
  tables, paired tests and seed averages. The same definitions on the same run as BEIR's (identical ids dropped the
  same way), unrounded, averaged over every judged query (a judged query with no hit scores 0, where BEIR leaves
  it out of nDCG/MAP/Recall/P: the two agree whenever every judged query has a hit, as in `evaluate`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import pairwise
from pathlib import Path

from haystack import Document

METRICS = ("ndcg@10", "recall@100", "mrr@10")
#: BEIR's default cut-offs (`EvaluateRetrieval(k_values=...)`).
K_VALUES = (1, 3, 5, 10, 100, 1000)
#: The cut-offs of MRR reported with the BEIR metrics.
MRR_K_VALUES = (10,)


def run_from_documents(query_ids: Sequence[str], results: Sequence[Sequence[Document]]) -> dict[str, dict[str, float]]:
    """A TREC run ``{query_id: {doc_id: score}}`` from ranked Haystack documents (rank order kept via scores)."""
    run = {}
    for qid, docs in zip(query_ids, results):
        # pytrec_eval sorts by score (ties by doc id); encode rank into the score so ties keep our order
        run[str(qid)] = {d.id: float(len(docs) - rank) for rank, d in enumerate(docs)}
    return run


def drop_identical_ids(run: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """A copy of `run` without the hits whose document id equals their query id (BEIR's `ignore_identical_ids`)."""
    return {qid: {pid: score for pid, score in hits.items() if pid != qid} for qid, hits in run.items()}


def trec_run_lines(ranked: Mapping[str, Sequence[tuple[str, float | None]]], tag: str) -> list[str]:
    """
    TREC run lines ``qid Q0 docid rank score tag`` (rank from 1) of ``{query_id: [(doc_id, score), ...]}`` (best
    first), the format `trec_eval`, pytrec_eval and ranx read. Those tools re-sort each query by score (ties by doc
    id), so the retrievers' scores are written where they strictly decrease down the ranking; for a query where
    they do not (ties, or a hit without a score) the score column is ``n - rank + 1`` instead, which keeps exactly
    the evaluated order.
    """
    if not tag or any(c.isspace() for c in tag):
        raise ValueError(f"TREC run `tag` must be one word; got {tag!r}.")
    lines = []
    for qid, hits in ranked.items():
        scores = [None if s is None else float(s) for _, s in hits]
        if any(s is None for s in scores) or any(a <= b for a, b in pairwise(scores)):
            scores = [float(len(hits) - rank) for rank in range(len(hits))]
        for rank, ((doc_id, _), score) in enumerate(zip(hits, scores), start=1):
            if any(c.isspace() for c in str(qid) + str(doc_id)):
                raise ValueError(f"TREC runs cannot hold ids with whitespace: query {qid!r}, document {doc_id!r}.")
            lines.append(f"{qid} Q0 {doc_id} {rank} {score!r} {tag}")
    return lines


def write_trec_run(path: str | Path, ranked: Mapping[str, Sequence[tuple[str, float | None]]], tag: str) -> Path:
    """Write `trec_run_lines` to `path` (parent folders created, replaced atomically); returns the path."""
    from expandr_haystack.files import atomic_write_text

    return atomic_write_text(Path(path).expanduser(), "".join(line + "\n" for line in trec_run_lines(ranked, tag)))


def read_trec_run(path: str | Path) -> dict[str, dict[str, float]]:
    """A TREC run file as ``{query_id: {doc_id: score}}`` (the dict pytrec_eval and `beir_metrics` take)."""
    run: dict[str, dict[str, float]] = {}
    for n, line in enumerate(Path(path).expanduser().read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 6:
            raise ValueError(f"{path}:{n}: a TREC run line has 6 fields (qid Q0 docid rank score tag); got {line!r}.")
        qid, _, doc_id, _, score, _ = parts
        run.setdefault(qid, {})[doc_id] = float(score)
    return run


def _pytrec_eval():
    try:
        import pytrec_eval
    except ImportError as exc:  # pragma: no cover
        raise ImportError("Evaluation needs pytrec_eval: pip install 'expandr-haystack[eval]'.") from exc
    return pytrec_eval


def _mrr_per_query(qrels: Mapping[str, Mapping[str, int]], hits: Mapping[str, float], k: int) -> float:
    """BEIR's MRR@k of one query: hits sorted by score, descending, ties in the run's order (a stable sort)."""
    relevant = {d for d, grade in qrels.items() if grade > 0}
    ranked = sorted(hits.items(), key=lambda item: item[1], reverse=True)[:k]
    return next((1.0 / rank for rank, (doc_id, _) in enumerate(ranked, start=1) if doc_id in relevant), 0.0)


def beir_metrics(qrels: Mapping[str, Mapping[str, int]], run: Mapping[str, Mapping[str, float]],
                 k_values: Sequence[int] = K_VALUES, ignore_identical_ids: bool = True,
                 mrr_k_values: Sequence[int] = MRR_K_VALUES) -> dict[str, float]:
    """
    BEIR's metrics of a run, equal to ``EvaluateRetrieval.evaluate(qrels, run, k_values, ignore_identical_ids)``
    followed by ``EvaluateRetrieval.evaluate_custom(qrels, run, mrr_k_values, "mrr")`` (beir 2.2), without BEIR's
    side effects (it removes identical ids from the run it is given) or its need for torch.

    As in BEIR: nDCG/MAP/Recall/P are averaged over the queries pytrec_eval scores (judged queries with at least one
    hit); MRR over all judged queries, with ties broken by the run's order; every value is rounded to 5 decimals.

    :param qrels: ``{query_id: {doc_id: grade}}``.
    :param run: ``{query_id: {doc_id: score}}`` (not modified).
    :param k_values: Cut-offs for nDCG, MAP, Recall and P.
    :param ignore_identical_ids: Drop hits whose doc id equals the query id first (BEIR's default).
    :param mrr_k_values: Cut-offs for MRR.
    :returns: ``{"NDCG@k": ..., "MAP@k": ..., "Recall@k": ..., "P@k": ..., "MRR@k": ...}`` in that order.
    """
    run = drop_identical_ids(run) if ignore_identical_ids else {q: dict(h) for q, h in run.items()}
    ks = ",".join(str(k) for k in k_values)
    scores = _pytrec_eval().RelevanceEvaluator(
        {q: dict(j) for q, j in qrels.items()}, {f"map_cut.{ks}", f"ndcg_cut.{ks}", f"recall.{ks}", f"P.{ks}"}
    ).evaluate(run)
    out: dict[str, float] = {}
    for label, measure in (("NDCG", "ndcg_cut"), ("MAP", "map_cut"), ("Recall", "recall"), ("P", "P")):
        for k in k_values:
            total = sum(scores[q][f"{measure}_{k}"] for q in scores)
            out[f"{label}@{k}"] = round(total / len(scores), 5) if scores else 0.0
    judged = [q for q in run if q in qrels]  # BEIR's mrr fails on a run query without qrels; we leave it out
    for k in mrr_k_values:
        total = sum(_mrr_per_query(qrels[q], run[q], k) for q in judged)
        out[f"MRR@{k}"] = round(total / len(qrels), 5) if qrels else 0.0
    return out


def evaluate_run(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]],
                 ignore_identical_ids: bool = True) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """
    Score a run against qrels over the judged queries (a judged query missing from the run scores 0).

    :param ignore_identical_ids: Drop hits whose doc id equals the query id first, as BEIR does by default.
    :returns: (means ``{"ndcg@10", "recall@100", "mrr@10", "queries"}``, per-query ``{qid: {metric: value}}``).
    """
    pytrec_eval = _pytrec_eval()
    run = {q: run.get(q, {}) for q in qrels}
    if ignore_identical_ids:
        run = drop_identical_ids(run)
    full = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100"}).evaluate(run)
    per_query = {}
    for q, judged in qrels.items():
        f = full.get(q, {})
        per_query[q] = {"ndcg@10": f.get("ndcg_cut_10", 0.0), "recall@100": f.get("recall_100", 0.0),
                        "mrr@10": _mrr_per_query(judged, run[q], 10)}
    n = len(per_query)
    means = {m: sum(v[m] for v in per_query.values()) / n if n else 0.0 for m in METRICS}
    means["queries"] = n
    return means, per_query


__all__ = ["K_VALUES", "METRICS", "MRR_K_VALUES", "beir_metrics", "drop_identical_ids", "evaluate_run",
           "read_trec_run", "run_from_documents", "trec_run_lines", "write_trec_run"]
