"""
Retrieval evaluation on a BEIR-layout collection: BM25, dense, and ExpandR (mean and RRF fusion).

`evaluate` is the library entry point used by `expandr eval` and by the joint-training code for its per-round
numbers; `format_table` and `plot_metrics` present the result.

Usage:
```python
from expandr_haystack.data import bundled_path, load_collection
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from haystack import Document
from haystack.document_stores.types import DocumentStore
from haystack.utils import ComponentDevice
from tqdm.auto import tqdm

from expandr_haystack.data import Collection
from expandr_haystack.metrics import METRICS, evaluate_run, run_from_documents

logger = logging.getLogger(__name__)

#: The methods `evaluate` knows, in their canonical order.
METHODS = ("bm25", "dense", "expand", "expand-rrf")
#: Documents retrieved per query (Recall@100 needs 100).
TOP_K = 100
_LABELS = {"ndcg@10": "nDCG@10", "recall@100": "Recall@100", "mrr@10": "MRR@10"}


class EvalResult(dict):
    """
    The result of `evaluate`: a plain ``dict`` ``{method: {"ndcg@10", "recall@100", "mrr@10", "queries"}}``
    (means over the judged queries, metric values in [0, 1]; JSON-serialisable as is), with extra attributes:

    - `per_query`: ``{method: {query_id: {"ndcg@10", "recall@100", "mrr@10"}}}``;
    - `expansions`: ``{query_id: [expansion, ...]}`` when an expansion method ran, else ``{}``;
    - `warnings`: the data warnings of the collection (e.g. judged documents missing from the corpus);
    - `timings`: seconds spent per step (``"index-dense"``, ``"index-bm25"``, ``"expansion"``, and each method).
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
    methods: str | Sequence[str] = METHODS,
    encoder: str | None = None,
    llm: str | None = None,
    adapter: str | None = None,
    n_expansions: int = 1,
    cache: str | None = None,
    max_new_tokens: int = 96,
    batch_size: int = 16,
    seed: int = 42,
    expander: Any | None = None,
    progress_bar: bool = True,
    store: DocumentStore | None = None,
    device: ComponentDevice | None = None,
    backend: str = "auto",
) -> EvalResult:
    """
    Evaluate retrieval methods on a collection's judged queries with pytrec_eval (nDCG@10, Recall@100, MRR@10).

    Methods:
    - `bm25`: Haystack `InMemoryBM25Retriever` (BM25Okapi) over an `InMemoryDocumentStore` of title + text;
    - `dense`: `ExpandRRetriever` with the encoder and no expansion;
    - `expand`: `LLMQueryExpander` + `ExpandRRetriever`, the ExpandR fused (mean) query vector;
    - `expand-rrf`: the same expansions, reciprocal-rank fusion of the query's and each expansion's search.
    The expansions are generated once (batched, through the persistent cache when `cache` is set) and shared by
    `expand` and `expand-rrf`. Each method retrieves the top 100 documents per query.

    :param collection: A collection from `expandr_haystack.data.load_collection` (judged queries of one split).
    :param methods: Method names (a sequence or a comma-separated string), run in the given order.
    :param encoder: Sentence-transformers encoder for the dense methods (None = bundled all-MiniLM-L6-v2).
    :param llm: The expansion LLM (None = bundled SmolLM2-135M-Instruct); ignored when `expander` is given.
    :param adapter: A PEFT LoRA adapter directory for `llm`; ignored when `expander` is given.
    :param n_expansions: Expansions per query (>= 1).
    :param cache: Path of the persistent expansion cache (sqlite); None = no cache. Ignored with `expander`.
    :param max_new_tokens: Expansion length limit. Ignored with `expander`.
    :param backend: The expander's generation engine (see `LLMQueryExpander`). Ignored with `expander`.
    :param batch_size: Rows generated together by the LLM. Ignored with `expander`.
    :param seed: Base seed of the expansions. Ignored with `expander`.
    :param expander: An already constructed `LLMQueryExpander` (e.g. the one being trained) to use instead of
        building one from `llm`/`adapter`/...; it generates `n_expansions` expansions per query.
    :param progress_bar: Show progress bars for indexing, expansion and search.
    :param store: A document store already holding the corpus embedded with `encoder` (e.g. from
        `expandr_haystack.indexing.build_document_store`), reused instead of indexing again; pass None whenever
        the encoder's weights changed since it was built.
    :param device: Device for the encoder and the LLM (None = best available).
    :returns: An `EvalResult`: ``{method: {"ndcg@10", "recall@100", "mrr@10", "queries"}}`` (a dict) with
        `.per_query`, `.expansions`, `.warnings` and `.timings`.
    :raises ValueError: On an unknown method, bad settings, or a collection without judged queries.
    """
    names = parse_methods(methods)
    if not isinstance(collection, Collection):
        raise TypeError(f"`collection` must be an expandr_haystack.data.Collection (see load_collection); "
                        f"got {type(collection).__name__}.")
    if not collection.queries:
        raise ValueError(f"`collection` ({collection.path}, split {collection.split!r}) has no judged queries.")
    if not collection.corpus:
        raise ValueError(f"`collection` ({collection.path}) has an empty corpus.")
    if not isinstance(n_expansions, int) or isinstance(n_expansions, bool) or n_expansions < 1:
        raise ValueError(f"`n_expansions` must be an integer >= 1; got {n_expansions!r}.")

    query_ids = list(collection.queries)
    queries = [collection.queries[q] for q in query_ids]
    result = EvalResult(warnings=collection.warnings)
    runs: dict[str, list[list[Document]]] = {}
    needs_dense = any(m != "bm25" for m in names)
    needs_expansions = any(m.startswith("expand") for m in names)

    retriever = None
    if needs_dense:
        retriever = _dense_retriever(collection, encoder, store, device, progress_bar, result.timings)

    expansions: list[list[str]] | None = None
    if needs_expansions:
        if expander is None:
            from expandr_haystack.components.expander import LLMQueryExpander

            expander = LLMQueryExpander(model=llm, adapter=adapter, n_expansions=n_expansions, cache=cache,
                                        max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed,
                                        device=device, progress_bar=progress_bar, backend=backend)
        started = time.perf_counter()
        expander.warm_up()
        expansions = expander.expand(queries, n=n_expansions)
        result.timings["expansion"] = time.perf_counter() - started
        result.expansions = dict(zip(query_ids, expansions))
        empty = sum(1 for e in expansions if not e)
        if empty:
            logger.warning("%d of %d queries got no expansion; they are searched with the query alone.", empty,
                           len(queries))

    for name in names:
        started = time.perf_counter()
        if name == "bm25":
            runs[name] = _bm25(collection, queries, progress_bar, result.timings)
        elif name == "dense":
            retriever.fusion = "mean"
            runs[name] = retriever.retrieve(queries, None, top_k=TOP_K)
        else:
            retriever.fusion = "mean" if name == "expand" else "rrf"
            runs[name] = retriever.retrieve(queries, expansions, top_k=TOP_K)
        result.timings[name] = time.perf_counter() - started
        means, per_query = evaluate_run(collection.qrels, run_from_documents(query_ids, runs[name]))
        result[name] = {m: float(means[m]) for m in METRICS} | {"queries": int(means["queries"])}
        result.per_query[name] = per_query
    return result


def _dense_retriever(collection, encoder, store, device, progress_bar, timings):
    from expandr_haystack.components.retriever import ExpandRRetriever
    from expandr_haystack.indexing import build_document_store

    if store is None:
        started = time.perf_counter()
        store = build_document_store(collection.documents(), model=encoder, device=device,
                                     progress_bar=progress_bar)
        timings["index-dense"] = time.perf_counter() - started
    elif store.count_documents() == 0:
        raise ValueError("`store` is empty: pass a store holding the embedded corpus, or None to index it here.")
    retriever = ExpandRRetriever(document_store=store, model=encoder, top_k=TOP_K, device=device,
                                 progress_bar=progress_bar)
    retriever.warm_up()
    return retriever


def _bm25(collection, queries, progress_bar, timings) -> list[list[Document]]:
    from haystack.components.retrievers.in_memory import InMemoryBM25Retriever
    from haystack.document_stores.in_memory import InMemoryDocumentStore

    started = time.perf_counter()
    bm25_store = InMemoryDocumentStore(bm25_algorithm="BM25Okapi")
    bm25_store.write_documents(bm25_documents(collection))
    timings["index-bm25"] = time.perf_counter() - started
    retriever = InMemoryBM25Retriever(document_store=bm25_store, top_k=TOP_K)
    return [retriever.run(query=q)["documents"]
            for q in tqdm(queries, desc="BM25 search", unit="query", disable=not progress_bar)]


def format_table(results: dict[str, dict[str, float]], title: str | None = None) -> str:
    """
    A plain-text table of `results` (one row per method; metrics x100 with two decimals).

    :param results: ``{method: {"ndcg@10", "recall@100", "mrr@10", "queries"}}``, e.g. an `EvalResult`.
    :param title: An optional first line.
    """
    header = f"{'method':<12}" + "".join(f"{_LABELS[m]:>12}" for m in METRICS) + f"{'queries':>9}"
    lines = ([title] if title else []) + [header, "-" * len(header)]
    for name, row in results.items():
        lines.append(f"{name:<12}" + "".join(f"{100 * row[m]:>12.2f}" for m in METRICS)
                     + f"{int(row.get('queries', 0)):>9}")
    return "\n".join(lines)


def plot_metrics(results: dict[str, dict[str, float]], path: str | Path, title: str | None = None) -> Path:
    """
    Save a grouped bar chart of `results` (one group per metric, one bar per method; values x100) as an image.

    :param results: ``{method: {"ndcg@10", "recall@100", "mrr@10", ...}}``, e.g. an `EvalResult`.
    :param path: Output file; the format follows its suffix (.png, .pdf, .svg).
    :param title: Chart title.
    :returns: The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        raise ValueError("`results` is empty: nothing to plot.")
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    methods = list(results)
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(METRICS) * max(1, len(methods)) * 0.5, 4))
    for i, name in enumerate(methods):
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(METRICS))]
        values = [100 * results[name][m] for m in METRICS]
        bars = ax.bar(xs, values, width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    ax.set_xticks(range(len(METRICS)), [_LABELS[m] for m in METRICS])
    ax.set_ylabel("score x100")
    ax.set_ylim(0, 105)
    queries = {int(r.get("queries", 0)) for r in results.values()}
    ax.set_title(title or f"Retrieval quality ({'/'.join(map(str, sorted(queries)))} queries)")
    ax.legend(loc="upper left", fontsize=8, ncols=min(4, len(methods)))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = ["METHODS", "EvalResult", "bm25_documents", "evaluate", "format_table", "parse_methods", "plot_metrics"]
