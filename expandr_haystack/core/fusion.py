"""The ExpandR fused query vector (inference: `ExpandRQueryEmbedder`; training: `FusedInfoNCELoss`)."""

from __future__ import annotations

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


__all__ = ["fuse", "unit"]
