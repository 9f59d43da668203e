"""
How a query and what stands beside it become one search: the ExpandR fused query vector (inference:
`ExpandRQueryEmbedder`; training: `FusedInfoNCELoss`), Rocchio pseudo-relevance feedback and reciprocal-rank fusion
(`ExpandRRetriever`). Pure numpy / torch / plain Python over vectors, ids and scores.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def unit(x):
    """`x / ||x||` along the last axis (numpy arrays and torch tensors; zero vectors stay zero)."""
    if isinstance(x, np.ndarray):
        return x / np.clip(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12, None)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def fuse(query_embedding, expansion_embeddings, query_weight: float = 0.5):
    """
    The ExpandR fused query vector.

        q~ = w * q^ + (1 - w) * mean_i e^_i        (x^ = x / ||x||)

    With one expansion and w = 0.5 this is the paper's mean of the normalised query and expansion embeddings;
    with several expansions the query keeps weight w however many there are. With no expansion q~ = q^.
    Works on numpy arrays and torch tensors alike (training uses the same function with gradients).

    :param query_embedding: shape (d,) or (batch, d).
    :param expansion_embeddings: shape (n, d) or (batch, n, d); n may be 0.
    :param query_weight: w in [0, 1].
    """
    query_unit = unit(query_embedding)
    if expansion_embeddings is None or expansion_embeddings.shape[-2] == 0:
        return query_unit
    expansion_mean = unit(expansion_embeddings).mean(-2)
    return query_weight * query_unit + (1.0 - query_weight) * expansion_mean


def rocchio(vectors, neighbours, feedback_weight: float):
    """
    Rocchio pseudo-relevance feedback: each search vector moved towards its top-k hits,

        v' = f * v^ + (1 - f) * mean_i d^_i        (f = `feedback_weight`)

    `fuse` with the hits' document vectors in place of the expansions; no hit (e.g. all filtered out) gives v^.

    :param vectors: shape (n, d), numpy.
    :param neighbours: for each vector its hits' document vectors, shape (k, d); k may be 0.
    :returns: shape (n, d), the dtype of `vectors`.
    """
    moved = np.empty_like(vectors)
    for i, hits in enumerate(neighbours):
        moved[i] = fuse(vectors[i], hits, feedback_weight)
    return moved


def reciprocal_rank_fusion(rankings: Iterable[Sequence[str]], k: int = 60, limit: int | None = None,
                           scale: bool = False) -> list[tuple[str, float]]:
    """
    Reciprocal-rank fusion of ranked id lists: score(d) = sum over the rankings holding d of 1 / (k + rank), best
    first (ties by id), at most `limit` of them.

    :param rankings: One ranked list of ids per search (rank 1 first).
    :param k: The RRF constant.
    :param scale: Divide each score by its maximum n / (k + 1) for n rankings (1 = first in every one).
    """
    scores: dict[str, float] = {}
    n = 0
    for ranking in rankings:
        n += 1
        for rank, doc_id in enumerate(ranking, start=1):
            scores[doc_id] = scores.get(doc_id, 0.0) + 1.0 / (k + rank)
    ranked = sorted(scores.items(), key=lambda x: (-x[1], x[0]))[:limit]
    if scale:
        factor = (k + 1) / n
        ranked = [(doc_id, score * factor) for doc_id, score in ranked]
    return ranked


__all__ = ["fuse", "reciprocal_rank_fusion", "rocchio", "unit"]
