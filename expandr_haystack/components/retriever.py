"""ExpandRRetriever: dense retrieval with an ExpandR fused query (or reciprocal-rank fusion of expansions)."""

from __future__ import annotations

import asyncio
import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
from haystack import Document, component, default_from_dict, default_to_dict
from haystack.core.errors import DeserializationError
from haystack.core.serialization import component_to_dict, generate_qualified_class_name
from haystack.document_stores.types import DocumentStore, FilterPolicy, apply_filter_policy
from haystack.utils import ComponentDevice

from expandr_haystack.checks import check_choice, check_int, check_number
from expandr_haystack.components.document_index import DocumentIndex
from expandr_haystack.components.embedder import ExpandRQueryEmbedder, checked_expansions
from expandr_haystack.components.search import check_search, make_search, with_score
from expandr_haystack.core.fusion import reciprocal_rank_fusion, rocchio
from expandr_haystack.core.text import check_query
from expandr_haystack.options import FUSIONS, EncoderOptions, FusionSettings, check_feedback, fold_legacy

_with_score = with_score  # the name earlier versions (and their tests) import from here


@component
class ExpandRRetriever:
    """
    Retrieves documents for a query and its LLM expansions with a dense encoder, as in ExpandR.

    How the query and expansions become one ranking is `fusion` (`FusionSettings`; the math is `core.fusion`):
    "mean", one search with the ExpandR fused vector (`ExpandRQueryEmbedder`), optionally with Rocchio pseudo-relevance
    feedback (`feedback_k`: the corpus-grounded baseline that needs no LLM); "rrf", one search with the query and one
    with each expansion, merged by reciprocal rank (score = sum 1 / (rrf_k + rank)).
    Without expansions it is plain dense retrieval. Scores: mean, the inner product of the fused vector with the unit
    document vector, w * cos(q, d) + (1 - w) * mean_i cos(e_i, d) (plain cosine without expansions; with a wrapped
    `retriever` or `search="store"`, the store's own score for the fused vector, e.g. Qdrant's cosine); rrf, the RRF
    score. The first retrieval of a grounded pipeline is this component too (`top_k=3`, no expansions), its
    `documents` wired to `LLMQueryExpander(prompt=GROUNDED_PROMPT).documents`.

    Where the documents live, one search path picked at init (`components.search`): `document_store=` with
    `search="faiss"` (default: an exact FAISS index of the store's documents, one per store, shared by every retriever
    over it and rebuilt when they change) or `search="store"` (its `embedding_retrieval`); or `retriever=`, any
    Haystack embedding retriever (Qdrant, Elasticsearch, pgvector, InMemory, ...), queried with the fused vector.

    Documents must already carry embeddings from the same encoder, e.g. written by Haystack's
    `SentenceTransformersDocumentEmbedder(model=<same path>)`. Inputs are checked once, at the edge (`run`,
    `run_async`, `retrieve`, `retrieve_async`, `search`).

    Usage:
    ```python
    from haystack import Pipeline
    from haystack.document_stores.in_memory import InMemoryDocumentStore
    from expandr_haystack import LLMQueryExpander, ExpandRRetriever
    from expandr_haystack.options import FusionSettings

    store = InMemoryDocumentStore()   # filled by an indexing pipeline, see examples/
    p = Pipeline()
    p.add_component("expander", LLMQueryExpander())
    p.add_component("retriever", ExpandRRetriever(document_store=store, fusion=FusionSettings(query_weight=0.7)))
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
        fusion: str | FusionSettings | dict[str, Any] = "mean",
        query_embedder: ExpandRQueryEmbedder | None = None,
        search: str = "faiss",
        device: ComponentDevice | None = None,
        *,
        retriever: Any | None = None,
        filters: dict[str, Any] | None = None,
        filter_policy: str | FilterPolicy = FilterPolicy.REPLACE,
        scale_score: bool = False,
        return_embedding: bool = False,
    ):
        """
        :param document_store: A Haystack document store holding embedded documents (searched as `search` says).
            Pass this or `retriever`.
        :param model: The encoder (None = bundled all-MiniLM-L6-v2); must be the one that embedded the documents.
        :param top_k: Documents returned (>= 1).
        :param fusion: How the query and its expansions become one ranking: a `FusionSettings`, a dict of its
            fields, or a method name alone ("mean" / "rrf", the other settings at their defaults).
        :param query_embedder: An `ExpandRQueryEmbedder` (its encoder options: batch size, progress bar, prefixes,
            ...); None = `ExpandRQueryEmbedder(model, fusion.query_weight, device)`. This retriever fuses with
            `fusion.query_weight` either way.
        :param search: With `document_store`: "faiss" (an exact index of the store's documents, shared by every
            retriever over the store) or "store" (the store's `embedding_retrieval`). Not used with `retriever`.
        :param device: Device for the encoder (and the FAISS index with faiss-gpu).
        :param retriever: Any Haystack embedding retriever (`run(query_embedding, filters, top_k)`; rrf: one search
            per query and expansion vector; feedback: the first search asks for the hits' embeddings). Pass this or
            `document_store`. Its own `filters` and `filter_policy` apply to the filters this component passes it.
        :param filters: Haystack metadata filters for every search, combined with `run`'s by `filter_policy`.
        :param filter_policy: `FilterPolicy.REPLACE` (default: `run`'s filters, when given, replace the init
            filters) or `FilterPolicy.MERGE` (both apply); the string "replace" / "merge" works too.
        :param scale_score: Scale scores to [0, 1]: mean fusion, (s + 1) / 2 of the cosine-type score (the store's own
            scaling with `retriever` or `search="store"`); rrf, the RRF score divided by its maximum
            n / (rrf_k + 1) for n searches (1 = first in every search).
        :param return_embedding: Return the documents with their embeddings (False: `embedding=None`, as Haystack's
            retrievers do by default).
        """
        check_int(top_k, "top_k")
        fusion = FusionSettings.coerce(check_choice(fusion, "fusion", FUSIONS) if isinstance(fusion, str) else fusion,
                                       "fusion")
        check_search(document_store, retriever, search, scale_score=bool(scale_score) and fusion.method == "mean")
        _check_filters(filters)
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
        self.fusion: FusionSettings = fusion
        self.query_embedder = query_embedder
        self.search_kind = search  # the `search` setting (`search` is the method searching precomputed vectors)
        self.device = device  # None = best available (keeps YAML portable)
        self.filters = filters
        self.filter_policy = filter_policy
        self.scale_score = bool(scale_score)
        self.return_embedding = bool(return_embedding)
        self.embedder = query_embedder or ExpandRQueryEmbedder(model=model, device=device,
                                                               query_weight=fusion.query_weight)
        self.searcher = make_search(document_store, retriever, search, lambda: self.embedder.dimension, device)

    def to_dict(self) -> dict[str, Any]:
        """Serialize to a dictionary (the document store, a wrapped `retriever`, a passed `query_embedder` and the
        `fusion` group with their own `to_dict`)."""
        return default_to_dict(
            self, document_store=self.document_store, model=self.model, top_k=self.top_k, fusion=self.fusion,
            query_embedder=self.query_embedder, search=self.search_kind, device=self.device,
            retriever=None if self.retriever is None else component_to_dict(obj=self.retriever, name="retriever"),
            filters=self.filters, filter_policy=self.filter_policy.value, scale_score=self.scale_score,
            return_embedding=self.return_embedding)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExpandRRetriever:
        """Deserialize from a dictionary made by `to_dict` or saved by earlier versions (`_fold_legacy`); the input
        is not modified. Nested components and stores are imported through Haystack's deserialization allow-list."""
        params = dict(data.get("init_parameters", {}))
        store, retriever = params.get("document_store"), params.get("retriever")
        if not any(isinstance(x, dict) and "type" in x for x in (store, retriever)):
            raise DeserializationError("`document_store` or `retriever` must be a serialized document store / "
                                       "embedding retriever with a 'type' key.")
        params = _fold_legacy(params)
        if isinstance(retriever, dict):  # some retrievers' from_dict replace entries of their dict in place
            params["retriever"] = copy.deepcopy(retriever)
        return default_from_dict(cls, {**data, "init_parameters": params})

    def warm_up(self) -> None:
        """Load the encoder (and warm up a wrapped `retriever`); idempotent. A FAISS index is (re)built lazily on the
        first search after the store changes."""
        self.embedder.warm_up()
        self.searcher.warm_up()

    async def warm_up_async(self) -> None:
        """`warm_up` on the serving event loop (a wrapped retriever's `warm_up_async` where it has one)."""
        self.embedder.warm_up()
        await self.searcher.warm_up_async()

    def close(self) -> None:
        """Release a wrapped retriever's resources (e.g. its store's client); `Pipeline.close` calls this."""
        self.searcher.close()

    async def close_async(self) -> None:
        """Release a wrapped retriever's async resources (`close_async` where it has one, else `close`)."""
        await self.searcher.close_async()

    def refresh_index(self, force: bool = False) -> DocumentIndex:
        """The FAISS index of the store's documents ((re)built when they changed since the last build, or `force`;
        shared with every retriever over the same store). `search="faiss"` only."""
        return self.searcher.refresh_index(force)

    # -- run -----------------------------------------------------------------------------------------------
    @component.output_types(documents=list[Document])
    def run(self, query: str, expansions: list[str] | None = None, top_k: int | None = None,
            filters: dict[str, Any] | None = None, scale_score: bool | None = None,
            return_embedding: bool | None = None) -> dict[str, Any]:
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
        plan = self._plan(*_checked_query(query, expansions), top_k, filters, scale_score=scale_score,
                          return_embedding=return_embedding)
        return {"documents": self._retrieve(plan)[0]}

    @component.output_types(documents=list[Document])
    async def run_async(self, query: str, expansions: list[str] | None = None, top_k: int | None = None,
                        filters: dict[str, Any] | None = None, scale_score: bool | None = None,
                        return_embedding: bool | None = None) -> dict[str, Any]:
        """`run` for async pipelines: the encoder (and a FAISS or store search) run on a worker thread; a wrapped
        `retriever` is called through its `run_async` where it has one (rrf: its searches concurrently)."""
        plan = self._plan(*_checked_query(query, expansions), top_k, filters, scale_score=scale_score,
                          return_embedding=return_embedding)
        return {"documents": (await self._retrieve_async(plan))[0]}

    def retrieve(self, queries: Sequence[str], expansions: Sequence[Sequence[str]] | None = None,
                 top_k: int | None = None, filters: dict[str, Any] | None = None, fusion: str | None = None,
                 query_weight: float | None = None, feedback_k: int | None = None,
                 feedback_weight: float | None = None, scale_score: bool | None = None,
                 return_embedding: bool | None = None) -> list[list[Document]]:
        """
        Batched `run`: one encode call for all queries and expansions, one index search (two with feedback).

        :param fusion: Overrides `fusion.method` for this call ("mean" or "rrf").
        :param query_weight: Overrides `fusion.query_weight` for this call (mean fusion).
        :param feedback_k: Overrides `fusion.feedback_k` for this call (mean fusion).
        :param feedback_weight: Overrides `fusion.feedback_weight` for this call.
        """
        return self._retrieve(self._plan(*_checked_batch(queries, expansions), top_k, filters, fusion, query_weight,
                                         feedback_k, feedback_weight, scale_score, return_embedding))

    async def retrieve_async(self, queries: Sequence[str], expansions: Sequence[Sequence[str]] | None = None,
                             top_k: int | None = None, filters: dict[str, Any] | None = None, fusion: str | None = None,
                             query_weight: float | None = None, feedback_k: int | None = None,
                             feedback_weight: float | None = None, scale_score: bool | None = None,
                             return_embedding: bool | None = None) -> list[list[Document]]:
        """`retrieve` for async code (see `run_async`)."""
        plan = self._plan(*_checked_batch(queries, expansions), top_k, filters, fusion, query_weight, feedback_k,
                          feedback_weight, scale_score, return_embedding)
        return await self._retrieve_async(plan)

    def search(self, embeddings: Any, top_k: int | None = None, filters: dict[str, Any] | None = None,
               scale_score: bool | None = None, return_embedding: bool | None = None) -> list[list[Document]]:
        """Documents for precomputed query vectors (`embeddings`: array-like (n, dimension) or one vector, e.g.
        `ExpandRQueryEmbedder.embed_fused`), one list per vector: the search step of `retrieve` with mean fusion."""
        vectors = np.asarray(embeddings, dtype=np.float32)
        vectors = vectors.reshape(1, -1) if vectors.ndim == 1 else vectors
        if vectors.ndim != 2 or vectors.shape[1] == 0 or not np.isfinite(vectors).all():
            raise ValueError(f"`embeddings` must be finite vectors of shape (n, dimension) or (dimension,); got "
                             f"shape {np.shape(embeddings)}.")
        plan = self._plan([], [], top_k, filters, scale_score=scale_score, return_embedding=return_embedding)
        return self.searcher.search(vectors, plan.top_k, plan.filters, plan.scale_score, plan.return_embedding)

    # -- steps (inputs checked by the callers above) ----------------------------------------------------------
    def _plan(self, queries: list[str], expansions: list[list[str]], top_k, filters, fusion=None, query_weight=None,
              feedback_k=None, feedback_weight=None, scale_score=None, return_embedding=None) -> _Plan:
        """The checked settings of one call: the init ones, with the call's overrides."""
        settings = self.fusion
        _check_filters(filters)
        plan = _Plan(queries, expansions, rrf_k=settings.rrf_k)
        plan.top_k = check_int(self.top_k if top_k is None else top_k, "top_k")
        plan.method = check_choice(settings.method if fusion is None else fusion, "fusion", FUSIONS)
        plan.query_weight = float(check_number(settings.query_weight if query_weight is None else query_weight,
                                               "query_weight", 0.0, 1.0))
        k = settings.feedback_k if plan.method == "mean" else 0  # a mean-fusion setting: k > 0 with rrf is refused
        plan.feedback_k = check_feedback(plan.method, k if feedback_k is None else feedback_k, "fusion")
        plan.feedback_weight = float(check_number(
            settings.feedback_weight if feedback_weight is None else feedback_weight, "feedback_weight", 0.0, 1.0))
        plan.filters = apply_filter_policy(self.filter_policy, self.filters, filters)
        plan.scale_score = self.scale_score if scale_score is None else bool(scale_score)
        plan.return_embedding = self.return_embedding if return_embedding is None else bool(return_embedding)
        depth = plan.top_k if plan.method == "mean" else max(settings.rrf_depth, plan.top_k)
        plan.search_args = (depth, plan.filters, plan.scale_score and plan.method == "mean", plan.return_embedding)
        return plan

    def _vectors(self, plan: _Plan) -> np.ndarray:
        """The search vectors: one fused vector per query (mean), or the query and each expansion (rrf)."""
        embedder = self.embedder
        if plan.method == "mean":
            return embedder.fused_vectors(plan.queries, plan.expansions, plan.query_weight)
        texts = []
        for qi, (q, exps) in enumerate(zip(plan.queries, plan.expansions)):
            texts.extend([embedder.query_text(q), *(embedder.expansion_text(e) for e in exps)])
            plan.owner.extend([qi] * (1 + len(exps)))
        return embedder.encode(texts, prefix="", suffix="")  # texts carry their prefixes (as in `fused_vectors`)

    def _retrieve(self, plan: _Plan) -> list[list[Document]]:
        vectors = self._vectors(plan)
        if plan.feedback_k:
            neighbours = self.searcher.neighbours(vectors, plan.feedback_k, plan.filters)
            vectors = rocchio(vectors, neighbours, plan.feedback_weight)
        return self._finish(plan, self.searcher.search(vectors, *plan.search_args))

    async def _retrieve_async(self, plan: _Plan) -> list[list[Document]]:
        vectors = await asyncio.to_thread(self._vectors, plan)
        if plan.feedback_k:
            neighbours = await self.searcher.neighbours_async(vectors, plan.feedback_k, plan.filters)
            vectors = rocchio(vectors, neighbours, plan.feedback_weight)
        return self._finish(plan, await self.searcher.search_async(vectors, *plan.search_args))

    def _finish(self, plan: _Plan, hits: list[list[Document]]) -> list[list[Document]]:
        """Mean: the hits as they are. RRF: each query's searches merged (`core.fusion.reciprocal_rank_fusion`)."""
        if plan.method == "mean":
            return hits
        searches: list[list[list[Document]]] = [[] for _ in plan.queries]
        for qi, docs in zip(plan.owner, hits):
            searches[qi].append(docs)
        results = []
        for lists in searches:
            first = {d.id: d for docs in reversed(lists) for d in reversed(docs)}  # each id's first hit
            ranked = reciprocal_rank_fusion(([d.id for d in docs] for docs in lists), plan.rrf_k, plan.top_k,
                                            plan.scale_score)
            results.append([with_score(first[i], s, plan.return_embedding) for i, s in ranked])
        return results


@dataclass
class _Plan:
    """The checked settings of one `retrieve` call."""

    queries: list[str]
    expansions: list[list[str]]
    rrf_k: int = 60
    owner: list[int] = field(default_factory=list)
    top_k: int = 10
    search_args: tuple = ()  # depth, filters, scale_score, return_embedding of the last search
    method: str = "mean"
    query_weight: float = 0.5
    feedback_k: int = 0
    feedback_weight: float = 0.7
    filters: dict[str, Any] | None = None
    scale_score: bool = False
    return_embedding: bool = False


def _check_filters(filters: Any) -> None:
    if filters is not None and not isinstance(filters, dict):
        raise TypeError(f"`filters` must be a Haystack filter dict or None; got {type(filters).__name__}.")


def _checked_query(query: Any, expansions: Any) -> tuple[list[str], list[list[str]]]:
    """`run`'s inputs, checked (errors name `query` / `expansions`), as one-query batches."""
    query = check_query(query)  # str, not blank; control characters dropped, invalid unicode replaced
    return [query], [[] if expansions is None else checked_expansions(expansions)]


def _checked_batch(queries: Any, expansions: Any) -> tuple[list[str], list[list[str]]]:
    """`retrieve`'s inputs, checked (errors name `queries[i]` / `expansions[i]`)."""
    if isinstance(queries, str) or not isinstance(queries, Sequence):
        raise TypeError(f"`queries` must be a list of strings; got {type(queries).__name__}.")
    queries = [check_query(q, f"queries[{i}]") for i, q in enumerate(queries)]
    if expansions is None:
        return queries, [[] for _ in queries]
    if isinstance(expansions, str) or not isinstance(expansions, Sequence):
        raise TypeError(f"`expansions` must be a list with one list of strings per query; got "
                        f"{type(expansions).__name__}.")
    checked = [[] if e is None else checked_expansions(e, f"expansions[{i}]") for i, e in enumerate(expansions)]
    if len(checked) != len(queries):
        raise ValueError(f"`expansions` must have one list per query ({len(queries)}); got {len(checked)}.")
    return queries, checked


def _fold_legacy(params: dict[str, Any]) -> dict[str, Any]:
    """
    Older parameters in today's layout (a copy): `backend` -> `search` (DeprecationWarning); flat `query_weight`,
    `rrf_k`, `rrf_depth`, `feedback_k`, `feedback_weight` and the old string `fusion` -> the `fusion` group;
    non-default `batch_size`/`progress_bar` -> the encoder options of the query embedder the retriever built (with a
    passed `query_embedder` they were unused, and are dropped).
    """
    params = dict(params)
    if "backend" in params:
        if "search" in params:
            raise DeserializationError("ExpandRRetriever: both `backend` (old name) and `search` are set; keep one.")
        warnings.warn("ExpandRRetriever: `backend` is now `search`; the old name is read from files saved by earlier "
                      "versions and will be removed. Save the pipeline again to update it.", DeprecationWarning,
                      stacklevel=3)
        params["search"] = params.pop("backend")
    if set(params) & {f.name for f in fields(FusionSettings)} - {"method"}:
        renamed = {"fusion": "method"} if isinstance(params.get("fusion"), str) else {}
        params = fold_legacy(params, "fusion", FusionSettings, "ExpandRRetriever", renamed)
    defaults = EncoderOptions()
    encoder = {k: params.pop(k) for k in ("batch_size", "progress_bar") if k in params}
    encoder = {k: v for k, v in encoder.items() if v != getattr(defaults, k)}
    if encoder and params.get("query_embedder") is None:
        params["query_embedder"] = {
            "type": generate_qualified_class_name(ExpandRQueryEmbedder),
            "init_parameters": {"model": params.get("model"), "device": copy.deepcopy(params.get("device")),
                                "query_weight": FusionSettings.coerce(params.get("fusion"), "fusion").query_weight,
                                "encoder": encoder}}
    return params


__all__ = ["ExpandRRetriever"]
