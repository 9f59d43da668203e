"""
Retrieval evaluation on a BEIR-layout collection: BM25, dense, PRF, ExpandR (mean and RRF fusion, grounded), and
Haystack's own multi-query expansion with the same LLM and encoder (`multiquery`).

`evaluate` is the library entry point used by `expandr eval` and by the joint-training code for its per-round
numbers; `format_table` and `plot_metrics` present the result.

Usage:
```python
from expandr_haystack.evaluation.data import bundled_path, load_collection
from expandr_haystack.evaluation import evaluate, format_table

collection = load_collection(bundled_path("cranfield"), split="test")
result = evaluate(collection, methods=("bm25", "dense"))
print(format_table(result))                # the table
result["dense"]["ndcg@10"]                # mean nDCG@10 of dense retrieval, in [0, 1]
result.per_query["dense"]["1"]["mrr@10"]  # one query's score
```
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from haystack import Document
from haystack.document_stores.types import DocumentStore
from haystack.utils import ComponentDevice
from tqdm.auto import tqdm

from expandr_haystack.checks import check_int, check_number
from expandr_haystack.evaluation.data import Collection
from expandr_haystack.evaluation.metrics import K_VALUES, METRICS, beir_metrics, evaluate_run, run_from_documents

logger = logging.getLogger(__name__)

#: The methods `evaluate` knows, in their canonical order.
METHODS = ("bm25", "dense", "prf", "expand", "expand-rrf", "grounded", "haystack_multiquery")
#: What `expandr eval` runs without --methods.
DEFAULT_METHODS = ("bm25", "dense", "expand", "expand-rrf")
#: The expansion methods and the prompt family each uses ("q2d": the paper's; "grounded": reads first-pass hits;
#: "multiquery": Haystack QueryExpander's, its alternative queries searched by MultiQueryEmbeddingRetriever).
EXPANSION_METHODS = {"expand": "q2d", "expand-rrf": "q2d", "grounded": "grounded", "haystack_multiquery": "multiquery"}
#: Haystack's QueryExpander + MultiQueryEmbeddingRetriever with the expansion methods' LLM (`evaluation.multiquery`).
MULTIQUERY = "haystack_multiquery"
#: Methods that fuse with a query weight w (`query_weight` may give each its own).
WEIGHTED_METHODS = ("expand", "grounded")
#: Documents retrieved per query (Recall@100 needs 100).
TOP_K = 100


class EvalResult(dict):
    """
    The result of `evaluate`: a plain ``dict`` ``{method: {"ndcg@10", "recall@100", "mrr@10", "queries"}}``
    (means over the judged queries, metric values in [0, 1]; JSON-serialisable as is), with extra attributes:

    - `per_query`: ``{method: {query_id: {"ndcg@10", "recall@100", "mrr@10"}}}``;
    - `expansions`: ``{query_id: [expansion, ...]}`` of the q2d methods (`expand`, `expand-rrf`), else ``{}``;
    - `grounded_expansions`: the same for `grounded`;
    - `multiquery`: of `haystack_multiquery`, ``{"stats": MultiQueryStats.to_dict(), "queries": {query_id: [searched
      query, ...]}, "replies": {query_id: the LLM's reply}}``, else ``{}``;
    - `settings`: the fusion settings each method ran with (``{"expand": {"query_weight": 0.7}, ...}``);
    - `warnings`: the data warnings of the collection (e.g. judged documents missing from the corpus);
    - `failures`: ``{query_id: number of expansions that failed}`` (rows that fell back to the query alone);
    - `timings`: seconds spent per step (``"index-dense"``, ``"index-bm25"``, ``"expansion"``, and each method);
    - `beir`: ``{method: {"NDCG@k", "MAP@k", "Recall@k", "P@k", "MRR@10"}}``, BEIR's own numbers for the same run
      (`metrics.beir_metrics`: rounded to 5 decimals, k = 1, 3, 5, 10, 100, 1000 up to the retrieval depth);
    - `runs`: ``{method: {query_id: [(doc_id, score), ...]}}``, the evaluated rankings, best first, with the
      retrievers' scores (None where a hit has none); `metrics.write_trec_run` writes one as a TREC run.
    """

    def __init__(self, metrics: dict[str, dict[str, float]] | None = None,
                 per_query: dict[str, dict[str, dict[str, float]]] | None = None,
                 expansions: dict[str, list[str]] | None = None, warnings: list[str] | None = None,
                 timings: dict[str, float] | None = None):
        super().__init__(metrics or {})
        self.per_query = per_query or {}
        self.expansions = expansions or {}
        self.warnings = list(warnings or [])
        self.timings = timings or {}
        self.failures: dict[str, int] = {}
        self.grounded_expansions: dict[str, list[str]] = {}
        self.multiquery: dict[str, Any] = {}
        self.settings: dict[str, dict[str, Any]] = {}
        self.beir: dict[str, dict[str, float]] = {}
        self.runs: dict[str, dict[str, list[tuple[str, float | None]]]] = {}

    @property
    def metrics(self) -> dict[str, dict[str, float]]:
        """The means as a plain dict (a copy)."""
        return {m: dict(v) for m, v in self.items()}


def parse_methods(methods: str | Sequence[str]) -> list[str]:
    """
    Validate `methods` (a comma-separated string or a sequence of names); duplicates are dropped, order is kept.

    :raises ValueError: on an empty list or an unknown name (naming `methods` and the valid ones).
    """
    if isinstance(methods, str):
        names = [m.strip() for m in methods.split(",") if m.strip()]
    elif isinstance(methods, Sequence) and all(isinstance(m, str) for m in methods):
        names = [m.strip() for m in methods]
    else:
        raise ValueError(f"`methods` must be a list of method names or a comma-separated string; got {methods!r}.")
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise ValueError(f"`methods`: unknown method(s) {unknown}; valid methods are {', '.join(METHODS)}.")
    if not names:
        raise ValueError(f"`methods` is empty; choose from {', '.join(METHODS)}.")
    return list(dict.fromkeys(names))


def bm25_documents(collection: Collection) -> list[Document]:
    """Documents for BM25: `content` = title + text (the title alone when the text is empty)."""
    docs = []
    for doc_id, d in collection.corpus.items():
        content = "\n".join(p for p in (d["title"], d["text"]) if p)
        docs.append(Document(id=doc_id, content=content, meta={"title": d["title"]}))
    return docs


def evaluate(
    collection: Collection,
    methods: str | Sequence[str] = DEFAULT_METHODS,
    encoder: str | None = None,
    expander: Any | None = None,
    grounded_expander: Any | None = None,
    expansions: Mapping[str, Sequence[str]] | None = None,
    query_weight: float | Mapping[str, float] = 0.5,
    feedback_k: int = 3,
    feedback_weight: float = 0.7,
    store: DocumentStore | None = None,
    device: ComponentDevice | None = None,
    progress_bar: bool = True,
    ignore_identical_ids: bool = True,
    depth: int = TOP_K,
    multiquery_prefill: bool = True,
    encoder_options: Any | None = None,
) -> EvalResult:
    """
    Evaluate retrieval methods on a collection's judged queries with pytrec_eval (nDCG@10, Recall@100, MRR@10).

    Methods:
    - `bm25`: Haystack `InMemoryBM25Retriever` (BM25Okapi) over an `InMemoryDocumentStore` of title + text;
    - `dense`: `ExpandRRetriever` with the encoder and no expansion;
    - `prf`: Rocchio pseudo-relevance feedback, no LLM: f·q̂ + (1-f)·mean(top-k dense hits), k = `feedback_k`,
      f = `feedback_weight`;
    - `expand`: the ExpandR fused query vector w·q̂ + (1-w)·mean(ê) over the q2d expansions;
    - `expand-rrf`: the same expansions, reciprocal-rank fusion of the query's and each expansion's search;
    - `grounded`: the fused vector over grounded expansions, written by `grounded_expander` from the query and the
      top dense hits (beyond the paper);
    - `haystack_multiquery`: Haystack's `QueryExpander` (its prompt, `expander`'s LLM, settings and `n_expansions`)
      and `MultiQueryEmbeddingRetriever` over the same store and encoder (`evaluation.multiquery`); a local LLM's
      replies start with ``{"queries": ["`` and end at the first ``]}`` (`multiquery.JSON_PREFILL`) unless
      `multiquery_prefill` is False.
    q2d expansions come from `expansions` when given, else from `expander`, else from the bundled
    `LLMQueryExpander()`; grounded ones from `grounded_expander`, else from `expander`'s settings with
    `GROUNDED_PROMPT`. Each family is generated once (batched, through the expander's cache). Each method retrieves
    the top 100 documents per query.

    :param collection: A collection from `expandr_haystack.evaluation.data.load_collection` (judged queries of one
        split).
    :param methods: Method names (a sequence or a comma-separated string), run in the given order.
    :param encoder: Sentence-transformers encoder for the dense methods (None = bundled all-MiniLM-L6-v2).
    :param expander: The q2d `LLMQueryExpander` (any settings: model, adapter, `n_expansions`, cache, ...).
    :param grounded_expander: An `LLMQueryExpander` whose prompt has `{passages}`.
    :param expansions: Ready q2d expansions, ``{query_id: [text, ...]}`` (e.g. read from a run folder); a query
        missing from it is searched with the query alone.
    :param query_weight: w of the fused query vector, one for every weighted method or ``{method: w}`` (a method
        missing from the mapping gets 0.5). Choose it on a validation split (`protocol.select_settings`), never on
        the evaluation split.
    :param feedback_k: Hits averaged by `prf`.
    :param feedback_weight: f of `prf`.
    :param store: A document store already holding the corpus embedded with `encoder` (e.g. from
        `expandr_haystack.evaluation.indexing.build_document_store`), reused instead of indexing again; pass None
        whenever the encoder's weights changed since it was built.
    :param device: Device for the encoder (None = best available).
    :param progress_bar: Show progress bars for indexing, expansion and search.
    :param ignore_identical_ids: Drop hits whose document id equals the query id before scoring, as BEIR does by
        default (queries that are corpus documents, ArguAna/Quora-style); False keeps them.
    :param depth: Documents retrieved per query (100; BEIR retrieves 1000, which its @1000 metrics need). Metrics at
        k < depth are those of any deeper run (except for `expand-rrf`, which fuses `max(100, depth)` hits); at
        k = depth a query whose own id was retrieved and dropped has one document fewer than a deeper run.
    :param multiquery_prefill: `haystack_multiquery` with the JSON prefill (the default; see above); False = the
        LLM's free replies, parsed or not by QueryExpander.
    :param encoder_options: How the dense methods' encoder runs, documents and queries alike: an `EncoderOptions` or
        a dict of its fields (e.g. ``{"backend": "ctranslate2"}``; indexing with `ExpandRDocumentEmbedder`); None =
        the defaults (indexing with Haystack's stock embedder). `haystack_multiquery` (Haystack's torch text
        embedder) takes backend "torch" only.
    :returns: An `EvalResult`: ``{method: {"ndcg@10", "recall@100", "mrr@10", "queries"}}`` (a dict) with
        `.per_query`, `.expansions`, `.grounded_expansions`, `.settings`, `.failures`, `.warnings` and `.timings`.
    :raises ValueError: On an unknown method, bad settings, or a collection without judged queries.
    """
    names = parse_methods(methods)
    if not isinstance(collection, Collection):
        raise TypeError(f"`collection` must be an expandr_haystack.evaluation.data.Collection (see load_collection); "
                        f"got {type(collection).__name__}.")
    if not collection.queries:
        raise ValueError(f"`collection` ({collection.path}, split {collection.split!r}) has no judged queries.")
    if not collection.corpus:
        raise ValueError(f"`collection` ({collection.path}) has an empty corpus.")
    weights = method_weights(query_weight)
    check_int(feedback_k, "feedback_k")
    check_number(feedback_weight, "feedback_weight", 0.0, 1.0)
    check_int(depth, "depth")
    if not isinstance(multiquery_prefill, bool):
        raise TypeError(f"`multiquery_prefill` must be a bool; got {type(multiquery_prefill).__name__}.")
    if expansions is not None and not isinstance(expansions, Mapping):
        raise TypeError(f"`expansions` must be a mapping {{query_id: [text, ...]}}; got {type(expansions).__name__}.")
    check_encoder_options(encoder_options, names)

    query_ids = list(collection.queries)
    queries = [collection.queries[q] for q in query_ids]
    result = EvalResult(warnings=collection.warnings)
    retriever = None
    if any(m != "bm25" for m in names):
        retriever = dense_retriever(collection, encoder, store, device, progress_bar, result.timings,
                                    encoder_options)
    texts = family_texts(names, retriever, queries, query_ids, result, expander, grounded_expander, expansions,
                         progress_bar)
    result.expansions = dict(zip(query_ids, texts["q2d"])) if "q2d" in texts else {}
    result.grounded_expansions = dict(zip(query_ids, texts["grounded"])) if "grounded" in texts else {}

    for name in names:
        started = time.perf_counter()
        if name == "bm25":
            hits = _bm25(collection, queries, progress_bar, result.timings, depth)
        elif name == MULTIQUERY:
            from expandr_haystack.evaluation.multiquery import JSON_PREFILL, multiquery_hits

            mq_expander = expander if expander is not None else default_expander(progress_bar)
            hits, result.multiquery = multiquery_hits(retriever.document_store, queries, query_ids, mq_expander,
                                                      depth, encoder, device, progress_bar, result.timings,
                                                      prefill=multiquery_prefill)
            prefilled = multiquery_prefill and mq_expander.chat_generator is None  # a ready generator runs as is
            result.settings[name] = {"merge": "max", "n_expansions": mq_expander.n_expansions,
                                     **{k: v if prefilled else None for k, v in JSON_PREFILL.items()}}
            started += result.timings.get("expansion-multiquery", 0.0)  # its generation is timed apart, as q2d's
        else:
            settings = method_settings(name, weights, feedback_k, feedback_weight)
            family = EXPANSION_METHODS.get(name)
            hits = retriever.retrieve(queries, texts[family] if family else None, top_k=depth, **settings)
            result.settings[name] = settings
        result.timings[name] = time.perf_counter() - started
        run = run_from_documents(query_ids, hits)
        result.runs[name] = {str(q): [(d.id, d.score) for d in docs] for q, docs in zip(query_ids, hits)}
        means, per_query = evaluate_run(collection.qrels, run, ignore_identical_ids=ignore_identical_ids)
        result.beir[name] = beir_metrics(collection.qrels, run, k_values=[k for k in K_VALUES if k <= depth],
                                         ignore_identical_ids=ignore_identical_ids)
        result[name] = {m: float(means[m]) for m in METRICS} | {"queries": int(means["queries"])}
        result.per_query[name] = per_query
    return result


def family_texts(names, retriever, queries, query_ids, result: EvalResult, expander=None, grounded_expander=None,
                 expansions: Mapping[str, Sequence[str]] | None = None,
                 progress_bar: bool = False) -> dict[str, list[list[str]]]:
    """
    The expansion texts of each family the methods `names` need, generated once: ``{"q2d": [[text, ...], ...],
    "grounded": [...]}`` in query order. q2d texts come from `expansions` (ready texts), else `expander`, else the
    bundled expander; grounded ones from `grounded_expander` (else `expander`'s settings with the grounded prompt),
    reading the top `passages_k` hits of a first dense pass with `retriever`. Timings and failures go to `result`.
    """
    families = {EXPANSION_METHODS[m] for m in names if m in EXPANSION_METHODS}
    texts: dict[str, list[list[str]]] = {}
    if "q2d" in families:
        started = time.perf_counter()
        if expansions is not None:
            texts["q2d"] = [list(expansions.get(q, [])) for q in query_ids]
        else:
            expander = expander if expander is not None else default_expander(progress_bar)
            texts["q2d"] = expand_texts(expander, queries, None, query_ids, result)
        result.timings["expansion"] = time.perf_counter() - started
    if "grounded" in families:
        started = time.perf_counter()
        grounded_expander = grounded_expander if grounded_expander is not None else grounded_like(
            expander if expander is not None else default_expander(progress_bar))
        first_pass = retriever.retrieve(queries, None, top_k=grounded_expander.passages_k)
        texts["grounded"] = expand_texts(grounded_expander, queries, first_pass, query_ids, result)
        result.timings["expansion-grounded"] = time.perf_counter() - started
    return texts


def method_weights(query_weight: float | Mapping[str, float]) -> dict[str, float]:
    """``{method: w}`` for every weighted method from one w or a partial mapping (missing methods: 0.5)."""
    if isinstance(query_weight, Mapping):
        unknown = sorted(set(query_weight) - set(WEIGHTED_METHODS))
        if unknown:
            raise ValueError(f"`query_weight`: no weight is used by {unknown}; weighted methods are "
                             f"{', '.join(WEIGHTED_METHODS)}.")
        return {m: check_number(query_weight.get(m, 0.5), f"query_weight[{m!r}]", 0.0, 1.0) for m in WEIGHTED_METHODS}
    w = check_number(query_weight, "query_weight", 0.0, 1.0)
    return dict.fromkeys(WEIGHTED_METHODS, w)


def method_settings(name: str, weights: Mapping[str, float], feedback_k: int, feedback_weight: float) -> dict:
    """The `ExpandRRetriever.retrieve` overrides of a dense method."""
    if name == "prf":
        return {"fusion": "mean", "feedback_k": feedback_k, "feedback_weight": feedback_weight}
    if name == "expand-rrf":
        return {"fusion": "rrf", "feedback_k": 0}
    return {"fusion": "mean", "query_weight": weights.get(name, 1.0), "feedback_k": 0}


def default_expander(progress_bar: bool = False):
    """The bundled q2d `LLMQueryExpander` with its defaults."""
    from expandr_haystack.components.expander import LLMQueryExpander
    from expandr_haystack.options import GenerationSettings

    return LLMQueryExpander(generation=GenerationSettings(progress_bar=progress_bar))


def grounded_like(expander):
    """An expander with `expander`'s settings (model, adapter, samples, cache, ...) and the grounded prompt."""
    from expandr_haystack.core.text import GROUNDED_PROMPT

    return expander.with_settings(prompt=GROUNDED_PROMPT)


def expand_texts(expander, queries, passages, query_ids, result: EvalResult) -> list[list[str]]:
    """`expander.expand` over `queries` (with first-pass `passages` for a grounded expander); failures counted in
    `result.failures`."""
    expander.warm_up()
    texts = expander.expand(queries, passages=passages)
    for i, n in expander.last_failures.items():
        result.failures[query_ids[i]] = result.failures.get(query_ids[i], 0) + n
    empty = sum(1 for e in texts if not e)
    if empty:
        logger.warning("%d of %d queries got no expansion; they are searched with the query alone.", empty,
                       len(queries))
    return texts


def check_encoder_options(encoder_options: Any, methods: Sequence[str]) -> Any:
    """`encoder_options` as an `EncoderOptions` (None stays None), refused with `haystack_multiquery` unless its
    backend is "torch" (that method embeds queries with Haystack's own text embedder)."""
    from expandr_haystack.options import EncoderOptions

    if encoder_options is None:
        return None
    options = EncoderOptions.coerce(encoder_options, "encoder_options")
    if MULTIQUERY in methods and options.backend != "torch":
        raise ValueError(f"`encoder_options` backend {options.backend!r} does not apply to {MULTIQUERY!r}, whose "
                         f"queries Haystack's SentenceTransformersTextEmbedder embeds with torch; evaluate it apart.")
    return options


def dense_retriever(collection, encoder, store, device, progress_bar, timings, encoder_options=None):
    """An `ExpandRRetriever` over `store` (built from the collection's corpus with `encoder` when None); the query
    side, and the indexing when `encoder_options` is given, run with `encoder_options`."""
    from expandr_haystack.components.embedder import ExpandRQueryEmbedder
    from expandr_haystack.components.retriever import ExpandRRetriever
    from expandr_haystack.evaluation.indexing import build_document_store
    from expandr_haystack.options import EncoderOptions

    if store is None:
        started = time.perf_counter()
        store = build_document_store(collection.documents(), model=encoder, device=device,
                                     progress_bar=progress_bar, encoder=encoder_options)
        timings["index-dense"] = time.perf_counter() - started
    elif store.count_documents() == 0:
        raise ValueError("`store` is empty: pass a store holding the embedded corpus, or None to index it here.")
    options = EncoderOptions.coerce(encoder_options, "encoder_options").replace(progress_bar=progress_bar)
    embedder = ExpandRQueryEmbedder(model=encoder, device=device, encoder=options)
    retriever = ExpandRRetriever(document_store=store, top_k=TOP_K, device=device, query_embedder=embedder)
    retriever.warm_up()
    return retriever


def _bm25(collection, queries, progress_bar, timings, top_k: int = TOP_K) -> list[list[Document]]:
    from haystack.components.retrievers.in_memory import InMemoryBM25Retriever
    from haystack.document_stores.in_memory import InMemoryDocumentStore

    started = time.perf_counter()
    bm25_store = InMemoryDocumentStore(bm25_algorithm="BM25Okapi")
    bm25_store.write_documents(bm25_documents(collection))
    timings["index-bm25"] = time.perf_counter() - started
    retriever = InMemoryBM25Retriever(document_store=bm25_store, top_k=top_k)
    return [retriever.run(query=q)["documents"]
            for q in tqdm(queries, desc="BM25 search", unit="query", disable=not progress_bar)]


__all__ = ["DEFAULT_METHODS", "EXPANSION_METHODS", "METHODS", "MULTIQUERY", "TOP_K", "WEIGHTED_METHODS", "EvalResult",
           "bm25_documents", "check_encoder_options", "default_expander", "dense_retriever", "evaluate", "expand_texts", "family_texts",
           "grounded_like", "method_settings", "method_weights", "parse_methods"]
