"""ExpandRRetriever: dense retrieval with an ExpandR fused query (or reciprocal-rank fusion of expansions)."""

from __future__ import annotations

import asyncio
import copy
import inspect
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from haystack import Document, component, default_from_dict, default_to_dict
from haystack.core.errors import DeserializationError
from haystack.core.serialization import component_to_dict
from haystack.document_stores.types import DocumentStore, FilterPolicy, apply_filter_policy
from haystack.utils import ComponentDevice

from expandr_haystack.checks import check_choice, check_int, check_number
from expandr_haystack.components.document_index import DocumentIndex, count_writes, same_state
from expandr_haystack.components.embedder import ExpandRQueryEmbedder
from expandr_haystack.core.fusion import fuse
from expandr_haystack.core.text import check_expansions, check_query, clean_text
from expandr_haystack.models import resolve_device

logger = logging.getLogger(__name__)

FUSIONS = ("mean", "rrf")
BACKENDS = ("faiss", "store")


@component
class ExpandRRetriever:
    """
    Retrieves documents for a query and its LLM expansions with a dense encoder, as in ExpandR.

    - `fusion="mean"`: one search with the ExpandR fused vector (via `ExpandRQueryEmbedder`).
    - `fusion="rrf"`: one search with the query and one with each expansion, merged by reciprocal rank
      (score = sum 1 / (rrf_k + rank)).
    - `feedback_k > 0` (mean fusion): Rocchio pseudo-relevance feedback, a second search with
      v' = f * v^ + (1 - f) * mean(top-k document vectors) — the corpus-grounded baseline that needs no LLM.
    Without expansions it is plain dense retrieval. Scores: mean fusion, the inner product of the fused vector with
    the unit document vector, w * cos(q, d) + (1 - w) * mean_i cos(e_i, d) (plain cosine without expansions; with a
    wrapped `retriever`, its own score for the fused vector, e.g. Qdrant's cosine); rrf, the RRF score. The first
    retrieval of a grounded pipeline is this component too (`top_k=3`, no expansions), its `documents` wired to
    `LLMQueryExpander(prompt=GROUNDED_PROMPT).documents`.

    Where the documents live (one of):
    - `document_store=`: the FAISS backend (default) keeps an exact FAISS index of the store's documents, rebuilt
      when they change; `backend="store"` calls the store's own `embedding_retrieval` (InMemoryDocumentStore).
    - `retriever=`: any Haystack embedding retriever (`run(query_embedding, filters, top_k)`), queried with the fused
      vector (rrf: once per query and expansion vector), e.g. `QdrantEmbeddingRetriever`,
      `ElasticsearchEmbeddingRetriever`, `PgvectorEmbeddingRetriever`, `InMemoryEmbeddingRetriever`.

    Documents must already carry embeddings from the same encoder, e.g. written by Haystack's
    `SentenceTransformersDocumentEmbedder(model=<same path>)`.

    Usage:
    ```python
    from haystack import Pipeline
    from haystack.document_stores.in_memory import InMemoryDocumentStore
    from expandr_haystack import LLMQueryExpander, ExpandRRetriever

    store = InMemoryDocumentStore()   # filled by an indexing pipeline, see examples/
    p = Pipeline()
    p.add_component("expander", LLMQueryExpander())
    p.add_component("retriever", ExpandRRetriever(document_store=store))
    # or: ExpandRRetriever(retriever=QdrantEmbeddingRetriever(document_store=QdrantDocumentStore(...)))
    p.connect("expander.query", "retriever.query")
    p.connect("expander.expansions", "retriever.expansions")
    docs = p.run({"expander": {"query": "what similarity laws must be obeyed ..."}})["retriever"]["documents"]
    ```
    """

    def __init__(
        self,
        document_store: DocumentStore | None = None,
        model: str | None = None,
        top_k: int = 10,
        fusion: str = "mean",
        query_weight: float = 0.5,
        rrf_k: int = 60,
        rrf_depth: int = 100,
        backend: str = "faiss",
        device: ComponentDevice | None = None,
        batch_size: int = 32,
        progress_bar: bool = False,
        query_embedder: ExpandRQueryEmbedder | None = None,
        feedback_k: int = 0,
        feedback_weight: float = 0.7,
        *,
        retriever: Any | None = None,
        filters: dict[str, Any] | None = None,
        filter_policy: str | FilterPolicy = FilterPolicy.REPLACE,
        scale_score: bool = False,
        return_embedding: bool = False,
    ):
        """
        :param document_store: A Haystack document store holding embedded documents (searched through an exact FAISS
            index, or its `embedding_retrieval` with `backend="store"`). Pass this or `retriever`.
        :param model: The encoder (None = bundled all-MiniLM-L6-v2); must be the one that embedded the documents.
        :param top_k: Documents returned (>= 1).
        :param fusion: "mean" (ExpandR fused vector) or "rrf" (reciprocal-rank fusion of separate searches).
        :param query_weight: Query weight in the fused vector (mean fusion), in [0, 1].
        :param rrf_k: The k constant of reciprocal-rank fusion.
        :param rrf_depth: Hits taken from each search before RRF.
        :param backend: With `document_store`: "faiss" (own exact index) or "store" (the store's
            `embedding_retrieval`). Not used with `retriever`.
        :param device: Device for the encoder (and the FAISS index with faiss-gpu).
        :param batch_size: Texts encoded together.
        :param progress_bar: Show progress bars for batched retrieval.
        :param query_embedder: An `ExpandRQueryEmbedder` to embed queries with (shared with other components);
            None builds one from `model`, `query_weight`, `device`, `batch_size`. When given, its encoder and device
            are used, and `query_weight` here is the weight this retriever fuses with.
        :param feedback_k: Rocchio pseudo-relevance feedback (mean fusion): 0 = off; k > 0 searches once, then again
            with v' = f·v̂ + (1-f)·mean(top-k document vectors), f = `feedback_weight`, where v is the (fused) query
            vector. A corpus-grounded baseline that needs no LLM, and combines with expansions. With `retriever`,
            the first search asks it for the hits' embeddings (`return_embedding=True`).
        :param feedback_weight: f above, in [0, 1].
        :param retriever: Any Haystack embedding retriever (a component whose `run` takes `query_embedding`,
            `filters`, `top_k`), queried with the fused vector (rrf: one search per query and expansion vector,
            `rrf_depth` hits each). Pass this or `document_store`. Its own `filters` and `filter_policy` apply to the
            filters this component passes it.
        :param filters: Haystack metadata filters applied to every search, combined with `run`'s `filters` by
            `filter_policy`.
        :param filter_policy: `FilterPolicy.REPLACE` (default: `run`'s filters, when given, replace the init
            filters) or `FilterPolicy.MERGE` (both apply); the string "replace" / "merge" works too.
        :param scale_score: Scale scores to [0, 1]: mean fusion, (s + 1) / 2 of the cosine-type score (the store's own
            scaling with `retriever` or `backend="store"`); rrf, the RRF score divided by its maximum
            n / (rrf_k + 1) for n searches (1 = first in every search).
        :param return_embedding: Return the documents with their embeddings (False: `embedding=None`, as Haystack's
            retrievers do by default).
        """
        if (document_store is None) == (retriever is None):
            raise ValueError("Pass exactly one of `document_store` (FAISS index of a store) or `retriever` (any "
                             "Haystack embedding retriever); got "
                             f"{'both' if document_store is not None else 'neither'}.")
        check_choice(fusion, "fusion", FUSIONS)
        check_choice(backend, "backend", BACKENDS)
        if document_store is not None:
            if not all(hasattr(document_store, m) for m in ("filter_documents", "count_documents", "to_dict")):
                raise TypeError(f"`document_store` must be a Haystack DocumentStore; got "
                                f"{type(document_store).__name__}.")
            if backend == "store" and not hasattr(document_store, "embedding_retrieval"):
                raise ValueError(f"`backend='store'` needs a document store with `embedding_retrieval`; "
                                 f"{type(document_store).__name__} has none. Use backend='faiss', or pass "
                                 "`retriever=` (the store's embedding retriever) instead of `document_store`.")
            self._retriever_params: frozenset[str] | None = None
        else:
            if backend != "faiss":
                raise ValueError("`backend` applies to `document_store`; with `retriever` leave it at 'faiss'.")
            self._retriever_params = _embedding_retriever_params(retriever)
        check_int(top_k, "top_k")
        check_int(rrf_k, "rrf_k")
        check_int(rrf_depth, "rrf_depth")
        check_number(query_weight, "query_weight", 0.0, 1.0)
        check_int(feedback_k, "feedback_k", minimum=0)
        check_number(feedback_weight, "feedback_weight", 0.0, 1.0)
        if filters is not None and not isinstance(filters, dict):
            raise TypeError(f"`filters` must be a Haystack filter dict or None; got {type(filters).__name__}.")
        if isinstance(filter_policy, str):
            filter_policy = FilterPolicy.from_str(filter_policy)
        if not isinstance(filter_policy, FilterPolicy):
            raise TypeError(f"`filter_policy` must be a FilterPolicy or 'replace'/'merge'; got {filter_policy!r}.")
        if query_embedder is not None:
            if not isinstance(query_embedder, ExpandRQueryEmbedder):
                raise TypeError(f"`query_embedder` must be an ExpandRQueryEmbedder or None; got "
                                f"{type(query_embedder).__name__}.")
            if model is not None and model != query_embedder.model:
                raise ValueError(f"`model` ({model!r}) differs from `query_embedder.model` "
                                 f"({query_embedder.model!r}): pass one of them.")
        self.document_store = document_store
        self.retriever = retriever
        self.model = model
        self.top_k = top_k
        self.fusion = fusion
        self.query_weight = float(query_weight)
        self.rrf_k = rrf_k
        self.rrf_depth = rrf_depth
        self.backend = backend
        self.device = device  # None = best available (keeps YAML portable)
        self.batch_size = batch_size
        self.progress_bar = progress_bar
        self.query_embedder = query_embedder
        self.feedback_k = feedback_k
        self.feedback_weight = float(feedback_weight)
        self.filters = filters
        self.filter_policy = filter_policy
        self.scale_score = bool(scale_score)
        self.return_embedding = bool(return_embedding)
        self.embedder = query_embedder or ExpandRQueryEmbedder(model=model, query_weight=query_weight,
                                                               device=self.device, batch_size=batch_size,
                                                               progress_bar=progress_bar)
        self._index: DocumentIndex | None = None
        self._index_state: Any = None

    def to_dict(self) -> dict[str, Any]:
        """Serialize to a dictionary (the document store, a wrapped `retriever` and a passed `query_embedder` with
        their own `to_dict`)."""
        return default_to_dict(
            self, document_store=self.document_store, model=self.model, top_k=self.top_k, fusion=self.fusion,
            query_weight=self.query_weight, rrf_k=self.rrf_k, rrf_depth=self.rrf_depth, backend=self.backend,
            device=self.device, batch_size=self.batch_size, progress_bar=self.progress_bar,
            query_embedder=self.query_embedder, feedback_k=self.feedback_k, feedback_weight=self.feedback_weight,
            retriever=None if self.retriever is None else component_to_dict(obj=self.retriever, name="retriever"),
            filters=self.filters, filter_policy=self.filter_policy.value, scale_score=self.scale_score,
            return_embedding=self.return_embedding,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExpandRRetriever:
        """Deserialize from a dictionary made by `to_dict` (the input is not modified). Nested components and stores
        are imported through Haystack's deserialization allow-list."""
        params = data.get("init_parameters", {})
        store, retriever = params.get("document_store"), params.get("retriever")
        if not any(isinstance(x, dict) and "type" in x for x in (store, retriever)):
            raise DeserializationError("`document_store` or `retriever` must be a serialized document store / "
                                       "embedding retriever with a 'type' key.")
        if isinstance(retriever, dict):  # some retrievers' from_dict replace entries of their dict in place
            data = {**data, "init_parameters": {**params, "retriever": copy.deepcopy(retriever)}}
        return default_from_dict(cls, data)

    def warm_up(self) -> None:
        """Load the encoder (and warm up a wrapped `retriever`); idempotent. A FAISS index is (re)built lazily on the
        first search after the store changes."""
        self.embedder.warm_up()
        if self.retriever is not None and hasattr(self.retriever, "warm_up"):
            self.retriever.warm_up()

    async def warm_up_async(self) -> None:
        """`warm_up` on the serving event loop (a wrapped retriever's `warm_up_async` where it has one)."""
        self.embedder.warm_up()
        if hasattr(self.retriever, "warm_up_async"):
            await self.retriever.warm_up_async()
        elif hasattr(self.retriever, "warm_up"):
            self.retriever.warm_up()

    def close(self) -> None:
        """Release a wrapped retriever's resources (e.g. its store's client); `Pipeline.close` calls this."""
        if hasattr(self.retriever, "close"):
            self.retriever.close()

    async def close_async(self) -> None:
        """Release a wrapped retriever's async resources (`close_async` where it has one, else `close`)."""
        if hasattr(self.retriever, "close_async"):
            await self.retriever.close_async()
        elif hasattr(self.retriever, "close"):
            self.retriever.close()

    # -- index ---------------------------------------------------------------------------------------------
    def _store_state(self) -> Any:
        """
        An O(1) fingerprint of the store's documents: for an InMemoryDocumentStore its storage dict and write counter
        (every write and delete, through any instance sharing the index, bumps it); else the document count.
        """
        counting = count_writes(self.document_store)
        if counting is not None:
            return (counting, counting.writes)
        storage = getattr(self.document_store, "storage", None)
        if isinstance(storage, dict):  # an InMemory layout unknown here: the last written entry and the count
            last = next(reversed(storage), None)
            return (id(storage), len(storage), last, id(storage.get(last)))
        return self.document_store.count_documents()

    def _stored_documents(self) -> list[Document]:
        storage = getattr(self.document_store, "storage", None)
        if isinstance(storage, dict):  # InMemoryDocumentStore: the stored objects (with embeddings), no copies
            return list(storage.values())
        return self.document_store.filter_documents()

    def refresh_index(self, force: bool = False) -> DocumentIndex:
        """(Re)build the FAISS index when the store's documents changed since the last build (or when `force`)."""
        if self.document_store is None:
            raise ValueError("`refresh_index` needs `document_store`: this retriever wraps a `retriever`.")
        state = self._store_state()
        if force or self._index is None or not same_state(state, self._index_state):
            docs = self._stored_documents()
            if not docs:
                raise ValueError("The document store is empty: index documents (with embeddings) before retrieving.")
            self._index = DocumentIndex(docs, self.embedder.dimension, resolve_device(self.device))
            self._index_state = state
        return self._index

    # -- run -----------------------------------------------------------------------------------------------
    @component.output_types(documents=list[Document])
    def run(
        self,
        query: str,
        expansions: list[str] | None = None,
        top_k: int | None = None,
        filters: dict[str, Any] | None = None,
        scale_score: bool | None = None,
        return_embedding: bool | None = None,
    ) -> dict[str, Any]:
        """
        Retrieve documents for one query.

        :param query: The query.
        :param expansions: Its LLM expansions (None or [] = plain dense retrieval).
        :param top_k: Overrides the init `top_k`.
        :param filters: Haystack metadata filters, combined with the init `filters` by `filter_policy`.
        :param scale_score: Overrides the init `scale_score`.
        :param return_embedding: Overrides the init `return_embedding`.
        :returns: `documents`, best first, each with `score`.
        """
        query, expansions = _check_run_inputs(query, expansions)
        overrides = _given(scale_score=scale_score, return_embedding=return_embedding)
        return {"documents": self.retrieve([query], [expansions], top_k=top_k, filters=filters, **overrides)[0]}

    @component.output_types(documents=list[Document])
    async def run_async(
        self,
        query: str,
        expansions: list[str] | None = None,
        top_k: int | None = None,
        filters: dict[str, Any] | None = None,
        scale_score: bool | None = None,
        return_embedding: bool | None = None,
    ) -> dict[str, Any]:
        """
        `run` for async pipelines: the encoder (and a FAISS search) run on a worker thread; a wrapped `retriever` is
        called through its `run_async` where it has one (rrf: its searches concurrently).
        """
        query, expansions = _check_run_inputs(query, expansions)
        docs = await self.retrieve_async([query], [expansions], top_k=top_k, filters=filters,
                                         scale_score=scale_score, return_embedding=return_embedding)
        return {"documents": docs[0]}

    def retrieve(
        self,
        queries: Sequence[str],
        expansions: Sequence[Sequence[str]] | None = None,
        top_k: int | None = None,
        filters: dict[str, Any] | None = None,
        fusion: str | None = None,
        query_weight: float | None = None,
        feedback_k: int | None = None,
        feedback_weight: float | None = None,
        scale_score: bool | None = None,
        return_embedding: bool | None = None,
    ) -> list[list[Document]]:
        """
        Batched `run`: one encode call for all queries and expansions, one index search (two with feedback).

        :param fusion: Overrides the init `fusion` for this call ("mean" or "rrf").
        :param query_weight: Overrides the init `query_weight` for this call (mean fusion).
        :param feedback_k: Overrides the init `feedback_k` for this call (mean fusion).
        :param feedback_weight: Overrides the init `feedback_weight` for this call.
        """
        plan = self._plan(queries, expansions, top_k, filters, fusion, query_weight, feedback_k, feedback_weight,
                          scale_score, return_embedding)
        vectors = self._vectors(plan)
        if plan.feedback_k:
            hits = self._search(vectors, plan.feedback_k, plan.filters, False, True, rows=True)
            vectors = self._feedback(vectors, hits, plan.feedback_weight)
        hits = self._search(vectors, plan.depth, plan.filters, plan.scale_score and plan.fusion == "mean",
                            plan.return_embedding, rows=plan.fusion == "rrf")
        return self._finish(plan, hits)

    async def retrieve_async(
        self,
        queries: Sequence[str],
        expansions: Sequence[Sequence[str]] | None = None,
        top_k: int | None = None,
        filters: dict[str, Any] | None = None,
        fusion: str | None = None,
        query_weight: float | None = None,
        feedback_k: int | None = None,
        feedback_weight: float | None = None,
        scale_score: bool | None = None,
        return_embedding: bool | None = None,
    ) -> list[list[Document]]:
        """`retrieve` for async code (see `run_async`)."""
        if self.retriever is None:  # encoder + FAISS: synchronous CPU/GPU work, off the event loop
            return await asyncio.to_thread(self.retrieve, queries, expansions, top_k, filters, fusion, query_weight,
                                           feedback_k, feedback_weight, scale_score, return_embedding)
        plan = self._plan(queries, expansions, top_k, filters, fusion, query_weight, feedback_k, feedback_weight,
                          scale_score, return_embedding)
        vectors = await asyncio.to_thread(self._vectors, plan)
        if plan.feedback_k:
            hits = await self._search_retriever_async(vectors, plan.feedback_k, plan.filters, False, True)
            vectors = self._feedback(vectors, hits, plan.feedback_weight)
        hits = await self._search_retriever_async(vectors, plan.depth, plan.filters,
                                                  plan.scale_score and plan.fusion == "mean", plan.return_embedding)
        return self._finish(plan, hits)

    def search(self, embeddings: Any, top_k: int | None = None, filters: dict[str, Any] | None = None,
               scale_score: bool | None = None, return_embedding: bool | None = None) -> list[list[Document]]:
        """
        Documents for precomputed query vectors (e.g. `ExpandRQueryEmbedder.embed_fused`), one list per vector: the
        search step of `retrieve` with mean fusion.

        :param embeddings: Array-like of shape (n, dimension) (or one vector).
        """
        vectors = np.asarray(embeddings, dtype=np.float32)
        vectors = vectors.reshape(1, -1) if vectors.ndim == 1 else vectors
        return self._search(vectors, check_int(self.top_k if top_k is None else top_k, "top_k"),
                            apply_filter_policy(self.filter_policy, self.filters, filters),
                            self.scale_score if scale_score is None else bool(scale_score),
                            self.return_embedding if return_embedding is None else bool(return_embedding))

    # -- steps -----------------------------------------------------------------------------------------------
    def _plan(self, queries, expansions, top_k, filters, fusion, query_weight, feedback_k, feedback_weight,
              scale_score, return_embedding) -> _Plan:
        """Checked inputs and the settings of one `retrieve` call."""
        if isinstance(queries, str) or not isinstance(queries, Sequence):
            raise TypeError(f"`queries` must be a list of strings; got {type(queries).__name__}.")
        queries = [check_query(q, f"queries[{i}]") for i, q in enumerate(queries)]
        if expansions is None:
            expansions = [[] for _ in queries]
        else:
            bad = next((i for i, e in enumerate(expansions) if isinstance(e, str)), None)
            if bad is not None:
                raise TypeError(f"`expansions[{bad}]` must be a list of strings, one list per query; got a str.")
            if len(expansions) != len(queries):
                raise ValueError(f"`expansions` must have one list per query ({len(queries)}); "
                                 f"got {len(expansions)}.")
            expansions = [[clean_text(e) for e in check_expansions(list(e or []), f"expansions[{i}]") if e.strip()]
                          for i, e in enumerate(expansions)]
        plan = _Plan()
        plan.queries, plan.expansions = queries, expansions
        plan.top_k = check_int(self.top_k if top_k is None else top_k, "top_k")
        plan.fusion = check_choice(self.fusion if fusion is None else fusion, "fusion", FUSIONS)
        plan.query_weight = check_number(self.query_weight if query_weight is None else query_weight,
                                         "query_weight", 0.0, 1.0)
        plan.feedback_k = 0
        if plan.fusion == "mean":
            plan.feedback_k = check_int(self.feedback_k if feedback_k is None else feedback_k, "feedback_k", minimum=0)
        plan.feedback_weight = check_number(self.feedback_weight if feedback_weight is None else feedback_weight,
                                            "feedback_weight", 0.0, 1.0)
        plan.filters = apply_filter_policy(self.filter_policy, self.filters, filters)
        plan.scale_score = self.scale_score if scale_score is None else bool(scale_score)
        plan.return_embedding = self.return_embedding if return_embedding is None else bool(return_embedding)
        plan.depth = plan.top_k if plan.fusion == "mean" else max(self.rrf_depth, plan.top_k)
        return plan

    def _vectors(self, plan: _Plan) -> np.ndarray:
        """The search vectors: one fused vector per query (mean), or the query and each expansion (rrf)."""
        if plan.fusion == "mean":
            return self.embedder.embed_fused(plan.queries, plan.expansions, query_weight=plan.query_weight)
        embedder, texts, plan.owner = self.embedder, [], []
        for qi, (q, exps) in enumerate(zip(plan.queries, plan.expansions)):
            texts.extend([embedder.query_text(q), *(embedder.expansion_text(e) for e in exps)])
            plan.owner.extend([qi] * (1 + len(exps)))
        return embedder.encode(texts, prefix="", suffix="")  # texts carry their prefixes (as in `embed_fused`)

    def _finish(self, plan: _Plan, hits: list) -> list[list[Document]]:
        if plan.fusion == "mean":
            return hits
        return self._rrf(plan, hits)

    def _search(self, vectors: np.ndarray, top_k: int, filters, scale_score: bool, return_embedding: bool,
                rows: bool = False) -> list:
        """
        One hit list per vector: scored documents (shallow copies of the stored ones on the FAISS backend); with
        `rows` on the FAISS backend, (index, rows) pairs instead, for `_feedback` and `_rrf` (no copies).
        """
        if self.retriever is not None:
            return self._search_retriever(vectors, top_k, filters, scale_score, return_embedding)
        if self.backend == "store":
            return [self.document_store.embedding_retrieval(query_embedding=v.tolist(), filters=filters, top_k=top_k,
                                                            scale_score=scale_score, return_embedding=return_embedding)
                    for v in vectors]
        index = self.refresh_index()
        subset = None
        if filters:
            allowed = [index.row_of[d.id] for d in self.document_store.filter_documents(filters=filters)
                       if d.id in index.row_of]
            if not allowed:
                return [(index, []) if rows else [] for _ in vectors]
            subset = np.asarray(sorted(allowed))
        scores, hits = index.search(vectors, top_k, subset)
        if rows:
            return [(index, [h for h in hrow if h >= 0]) for hrow in hits.tolist()]
        documents = index.documents
        keep = bool(return_embedding)
        out = []
        for srow, hrow in zip(scores.tolist(), hits.tolist()):
            if scale_score:
                srow = [(s + 1.0) / 2.0 for s in srow]
            out.append([_with_score(documents[h], s, keep) for s, h in zip(srow, hrow) if h >= 0])
        return out

    def _retriever_kwargs(self, top_k: int, filters, scale_score: bool | None,
                          return_embedding: bool | None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"filters": filters, "top_k": top_k}
        accepted = self._retriever_params
        for name, value in (("scale_score", scale_score), ("return_embedding", return_embedding)):
            if value is not None and (accepted is None or name in accepted):
                kwargs[name] = value
        return kwargs

    def _search_retriever(self, vectors, top_k, filters, scale_score, return_embedding) -> list[list[Document]]:
        kwargs = self._retriever_kwargs(top_k, filters, scale_score, return_embedding)
        return [_documents_of(self.retriever.run(query_embedding=v.tolist(), **kwargs), return_embedding)
                for v in vectors]

    async def _search_retriever_async(self, vectors, top_k, filters, scale_score,
                                      return_embedding) -> list[list[Document]]:
        from haystack.utils.async_utils import _execute_component_async

        kwargs = self._retriever_kwargs(top_k, filters, scale_score, return_embedding)
        results = await asyncio.gather(*(_execute_component_async(self.retriever, query_embedding=v.tolist(),
                                                                  **kwargs) for v in vectors))
        return [_documents_of(r, return_embedding) for r in results]

    def _feedback(self, vectors: np.ndarray, hits: list, weight: float) -> np.ndarray:
        """Rocchio: each vector moved towards the mean of its top-k hits' unit vectors (`core.fusion.fuse`)."""
        moved = np.empty_like(vectors)
        for i, hit in enumerate(hits):
            if isinstance(hit, tuple):  # FAISS backend: (index, rows)
                index, rows = hit
                feedback = index.matrix[rows]
            else:
                embedded = [d.embedding for d in hit if d.embedding is not None]
                if hit and not embedded:
                    raise ValueError("Pseudo-relevance feedback (`feedback_k`) needs the hits' embeddings, and the "
                                     f"wrapped retriever ({type(self.retriever).__name__}) returned none.")
                feedback = np.asarray(embedded, dtype=np.float32).reshape(len(embedded), vectors.shape[1])
            moved[i] = fuse(vectors[i], feedback, weight)
        return moved

    def _rrf(self, plan: _Plan, hits: list[list[Document]]) -> list[list[Document]]:
        tables: list[dict[str, list]] = [{} for _ in plan.queries]
        searches = [0] * len(plan.queries)
        for qi, docs in zip(plan.owner, hits):
            if isinstance(docs, tuple):  # FAISS backend: (index, rows), the stored documents themselves
                index, rows = docs
                docs = [index.documents[r] for r in rows]
            searches[qi] += 1
            table = tables[qi]
            for rank, d in enumerate(docs, start=1):
                entry = table.get(d.id)
                if entry is None:
                    table[d.id] = [1.0 / (self.rrf_k + rank), d]
                else:
                    entry[0] += 1.0 / (self.rrf_k + rank)
        results = []
        for table, n in zip(tables, searches):
            ranked = sorted(table.values(), key=lambda x: (-x[0], x[1].id))[: plan.top_k]
            scale = (self.rrf_k + 1) / n if plan.scale_score else 1.0
            results.append([_with_score(d, s * scale, plan.return_embedding) for s, d in ranked])
        return results


class _Plan:
    """The checked settings of one `retrieve` call."""

    queries: list[str]
    expansions: list[list[str]]
    owner: list[int]
    top_k: int
    depth: int
    fusion: str
    query_weight: float
    feedback_k: int
    feedback_weight: float
    filters: dict[str, Any] | None
    scale_score: bool
    return_embedding: bool


def _given(**overrides: Any) -> dict[str, Any]:
    """The overrides that were given (not None): `run` passes only these on to `retrieve`."""
    return {k: v for k, v in overrides.items() if v is not None}


def _check_run_inputs(query: Any, expansions: Any) -> tuple[str, list[str]]:
    query = check_query(query)  # str, not blank; control characters dropped, invalid unicode replaced
    if expansions is not None and (isinstance(expansions, str) or not isinstance(expansions, Sequence)):
        raise TypeError(f"`expansions` must be a list of strings (or None); got {type(expansions).__name__}.")
    return query, list(expansions or [])


def _embedding_retriever_params(retriever: Any) -> frozenset[str] | None:
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


def _documents_of(result: Any, return_embedding: bool | None) -> list[Document]:
    """A wrapped retriever's `documents`, without embeddings unless asked for (None: as returned)."""
    docs = list((result or {}).get("documents") or [])
    if return_embedding is False:
        docs = [_with_score(d, d.score, False) if d.embedding is not None else d for d in docs]
    return docs


def _with_score(document: Document, score: float | None, keep_embedding: bool = True) -> Document:
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
