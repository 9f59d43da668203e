"""
The embedded exact index of `ExpandRRetriever` (`DocumentIndex`: FAISS inner product over unit document vectors)
and the O(1) change signal of an `InMemoryDocumentStore` that tells the retriever when to rebuild it
(`count_writes`: every write and delete through any store instance sharing the index bumps a counter).

Usage:
```python
index = DocumentIndex(documents, dimension=384)
scores, rows = index.search(query_vectors, k=10)
```
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from haystack import Document

logger = logging.getLogger(__name__)


class DocumentIndex:
    """
    An exact inner-product index over L2-normalised document embeddings (cosine similarity).

    Uses FAISS (`IndexFlatIP`; on the GPU when faiss-gpu is installed and `device` is a CUDA device) and falls back
    to numpy when FAISS is missing.
    """

    def __init__(self, documents: list[Document], dimension: int, device: str = "cpu"):
        missing = [d.id for d in documents if d.embedding is None]
        if missing:
            raise ValueError(
                f"{len(missing)} document(s) in the document store have no embedding (e.g. id {missing[0]!r}); "
                "embed them first with SentenceTransformersDocumentEmbedder and the retriever's encoder (if the store "
                "has them but does not return them, pass its embedding retriever as `retriever=` instead).")
        bad = next((d for d in documents if len(d.embedding) != dimension), None)
        if bad is not None:
            raise ValueError(
                f"Document {bad.id!r} has an embedding of dimension {len(bad.embedding)} but the retriever's encoder "
                f"produces {dimension}: embed the documents with the same `model` as the retriever.")
        self.documents = documents
        self.row_of = {d.id: i for i, d in enumerate(documents)}
        matrix = np.asarray([d.embedding for d in documents], dtype=np.float32).reshape(len(documents), dimension)
        matrix /= np.clip(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12, None)
        self.matrix = np.ascontiguousarray(matrix)
        self._faiss = None
        try:
            import faiss

            index = faiss.IndexFlatIP(dimension)
            if device.startswith("cuda") and hasattr(faiss, "StandardGpuResources"):
                index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), int(device.split(":")[-1] or 0)
                                               if ":" in device else 0, index)
            index.add(self.matrix)
            self._faiss = index
        except ImportError:  # pragma: no cover - faiss is a core dependency
            logger.warning("faiss is not installed: using numpy brute-force search.")

    def search(self, queries: np.ndarray, k: int, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, rows) for each query vector; `rows` limits the search to a subset (filters)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if rows is not None:
            sub = self.matrix[rows]
            k = min(k, len(rows))
            scores = queries @ sub.T
            top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            return np.take_along_axis(scores, top, 1), rows[top]
        k = min(k, len(self.documents))
        if self._faiss is not None:
            return self._faiss.search(queries, k)
        scores = queries @ self.matrix.T
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, top, 1), top


class _CountingStorage(dict):
    """
    The storage dict of an `InMemoryDocumentStore` with a counter bumped by every write and delete, so that the FAISS
    index notices documents replaced in place (same ids, same count) in O(1) per query. It replaces the store's
    storage dict once (`count_writes`); writes through any store instance sharing the index go through it.
    """

    __slots__ = ("writes",)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.writes = 0

    def __setitem__(self, key, value):
        self.writes += 1
        super().__setitem__(key, value)

    def __delitem__(self, key):
        self.writes += 1
        super().__delitem__(key)

    def __ior__(self, other):
        self.writes += 1
        return super().__ior__(other)

    def pop(self, *args):
        self.writes += 1
        return super().pop(*args)

    def popitem(self):
        self.writes += 1
        return super().popitem()

    def clear(self):
        self.writes += 1
        super().clear()

    def update(self, *args, **kwargs):
        self.writes += 1
        super().update(*args, **kwargs)

    def setdefault(self, key, default=None):
        self.writes += 1
        return super().setdefault(key, default)


def count_writes(store: Any) -> _CountingStorage | None:
    """
    The `_CountingStorage` of an `InMemoryDocumentStore` (installed on first use in place of its storage dict: the
    process-wide one of a shared index, or the instance's own), or None for other stores or when the store's layout
    is not the one known here.
    """
    storage = getattr(store, "storage", None)
    if isinstance(storage, _CountingStorage):
        return storage
    if not isinstance(storage, dict):
        return None
    shared = getattr(store, "_shared", None)
    if shared is True:
        from haystack.document_stores.in_memory import document_store as in_memory

        storages = getattr(in_memory, "_STORAGES", None)
        if not isinstance(storages, dict) or storages.get(getattr(store, "index", None)) is not storage:
            return None
        storages[store.index] = counting = _CountingStorage(storage)
    elif shared is False and vars(store).get("_local_storage") is storage:
        store._local_storage = counting = _CountingStorage(storage)
    else:
        return None
    return counting if store.storage is counting else None


def same_state(a: Any, b: Any) -> bool:
    """Whether two `ExpandRRetriever._store_state` values describe the same store contents."""
    if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b) == 2 and isinstance(a[0], dict):
        return a[0] is b[0] and a[1] == b[1]  # the same storage object (held here, so never a recycled id)
    return a == b


__all__ = ["DocumentIndex", "count_writes", "same_state"]
