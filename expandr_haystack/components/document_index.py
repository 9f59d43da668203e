"""
The embedded exact index of `ExpandRRetriever` (`DocumentIndex`: FAISS inner product over unit document vectors),
and one such index per document store, shared by every retriever over it (`shared_index`): built on first use,
rebuilt when the store's documents change.

Change detection, with nothing of the store replaced or patched:
- a store with an in-memory `storage` dict (`InMemoryDocumentStore`; instances sharing an index share the dict, and
  share one index here): the index is current while the dict holds, in order, the very `Document` objects it was
  built from (a C-speed identity scan, ~30 ns a document per search call: far below the exact search itself). Every
  write, overwrite (a new object), delete and `delete_all_documents` (a new dict), through any instance, shows;
  a `Document` mutated in place without being written again does not (it is the same object the index returns);
- any other store: its document count (call `ExpandRRetriever.refresh_index(force=True)` after replacing documents
  in place there).

Usage:
```python
index = DocumentIndex(documents, dimension=384)
scores, rows = index.search(query_vectors, k=10)
current = shared_index(store, dimension=384, device="cpu").current()   # the same object for every caller
```
"""

from __future__ import annotations

import logging
import operator
import threading
import weakref
from typing import Any

import numpy as np
from haystack import Document

logger = logging.getLogger(__name__)


def has_embedding(document: Document) -> bool:
    """Whether a stored document carries an embedding (some stores return an empty one, e.g. Qdrant's ``{}``)."""
    return document.embedding is not None and len(document.embedding) > 0


def dimension_error(subject: str, found: int, dimension: int) -> ValueError:
    """The error of embeddings of another size than the encoder's: `subject` says whose ("Document 'a' has an
    embedding")."""
    return ValueError(f"{subject} of dimension {found} but the retriever's encoder produces {dimension}: embed the "
                      "documents with the same `model` as the retriever.")


def check_embeddings(documents: list[Document], dimension: int, store: str = "the document store",
                     hint: str = "") -> None:
    """
    The checks of stored documents before they are searched: every one has an embedding of the encoder's
    `dimension`; else a ValueError naming a document (and `store`, where they live) and the fix (`hint` adds why it
    matters there). Used by `DocumentIndex` and, for a wrapped retriever's store, `search.StoreCheck`.
    """
    missing = [d.id for d in documents if not has_embedding(d)]
    if missing:
        raise ValueError(f"{len(missing)} document(s) in {store} have no embedding (e.g. id {missing[0]!r}); embed "
                         f"them first with SentenceTransformersDocumentEmbedder and the retriever's encoder{hint}.")
    bad = next((d for d in documents if len(d.embedding) != dimension), None)
    if bad is not None:
        raise dimension_error(f"Document {bad.id!r} has an embedding", len(bad.embedding), dimension)


class DocumentIndex:
    """
    An exact inner-product index over L2-normalised document embeddings (cosine similarity).

    Uses FAISS (`IndexFlatIP`; on the GPU when faiss-gpu is installed and `device` is a CUDA device) and falls back
    to numpy when FAISS is missing.
    """

    def __init__(self, documents: list[Document], dimension: int, device: str = "cpu"):
        check_embeddings(documents, dimension, hint=" (if the store has them but does not return them, pass its "
                         "embedding retriever as `retriever=` instead)")
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


class SharedIndex:
    """
    The `DocumentIndex` of one document store (one storage dict for InMemory stores sharing an index) for one
    dimension and device, and the state it was built from. Made by `shared_index`; alive while a retriever holds it.
    """

    def __init__(self, store: Any, source: Any, dimension: int, device: str):
        self.store = store
        self.source = source  # the storage dict, or the store: held, so its id (the registry key) is never reused
        self.dimension = dimension
        self.device = device
        self.index: DocumentIndex | None = None
        self.builds = 0
        self._count: int | None = None
        self._lock = threading.Lock()

    def current(self, force: bool = False) -> DocumentIndex:
        """The index of the store's documents now: (re)built when they changed since the last build, or `force`."""
        with self._lock:
            if force or self.index is None or not self._unchanged():
                documents = _stored_documents(self.store, self.source)
                if not documents:
                    raise ValueError("The document store is empty: index documents (with embeddings) before "
                                     "retrieving.")
                self.index = DocumentIndex(documents, self.dimension, self.device)
                self._count = None if isinstance(self.source, dict) else len(documents)
                self.builds += 1
            return self.index

    def _unchanged(self) -> bool:
        """Whether the store still holds, in order, the very Document objects the index was built from. Haystack's
        InMemoryDocumentStore has no change counter, so this reads the storage once: O(n) pointer comparisons,
        a small fraction of the exact search that follows it (which reads n x dimension floats)."""
        built = self.index.documents
        if isinstance(self.source, dict):
            storage = self.source
            return len(storage) == len(built) and all(map(operator.is_, storage.values(), built))
        return self.store.count_documents() == self._count


_INDEXES: weakref.WeakValueDictionary[tuple, SharedIndex] = weakref.WeakValueDictionary()
_REGISTRY_LOCK = threading.Lock()


def storage_of(store: Any) -> dict | None:
    """An in-memory store's `storage` dict (InMemoryDocumentStore's public property), else None."""
    storage = getattr(store, "storage", None)
    return storage if isinstance(storage, dict) else None


def _stored_documents(store: Any, source: Any) -> list[Document]:
    if isinstance(source, dict):  # InMemoryDocumentStore: the stored objects (with embeddings), no copies
        return list(source.values())
    return store.filter_documents()


def shared_index(store: Any, dimension: int, device: str) -> SharedIndex:
    """
    The `SharedIndex` of `store`'s documents for `dimension` and `device`: one per storage (InMemory stores sharing
    an index share it, as every retriever over one store does). The caller keeps it (the registry holds it weakly)
    and asks again per search: a store whose storage was replaced (`delete_all_documents`) gets a new one.
    """
    storage = storage_of(store)
    source = store if storage is None else storage
    key = (id(source), dimension, device)
    with _REGISTRY_LOCK:
        entry = _INDEXES.get(key)
        if entry is None or entry.source is not source:
            entry = _INDEXES[key] = SharedIndex(store, source, dimension, device)
    return entry


__all__ = ["DocumentIndex", "SharedIndex", "check_embeddings", "dimension_error", "has_embedding", "shared_index",
           "storage_of"]
