"""
The search paths of `ExpandRRetriever` behind one interface: `search(vectors, top_k, filters, scale_score,
return_embedding)` -> one scored hit list per vector (`list[list[Document]]`), `search_async` the same for async
code, and `neighbours(vectors, k, filters)` -> the unit vectors of each vector's top-k hits (pseudo-relevance
feedback). The retriever picks one at init (`make_search`) and never branches on the path again.

- `FaissSearch`: an exact FAISS index of a document store's documents, one per store (`document_index.shared_index`).
- `StoreSearch`: the store's own `embedding_retrieval` (InMemoryDocumentStore).
- `RetrieverSearch`: any Haystack embedding retriever (`run(query_embedding, filters, top_k)`), with the FAISS
  path's checks of the documents behind it (`StoreCheck`: embeddings present, of the encoder's dimension), redone
  only when its document store changed.

Inputs are trusted: the retriever checks them once, at its edge.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from haystack import Document
from haystack.utils import ComponentDevice

from expandr_haystack.checks import check_choice
from expandr_haystack.components.document_index import (
    DocumentIndex,
    SharedIndex,
    shared_index,
)
from expandr_haystack.components.store_check import StoreCheck
from expandr_haystack.models import resolve_device

logger = logging.getLogger(__name__)

#: The `search` settings of a retriever over a `document_store`.
SEARCHES = ("faiss", "store")


class Search:
    """One search path (see the module docstring)."""

    def search(self, vectors: np.ndarray, top_k: int, filters: dict[str, Any] | None, scale_score: bool,
               return_embedding: bool) -> list[list[Document]]:
        raise NotImplementedError

    async def search_async(self, vectors: np.ndarray, top_k: int, filters: dict[str, Any] | None,
                           scale_score: bool, return_embedding: bool) -> list[list[Document]]:
        """`search` on a worker thread (synchronous CPU/GPU work, off the event loop)."""
        return await asyncio.to_thread(self.search, vectors, top_k, filters, scale_score, return_embedding)

    def neighbours(self, vectors: np.ndarray, k: int, filters: dict[str, Any] | None) -> list[np.ndarray]:
        """For each vector the document vectors of its top-k hits, shape (hits, dimension)."""
        return [self._vectors_of(hits, vectors.shape[1]) for hits in self.search(vectors, k, filters, False, True)]

    async def neighbours_async(self, vectors: np.ndarray, k: int, filters: dict[str, Any] | None) -> list[np.ndarray]:
        return await asyncio.to_thread(self.neighbours, vectors, k, filters)

    def _vectors_of(self, hits: list[Document], dimension: int) -> np.ndarray:
        embedded = [d.embedding for d in hits if d.embedding is not None]
        if hits and not embedded:
            raise ValueError(f"Pseudo-relevance feedback (`feedback_k`) needs the hits' embeddings, and {self} "
                             "returned none.")
        return np.asarray(embedded, dtype=np.float32).reshape(len(embedded), dimension)

    def refresh_index(self, force: bool = False) -> DocumentIndex:
        raise ValueError(f"`refresh_index` needs `document_store` with search='faiss'; this retriever uses {self}.")

    def warm_up(self) -> None:
        """Nothing to load (a wrapped retriever warms up its own)."""

    async def warm_up_async(self) -> None:
        self.warm_up()

    def close(self) -> None:
        """Nothing to release (a wrapped retriever releases its own)."""

    async def close_async(self) -> None:
        self.close()


class FaissSearch(Search):
    """An exact FAISS index of `store`'s documents, shared with every retriever over the same store."""

    def __init__(self, store: Any, dimension: Callable[[], int], device: ComponentDevice | None):
        self.store = store
        self._dimension = dimension  # the encoder's (loads it): asked on the first search
        self._device = device
        self._key: tuple[int, str] | None = None
        self._shared: SharedIndex | None = None  # held here: the registry keeps it only while a retriever does

    def __str__(self) -> str:
        return "the FAISS index"

    def refresh_index(self, force: bool = False) -> DocumentIndex:
        """The index of the store's documents now ((re)built when they changed, or `force`)."""
        if self._key is None:
            self._key = (self._dimension(), resolve_device(self._device))
        self._shared = shared_index(self.store, *self._key)
        return self._shared.current(force)

    def _hits(self, vectors: np.ndarray, top_k: int, filters) -> tuple[DocumentIndex, list[list[tuple]]]:
        """The index, and for each vector its (score, row) pairs, best first."""
        index = self.refresh_index()
        subset = None
        if filters:
            allowed = [index.row_of[d.id] for d in self.store.filter_documents(filters=filters)
                       if d.id in index.row_of]
            if not allowed:
                return index, [[] for _ in vectors]
            subset = np.asarray(sorted(allowed))
        scores, rows = index.search(vectors, top_k, subset)
        return index, [[(s, r) for s, r in zip(srow, hrow) if r >= 0]
                       for srow, hrow in zip(scores.tolist(), rows.tolist())]

    def search(self, vectors, top_k, filters, scale_score, return_embedding) -> list[list[Document]]:
        """Scored shallow copies of the stored documents; scores the inner product with the unit document vector
        ((s + 1) / 2 with `scale_score`)."""
        index, hits = self._hits(vectors, top_k, filters)
        documents = index.documents
        if scale_score:
            return [[with_score(documents[r], (s + 1.0) / 2.0, return_embedding) for s, r in row] for row in hits]
        return [[with_score(documents[r], s, return_embedding) for s, r in row] for row in hits]

    def neighbours(self, vectors, k, filters) -> list[np.ndarray]:
        """The index's own unit rows (no document copies)."""
        index, hits = self._hits(vectors, k, filters)
        return [index.matrix[[r for _, r in row]] for row in hits]


class StoreSearch(Search):
    """The store's own `embedding_retrieval` (its scores and scaling)."""

    def __init__(self, store: Any):
        self.store = store

    def __str__(self) -> str:
        return f"{type(self.store).__name__}.embedding_retrieval"

    def search(self, vectors, top_k, filters, scale_score, return_embedding) -> list[list[Document]]:
        return [self.store.embedding_retrieval(query_embedding=v.tolist(), filters=filters, top_k=top_k,
                                               scale_score=scale_score, return_embedding=return_embedding)
                for v in vectors]


class RetrieverSearch(Search):
    """Any Haystack embedding retriever, called once per vector (async: concurrently, through its `run_async`
    where it has one)."""

    def __init__(self, retriever: Any):
        self.retriever = retriever
        self._params = embedding_retriever_params(retriever)
        self.check = StoreCheck(retriever)

    def __str__(self) -> str:
        return f"the wrapped retriever ({type(self.retriever).__name__})"

    def _kwargs(self, top_k: int, filters, scale_score: bool, return_embedding: bool) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"filters": filters, "top_k": top_k}
        for name, value in (("scale_score", scale_score), ("return_embedding", return_embedding)):
            if self._params is None or name in self._params:
                kwargs[name] = value
        if scale_score and "scale_score" not in kwargs:
            raise scale_score_error(self.retriever)
        return kwargs

    def search(self, vectors, top_k, filters, scale_score, return_embedding) -> list[list[Document]]:
        self.check.check(vectors.shape[1])
        kwargs = self._kwargs(top_k, filters, scale_score, return_embedding)
        hits = [documents_of(self.retriever.run(query_embedding=v.tolist(), **kwargs), return_embedding)
                for v in vectors]
        return self.check.after_search(hits, filters, vectors.shape[1])

    async def search_async(self, vectors, top_k, filters, scale_score, return_embedding) -> list[list[Document]]:
        from haystack.utils.async_utils import _execute_component_async

        await self.check.check_async(vectors.shape[1])
        kwargs = self._kwargs(top_k, filters, scale_score, return_embedding)
        results = await asyncio.gather(*(_execute_component_async(self.retriever, query_embedding=v.tolist(),
                                                                  **kwargs) for v in vectors))
        return self.check.after_search([documents_of(r, return_embedding) for r in results], filters,
                                       vectors.shape[1])

    async def neighbours_async(self, vectors, k, filters) -> list[np.ndarray]:
        hits = await self.search_async(vectors, k, filters, False, True)
        return [self._vectors_of(h, vectors.shape[1]) for h in hits]

    def warm_up(self) -> None:
        if hasattr(self.retriever, "warm_up"):
            self.retriever.warm_up()

    async def warm_up_async(self) -> None:
        if hasattr(self.retriever, "warm_up_async"):
            await self.retriever.warm_up_async()
        else:
            self.warm_up()

    def close(self) -> None:
        if hasattr(self.retriever, "close"):
            self.retriever.close()

    async def close_async(self) -> None:
        if hasattr(self.retriever, "close_async"):
            await self.retriever.close_async()
        else:
            self.close()


def scale_score_error(retriever: Any) -> ValueError:
    return ValueError(f"`scale_score=True`: the wrapped retriever ({type(retriever).__name__}) takes no "
                      "`scale_score`, so its scores stay its own (e.g. pgvector's cosine similarity, Chroma's "
                      "distance). Leave scale_score=False, or use fusion='rrf' (scores scaled to [0, 1] by ExpandR).")


def check_search(document_store: Any, retriever: Any, search: Any, scale_score: bool = False) -> None:
    """The checks of a retriever's `document_store`, `retriever` and `search` settings (errors name them);
    `scale_score`: scores scaled by the search (mean fusion), which a wrapped retriever must then take."""
    if (document_store is None) == (retriever is None):
        raise ValueError("Pass exactly one of `document_store` (FAISS index of a store) or `retriever` (any "
                         f"Haystack embedding retriever); got {'both' if document_store is not None else 'neither'}.")
    check_choice(search, "search", SEARCHES)
    if retriever is not None:
        if search != "faiss":
            raise ValueError("`search` applies to `document_store`; with `retriever` leave it at 'faiss'.")
        params = embedding_retriever_params(retriever)
        if scale_score and params is not None and "scale_score" not in params:
            raise scale_score_error(retriever)
        return
    if not all(hasattr(document_store, m) for m in ("filter_documents", "count_documents", "to_dict")):
        raise TypeError(f"`document_store` must be a Haystack DocumentStore; got {type(document_store).__name__}.")
    if search == "store" and not hasattr(document_store, "embedding_retrieval"):
        raise ValueError(f"`search='store'` needs a document store with `embedding_retrieval`; "
                         f"{type(document_store).__name__} has none. Use search='faiss', or pass `retriever=` (the "
                         "store's embedding retriever) instead of `document_store`.")


def make_search(document_store: Any, retriever: Any, search: str, dimension: Callable[[], int],
                device: ComponentDevice | None) -> Search:
    """The search path of a retriever's settings (checked by `check_search`)."""
    if retriever is not None:
        return RetrieverSearch(retriever)
    return FaissSearch(document_store, dimension, device) if search == "faiss" else StoreSearch(document_store)


def embedding_retriever_params(retriever: Any) -> frozenset[str] | None:
    """The keyword arguments a wrapped retriever's `run` takes (None: it takes **kwargs); TypeError if it is not an
    embedding retriever."""
    run = getattr(retriever, "run", None)
    if not callable(run):
        raise TypeError(f"`retriever` must be a Haystack embedding retriever (a component with "
                        f"`run(query_embedding, filters, top_k)`); got {type(retriever).__name__}.")
    params = inspect.signature(run).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    if not {"query_embedding", "filters", "top_k"} <= set(params):
        raise TypeError(f"`retriever` must be an embedding retriever whose `run` takes `query_embedding`, `filters` "
                        f"and `top_k` (as Haystack's EmbeddingRetriever protocol); {type(retriever).__name__}.run "
                        f"takes {', '.join(params)}.")
    return frozenset(params)


def documents_of(result: Any, return_embedding: bool) -> list[Document]:
    """A wrapped retriever's `documents`, without embeddings unless asked for."""
    docs = list((result or {}).get("documents") or [])
    if not return_embedding:
        docs = [with_score(d, d.score, False) if d.embedding is not None else d for d in docs]
    return docs


def with_score(document: Document, score: float | None, keep_embedding: bool = True) -> Document:
    """
    A shallow copy of a stored document with `score` set (and `embedding` dropped unless `keep_embedding`), equal to
    ``dataclasses.replace(document, score=score)`` (the same fields, `meta` shared as `replace` shares it) but about
    10x cheaper: `replace` re-runs `Document.__init__`/`__post_init__` (id hashing) for every hit of every query.
    """
    scored = object.__new__(type(document))
    scored.__dict__.update(document.__dict__)
    scored.__dict__["score"] = score
    if not keep_embedding:
        scored.__dict__["embedding"] = None
    return scored


__all__ = ["SEARCHES", "FaissSearch", "RetrieverSearch", "Search", "StoreCheck", "StoreSearch", "check_search",
           "make_search", "with_score"]
