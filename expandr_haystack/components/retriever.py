"""ExpandRRetriever: dense retrieval with an ExpandR fused query (or reciprocal-rank fusion of expansions)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from haystack import Document, component, default_from_dict, default_to_dict
from haystack.core.errors import DeserializationError
from haystack.document_stores.types import DocumentStore
from haystack.utils import ComponentDevice

from expandr_haystack.checks import check_choice, check_int, check_number
from expandr_haystack.components.embedder import ExpandRQueryEmbedder
from expandr_haystack.core.fusion import fuse
from expandr_haystack.core.text import check_query, clean_text
from expandr_haystack.models import resolve_device

logger = logging.getLogger(__name__)

FUSIONS = ("mean", "rrf")
BACKENDS = ("faiss", "store")


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
                "embed them first with SentenceTransformersDocumentEmbedder and the retriever's encoder.")
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
    the unit document vector, w * cos(q, d) + (1 - w) * mean_i cos(e_i, d) (plain cosine without expansions); rrf,
    the RRF score. The first retrieval of a grounded pipeline is this component too (`top_k=3`, no expansions),
    its `documents` wired to `LLMQueryExpander(prompt=GROUNDED_PROMPT).documents`.

    Documents must already carry embeddings from the same encoder, e.g. written by Haystack's
    `SentenceTransformersDocumentEmbedder(model=<same path>)`. The `faiss` backend keeps an exact FAISS index of the
    store's documents (rebuilt when the store's documents change); the `store` backend calls the store's own
    `embedding_retrieval` instead.

    Usage:
    ```python
    from haystack import Pipeline
    from haystack.document_stores.in_memory import InMemoryDocumentStore
    from expandr_haystack import LLMQueryExpander, ExpandRRetriever

    store = InMemoryDocumentStore()   # filled by an indexing pipeline, see examples/
    p = Pipeline()
    p.add_component("expander", LLMQueryExpander())
    p.add_component("retriever", ExpandRRetriever(document_store=store))
    p.connect("expander.query", "retriever.query")
    p.connect("expander.expansions", "retriever.expansions")
    docs = p.run({"expander": {"query": "what similarity laws must be obeyed ..."}})["retriever"]["documents"]
    ```
    """

    def __init__(
        self,
        document_store: DocumentStore,
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
    ):
        """
        :param document_store: A Haystack document store holding embedded documents.
        :param model: The encoder (None = bundled all-MiniLM-L6-v2); must be the one that embedded the documents.
        :param top_k: Documents returned (>= 1).
        :param fusion: "mean" (ExpandR fused vector) or "rrf" (reciprocal-rank fusion of separate searches).
        :param query_weight: Query weight in the fused vector (mean fusion), in [0, 1].
        :param rrf_k: The k constant of reciprocal-rank fusion.
        :param rrf_depth: Hits taken from each search before RRF.
        :param backend: "faiss" (own exact index) or "store" (the store's `embedding_retrieval`).
        :param device: Device for the encoder (and the FAISS index with faiss-gpu).
        :param batch_size: Texts encoded together.
        :param progress_bar: Show progress bars for batched retrieval.
        :param query_embedder: An `ExpandRQueryEmbedder` to embed queries with (shared with other components);
            None builds one from `model`, `query_weight`, `device`, `batch_size`. When given, its encoder and device
            are used, and `query_weight` here is the weight this retriever fuses with.
        :param feedback_k: Rocchio pseudo-relevance feedback (mean fusion): 0 = off; k > 0 searches once, then again
            with v' = f·v̂ + (1-f)·mean(top-k document vectors), f = `feedback_weight`, where v is the (fused) query
            vector. A corpus-grounded baseline that needs no LLM, and combines with expansions.
        :param feedback_weight: f above, in [0, 1].
        """
        if not all(hasattr(document_store, m) for m in ("filter_documents", "count_documents", "to_dict")):
            raise TypeError(f"`document_store` must be a Haystack DocumentStore; got {type(document_store).__name__}.")
        check_choice(fusion, "fusion", FUSIONS)
        check_choice(backend, "backend", BACKENDS)
        if backend == "store" and not hasattr(document_store, "embedding_retrieval"):
            raise ValueError(f"`backend='store'` needs a document store with `embedding_retrieval`; "
                             f"{type(document_store).__name__} has none. Use backend='faiss'.")
        check_int(top_k, "top_k")
        check_int(rrf_k, "rrf_k")
        check_int(rrf_depth, "rrf_depth")
        check_number(query_weight, "query_weight", 0.0, 1.0)
        check_int(feedback_k, "feedback_k", minimum=0)
        check_number(feedback_weight, "feedback_weight", 0.0, 1.0)
        if query_embedder is not None:
            if not isinstance(query_embedder, ExpandRQueryEmbedder):
                raise TypeError(f"`query_embedder` must be an ExpandRQueryEmbedder or None; got "
                                f"{type(query_embedder).__name__}.")
            if model is not None and model != query_embedder.model:
                raise ValueError(f"`model` ({model!r}) differs from `query_embedder.model` "
                                 f"({query_embedder.model!r}): pass one of them.")
        self.document_store = document_store
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
        self.embedder = query_embedder or ExpandRQueryEmbedder(model=model, query_weight=query_weight,
                                                               device=self.device, batch_size=batch_size,
                                                               progress_bar=progress_bar)
        self._index: DocumentIndex | None = None
        self._index_state: Any = None

    def to_dict(self) -> dict[str, Any]:
        """Serialize to a dictionary (the document store and a passed `query_embedder` with their own `to_dict`)."""
        return default_to_dict(
            self, document_store=self.document_store, model=self.model, top_k=self.top_k, fusion=self.fusion,
            query_weight=self.query_weight, rrf_k=self.rrf_k, rrf_depth=self.rrf_depth, backend=self.backend,
            device=self.device, batch_size=self.batch_size, progress_bar=self.progress_bar,
            query_embedder=self.query_embedder, feedback_k=self.feedback_k, feedback_weight=self.feedback_weight,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExpandRRetriever:
        """Deserialize from a dictionary made by `to_dict` (the input is not modified)."""
        store = data.get("init_parameters", {}).get("document_store")
        if not isinstance(store, dict) or "type" not in store:
            raise DeserializationError("`document_store` must be a serialized document store with a 'type' key.")
        return default_from_dict(cls, data)

    def warm_up(self) -> None:
        """Load the encoder; idempotent. The index is (re)built lazily on the first search after the store changes."""
        self.embedder.warm_up()

    # -- index ---------------------------------------------------------------------------------------------
    def _store_state(self) -> Any:
        storage = getattr(self.document_store, "storage", None)
        if isinstance(storage, dict):  # InMemoryDocumentStore: identity of every stored Document object
            return (len(storage), hash(tuple(id(d) for d in storage.values())))
        return self.document_store.count_documents()

    def refresh_index(self, force: bool = False) -> DocumentIndex:
        """(Re)build the FAISS index when the store's documents changed since the last build (or when `force`)."""
        state = self._store_state()
        if force or self._index is None or state != self._index_state:
            docs = self.document_store.filter_documents()
            if not docs:
                raise ValueError("The document store is empty: index documents (with embeddings) before retrieving.")
            self._index = DocumentIndex(docs, self.embedder.dimension, resolve_device(self.device))
            self._index_state = state
        return self._index

    # -- search --------------------------------------------------------------------------------------------
    @component.output_types(documents=list[Document])
    def run(
        self,
        query: str,
        expansions: list[str] | None = None,
        top_k: int | None = None,
        filters: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """
        Retrieve documents for one query.

        :param query: The query.
        :param expansions: Its LLM expansions (None or [] = plain dense retrieval).
        :param top_k: Overrides the init `top_k`.
        :param filters: Haystack metadata filters; only matching documents are searched.
        :returns: `documents`, best first, each with `score`.
        """
        query = check_query(query)  # str, not blank; control characters dropped, invalid unicode replaced
        if expansions is not None and (isinstance(expansions, str) or not isinstance(expansions, Sequence)):
            raise TypeError(f"`expansions` must be a list of strings (or None); got {type(expansions).__name__}.")
        return {"documents": self.retrieve([query], [expansions or []], top_k=top_k, filters=filters)[0]}

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
    ) -> list[list[Document]]:
        """
        Batched `run`: one encode call for all queries and expansions, one index search (two with feedback).

        :param fusion: Overrides the init `fusion` for this call ("mean" or "rrf").
        :param query_weight: Overrides the init `query_weight` for this call (mean fusion).
        :param feedback_k: Overrides the init `feedback_k` for this call (mean fusion).
        :param feedback_weight: Overrides the init `feedback_weight` for this call.
        """
        top_k = check_int(self.top_k if top_k is None else top_k, "top_k")
        fusion = check_choice(self.fusion if fusion is None else fusion, "fusion", FUSIONS)
        query_weight = self.query_weight if query_weight is None else query_weight
        if isinstance(queries, str) or not isinstance(queries, Sequence):
            raise TypeError(f"`queries` must be a list of strings; got {type(queries).__name__}.")
        queries = [check_query(q, f"queries[{i}]") for i, q in enumerate(queries)]
        if expansions is not None:
            bad = next((i for i, e in enumerate(expansions) if isinstance(e, str)), None)
            if bad is not None:
                raise TypeError(f"`expansions[{bad}]` must be a list of strings, one list per query; got a str.")
        expansions = [list(e or []) for e in expansions] if expansions is not None else [[] for _ in queries]
        expansions = [[clean_text(e) if isinstance(e, str) else e for e in exps] for exps in expansions]
        if fusion == "mean":
            vectors = self.embedder.embed_fused(queries, expansions, query_weight=query_weight)
            feedback_k = check_int(self.feedback_k if feedback_k is None else feedback_k, "feedback_k", minimum=0)
            if feedback_k:
                weight = self.feedback_weight if feedback_weight is None else feedback_weight
                vectors = self._feedback(vectors, feedback_k, check_number(weight, "feedback_weight", 0.0, 1.0),
                                         filters)
            return self._search(vectors, top_k, filters)
        return self._rrf(queries, expansions, top_k, filters)

    def _search(self, vectors: np.ndarray, top_k: int, filters) -> list[list[Document]]:
        if self.backend == "store":
            return [self.document_store.embedding_retrieval(query_embedding=v.tolist(), filters=filters, top_k=top_k)
                    for v in vectors]
        index = self.refresh_index()
        rows = None
        if filters:
            allowed = [index.row_of[d.id] for d in self.document_store.filter_documents(filters=filters)
                       if d.id in index.row_of]
            if not allowed:
                return [[] for _ in vectors]
            rows = np.asarray(sorted(allowed))
        scores, hits = index.search(vectors, top_k, rows)
        return [[_with_score(index.documents[h], float(s)) for s, h in zip(srow, hrow) if h >= 0]
                for srow, hrow in zip(scores, hits)]

    def _feedback(self, vectors: np.ndarray, k: int, weight: float, filters) -> np.ndarray:
        """Rocchio: each vector moved towards the mean of its top-k hits' unit vectors (`core.fusion.fuse`)."""
        hits = self._search(vectors, k, filters)
        moved = np.empty_like(vectors)
        for i, docs in enumerate(hits):
            embedded = [d.embedding for d in docs if d.embedding is not None]
            feedback = np.asarray(embedded, dtype=np.float32).reshape(len(embedded), vectors.shape[1])
            moved[i] = fuse(vectors[i], feedback, weight)
        return moved

    def _rrf(self, queries, expansions, top_k, filters) -> list[list[Document]]:
        texts, owner = [], []
        for qi, (q, exps) in enumerate(zip(queries, expansions)):
            for t in [q] + [e for e in exps if e.strip()]:
                texts.append(t)
                owner.append(qi)
        vectors = self.embedder.encode(texts)
        hits = self._search(vectors, max(self.rrf_depth, top_k), filters)
        fused: list[dict[str, list]] = [{} for _ in queries]
        for qi, docs in zip(owner, hits):
            for rank, d in enumerate(docs, start=1):
                entry = fused[qi].setdefault(d.id, [0.0, d])
                entry[0] += 1.0 / (self.rrf_k + rank)
        results = []
        for table in fused:
            ranked = sorted(table.values(), key=lambda x: (-x[0], x[1].id))[:top_k]
            results.append([_with_score(d, s) for s, d in ranked])
        return results


def _with_score(document: Document, score: float) -> Document:
    """
    A shallow copy of a stored document with `score` set, equal to ``dataclasses.replace(document, score=score)``
    (the same fields, `meta` and `embedding` shared as `replace` shares them) but about 10x cheaper: `replace`
    re-runs `Document.__init__`/`__post_init__` (id hashing) for every hit of every query.
    """
    scored = object.__new__(type(document))
    scored.__dict__.update(document.__dict__)
    scored.__dict__["score"] = score
    return scored
