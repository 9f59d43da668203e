"""
`StoreCheck`: the FAISS path's checks of stored documents, for the document store of a wrapped retriever
(`search.RetrieverSearch`), redone only when the store changed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from haystack import Document

from expandr_haystack.components.document_index import check_embeddings, dimension_error, has_embedding, storage_of

logger = logging.getLogger(__name__)


class StoreCheck:
    """
    The FAISS path's checks of stored documents (`document_index.check_embeddings`: every document embedded, at the
    encoder's dimension) for the document store of a wrapped retriever (its `document_store`), which would otherwise
    skip unembedded documents silently (an empty result) or fail deep inside its client on a dimension mismatch.

    Cheap: redone only when the store changed, seen through its storage dict (InMemoryDocumentStore: its identity
    and size, no I/O) or `count_documents()` (one call a search; a store replaced in place with as many documents is
    not re-read; a store of more than `READ_LIMIT` documents is counted once). A change reads the documents (the
    storage itself, or `filter_documents()` for stores of at most `READ_LIMIT` documents) and a declared
    `embedding_dim` / `embedding_dimension`. Hits without a score beside scored ones are documents without an
    embedding (pgvector). A store that returns documents without embeddings, which some stores do even when they
    hold them, is trusted only once a search without filters finds nothing: that is the silent empty result. A
    store that cannot be read (no `document_store`, no count, a failing call) is not checked.
    """

    #: Larger stores (by `count_documents`) are not read to check them (~0.1 s for 1,000 documents of Qdrant's local
    #: mode, at every change); their declared `embedding_dim` still is.
    READ_LIMIT = 1_000

    def __init__(self, retriever: Any):
        # `document_store` (Haystack's retrievers) or `_document_store` (the integrations': Qdrant, pgvector, ...)
        self.store = getattr(retriever, "document_store", None) or getattr(retriever, "_document_store", None)
        self.name = f"the document store of the wrapped retriever ({type(retriever).__name__})"
        self._checked: tuple | None = None  # (store state, dimension) of the last check that passed
        self._unembedded: list[Document] = []  # read, none with an embedding, in a store that may hide them
        self._storage: dict | None = None  # the storage dict last seen, held so that its id is not reused

    def _state(self) -> tuple | None:
        storage = storage_of(self.store)
        if storage is not None:
            self._storage = storage
            return "storage", id(storage), len(storage)
        count = getattr(self.store, "count_documents", None)
        return ("count", count()) if callable(count) else None

    def _read(self, state: tuple, read: Any) -> list[Document] | None:
        """The documents to check: the storage's, or `read()` (filter_documents) for small stores; None = too many."""
        if state[0] == "storage":
            return list(storage_of(self.store).values())
        return [] if state[1] == 0 else read() if state[1] <= self.READ_LIMIT else None

    def _settled(self, dimension: int) -> bool:
        """Checked already, as a store too large to read: counting it again (a full COUNT(*) on PostgreSQL, 5-40 ms
        at 100,000 rows) could only lead back to its declared dimension, which does not change."""
        return self._checked is not None and self._checked[1] == dimension and self._checked[0][0] == "count" \
            and self._checked[0][1] > self.READ_LIMIT

    def check(self, dimension: int) -> None:
        """Check the store for query vectors of `dimension` if it changed since the last check (ValueError if bad)."""
        if self.store is None or self._settled(dimension):
            return
        try:
            state = self._state()
            if state is None or (state, dimension) == self._checked:
                return
            documents = self._read(state, getattr(self.store, "filter_documents", lambda: None))
        except Exception as exc:  # noqa: BLE001 - a store that cannot be read is not checked
            logger.debug("%s: not checked (%s: %s)", self.name, type(exc).__name__, exc)
            return
        self._judge(state, dimension, documents)

    async def check_async(self, dimension: int) -> None:
        """`check` through the store's async methods where it has them (its async client may hold other data, as
        Qdrant's local mode does)."""
        count = getattr(self.store, "count_documents_async", None)
        if self.store is None or self._settled(dimension) or storage_of(self.store) is not None:
            return self.check(dimension)  # the storage dict: nothing to wait for
        if not callable(count):
            return await asyncio.to_thread(self.check, dimension)
        read = getattr(self.store, "filter_documents_async", None)
        try:
            state = ("count", await count())
            if (state, dimension) == self._checked:
                return
            n = state[1]
            documents = [] if n == 0 else await read() if callable(read) and n <= self.READ_LIMIT else None
        except Exception as exc:  # noqa: BLE001 - a store that cannot be read is not checked
            logger.debug("%s: not checked (%s: %s)", self.name, type(exc).__name__, exc)
            return
        self._judge(state, dimension, documents)

    def _judge(self, state: tuple, dimension: int, documents: list[Document] | None) -> None:
        """The checks of what `check` read (a ValueError when they fail); the state is remembered when they pass."""
        self._unembedded = []
        if documents:
            if state[0] == "storage" or any(map(has_embedding, documents)):  # the documents as they are stored
                check_embeddings(documents, dimension, self.name, _SKIPPED)
            else:
                self._unembedded = documents
        for name in ("embedding_dim", "embedding_dimension"):  # Qdrant, Elasticsearch, ...; pgvector
            declared = getattr(self.store, name, None)
            if isinstance(declared, int) and not isinstance(declared, bool) and declared != dimension:
                raise dimension_error(f"{self.name[0].upper()}{self.name[1:]} is set up (`{name}`) for embeddings",
                                      declared, dimension)
        self._checked = (state, dimension)

    def after_search(self, hits: list[list[Document]], filters: Any, dimension: int) -> list[list[Document]]:
        """`hits` as they are, unless they show documents without embeddings (the no-embedding error): hits without a
        score after scored ones, or in a store read without embeddings (pgvector returns unembedded rows, their
        similarity NULL, after the others; a store that scores nothing, e.g. Weaviate with a dot-product collection,
        is not judged by this unless its documents came back without embeddings), or nothing found
        without filters in a store whose documents came back without embeddings."""
        unscored = list({d.id: d for found in hits if self._unembedded or any(d.score is not None for d in found)
                         for d in found if d.score is None and d.embedding is None}.values())
        if unscored:  # all of the store's unembedded documents where it was read, else those found
            check_embeddings(self._unembedded or unscored, dimension, self.name, _UNSCORED)
        if self._unembedded and not filters and not any(hits):
            check_embeddings(self._unembedded, dimension, self.name, _SKIPPED)
        return hits


_SKIPPED = " (the wrapped retriever skips documents without one: its searches miss them, or find nothing)"
_UNSCORED = " (the wrapped retriever returned them without a score, ranked after every embedded document)"


__all__ = ["StoreCheck"]
