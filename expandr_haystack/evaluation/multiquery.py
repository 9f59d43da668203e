"""
`haystack_multiquery`: Haystack's own query expansion as a baseline, with the same LLM and encoder as ours.

Haystack's `QueryExpander` asks the LLM for `n_expansions` alternative queries as JSON, with its own prompt
(unchanged), and Haystack's `MultiQueryEmbeddingRetriever` searches with each query (the original included) and
merges the hits: deduplicated by document id, each document keeping its best score, sorted by score (the top `depth`
are evaluated). The LLM is the expansion methods' own (`LocalChatGenerator` with the expander's model, adapter,
sampling settings, seed and cache), and the query embedder is Haystack's `SentenceTransformersTextEmbedder` over the
same encoder and store as `dense`: only the method differs.

`QueryExpander` falls back to the original query alone when the reply is not a JSON object with a "queries" list of
strings (it reads the stripped reply with `json.loads`: a code fence or a sentence before the JSON fails); the query
is then searched as `dense` searches it. The bundled SmolLM2-135M-Instruct wrote readable JSON in 0 of 225 free
replies on Cranfield, so by default the local LLM's reply is started and ended for it (`JSON_PREFILL`: assistant
prefill, the structured output a Haystack user turns on for a small model): 125 of 225 replies readable (n=1, 3
seeds; 131 of 225 at n=3), the rest malformed JSON. QueryExpander still parses every reply itself.
`MultiQueryStats` counts the replies it could read and the fallbacks, and `stats_line` says them in words.

Usage:
```python
from expandr_haystack import LocalChatGenerator
from expandr_haystack.evaluation.multiquery import JSON_PREFILL, multiquery_pipeline

pipeline = multiquery_pipeline(store, LocalChatGenerator(cache="chat.sqlite", **JSON_PREFILL), n_expansions=2,
                               top_k=10)
docs = pipeline.run({"expander": {"query": "heat conduction in composite slabs"}})["retriever"]["documents"]
```
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from haystack import Document, Pipeline
from haystack.components.builders import PromptBuilder
from haystack.components.query import QueryExpander
from haystack.components.retrievers import MultiQueryEmbeddingRetriever
from haystack.components.retrievers.in_memory import InMemoryEmbeddingRetriever
from haystack.dataclasses import ChatMessage
from haystack.document_stores.in_memory import InMemoryDocumentStore
from haystack.utils import ComponentDevice
from tqdm.auto import tqdm

from expandr_haystack.checks import check_int

#: The logger of Haystack's QueryExpander: its one warning per unreadable reply is counted here instead of printed.
QUERY_EXPANDER_LOGGER = "haystack.components.query.query_expander"

#: The text `haystack_multiquery`'s replies start with: the opening of the JSON object QueryExpander's own prompt asks
#: for (``{"queries": ["...", ...]}``), written as the start of the assistant's turn so that the model continues it
#: with the first query (assistant prefill: a lighter form of OpenAI's `response_format` or llama.cpp's JSON grammar,
#: which constrain every token). Without it the bundled 135M model's replies were readable JSON in 0 of 225
#: Cranfield queries (code fences, the task restated, ``{"query": [...]}``) and the method reduced to `dense`; the
#: comparison should test the multi-query method, not a 135M model's JSON skills. The reply QueryExpander parses
#: starts with this text.
MULTIQUERY_REPLY_PREFIX = '{"queries": ["'
#: Where `haystack_multiquery`'s replies end: just after the first ``]}`` the model writes (the close of the queries
#: list and of the object), as a JSON grammar would stop it; without the cut the prefixed replies of the 135M model
#: run on past the object (another example, a restated task), which `json.loads` refuses (40 Cranfield queries,
#: temperature 1: 6 replies readable with the prefix alone, 20 with the prefix and the cut).
MULTIQUERY_REPLY_STOP = "]}"
#: The `LocalChatGenerator` settings of the JSON prefill (`multiquery_hits(prefill=True)`, `expandr eval
#: --multiquery-prefill`, the default): ``LocalChatGenerator(..., **JSON_PREFILL)``.
JSON_PREFILL = {"reply_prefix": MULTIQUERY_REPLY_PREFIX, "reply_stop": MULTIQUERY_REPLY_STOP}
#: Rows a batch of QueryExpander prompts (~330 tokens, ~10x a q2d prompt): at most this many keep the KV cache near
#: q2d's at 32 rows (`make run` peaked at 2,288 MiB with 32, 1,870 MiB with 8).
MULTIQUERY_BATCH_SIZE = 8


@dataclass
class MultiQueryStats:
    """What Haystack's QueryExpander made of the LLM's replies over a set of queries."""

    #: Queries expanded.
    queries: int = 0
    #: Replies that QueryExpander reads as JSON with a "queries" list of strings (None: replies not seen, e.g. from a
    #: remote generator).
    json_parsed: int | None = 0
    #: Queries searched with the original query alone (unreadable reply, or no new query in it).
    fallback: int = 0
    #: Queries searched in all (the originals included).
    searched: int = 0

    def add(self, query: str, searched: Sequence[str], reply: str | None = None) -> None:
        """Count one query: the queries QueryExpander returned for it (`searched`) and the LLM's `reply` (None when
        not seen: `json_parsed` becomes None)."""
        self.queries += 1
        self.searched += len(searched)
        self.fallback += {q.strip().lower() for q in searched} <= {query.strip().lower()}
        if reply is None:
            self.json_parsed = None
        elif self.json_parsed is not None:
            self.json_parsed += json_parsed(reply)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def total(cls, stats: Sequence[dict[str, Any]]) -> MultiQueryStats:
        """The sum of several runs' stats (e.g. one per seed)."""
        parsed = [s["json_parsed"] for s in stats]
        return cls(queries=sum(s["queries"] for s in stats), fallback=sum(s["fallback"] for s in stats),
                   searched=sum(s["searched"] for s in stats),
                   json_parsed=None if any(p is None for p in parsed) else sum(parsed))


def stats_line(stats: Sequence[dict[str, Any]], label: str = "haystack_multiquery") -> str:
    """One line on QueryExpander's replies over runs (`MultiQueryStats.to_dict` each): how many it could read as
    JSON, and how many queries fell back to the original query alone."""
    t = MultiQueryStats.total(stats)
    if not t.queries:
        return f"{label}: no query expanded"
    parsed = ("" if t.json_parsed is None else
              f"QueryExpander read the LLM's JSON in {t.json_parsed} of {t.queries} replies "
              f"({100 * t.json_parsed / t.queries:.1f}%); ")
    runs = f" over {len(stats)} seeds" if len(stats) > 1 else ""
    return (f"{label}: {parsed}{t.fallback} of {t.queries} queries ({100 * t.fallback / t.queries:.1f}%) fell back "
            f"to the original query alone{runs}; {t.searched / t.queries:.2f} queries searched per query")


def json_parsed(reply: str) -> bool:
    """Whether Haystack's QueryExpander (3.x `_parse_expanded_queries`) reads `reply`: the stripped text is a JSON
    object whose "queries" is a list holding at least one non-blank string."""
    try:
        parsed = json.loads(reply.strip())
    except json.JSONDecodeError:
        return False
    queries = parsed.get("queries") if isinstance(parsed, dict) else None
    return isinstance(queries, list) and any(isinstance(q, str) and q.strip() for q in queries)


def query_embedder(encoder: str | None = None, device: ComponentDevice | None = None):
    """Haystack's `SentenceTransformersTextEmbedder` over `encoder` (None = the bundled MiniLM), as the evaluation's
    indexing embeds the documents: its unit vectors are `dense`'s query vectors."""
    from haystack_integrations.components.embedders.sentence_transformers import SentenceTransformersTextEmbedder

    from expandr_haystack.models import resolve_encoder_path

    return SentenceTransformersTextEmbedder(model=resolve_encoder_path(encoder), device=device, progress_bar=False,
                                            normalize_embeddings=True, local_files_only=True)


def multiquery_pipeline(store: InMemoryDocumentStore, chat_generator: Any, n_expansions: int = 1, top_k: int = 10,
                        encoder: str | None = None, device: ComponentDevice | None = None) -> Pipeline:
    """
    Haystack's multi-query retrieval: `QueryExpander(chat_generator, n_expansions, include_original_query=True)` ->
    `MultiQueryEmbeddingRetriever(InMemoryEmbeddingRetriever(store, top_k), SentenceTransformersTextEmbedder)`.
    Run it with ``{"expander": {"query": q}}``; the retriever returns up to `top_k` documents per searched query,
    merged (best score per document, sorted).
    """
    if not isinstance(store, InMemoryDocumentStore):
        raise TypeError(f"`store` must be an InMemoryDocumentStore (Haystack's InMemoryEmbeddingRetriever searches "
                        f"it); got {type(store).__name__}.")
    check_int(n_expansions, "n_expansions")
    check_int(top_k, "top_k")
    p = Pipeline()
    p.add_component("expander", QueryExpander(chat_generator=chat_generator, n_expansions=n_expansions,
                                              include_original_query=True))
    p.add_component("retriever", MultiQueryEmbeddingRetriever(
        retriever=InMemoryEmbeddingRetriever(document_store=store, top_k=top_k),
        query_embedder=query_embedder(encoder, device)))
    p.connect("expander.queries", "retriever.queries")
    return p


def expander_messages(expander: QueryExpander, queries: Sequence[str],
                      n_expansions: int | None = None) -> list[list[ChatMessage]]:
    """The messages `expander` sends its chat generator for each query (its own template, filled as its `run` fills
    it), so that `LocalChatGenerator.generate` can answer them all in batches first."""
    builder = PromptBuilder(template=expander.prompt_template, required_variables=["n_expansions", "query"])
    n = expander.n_expansions if n_expansions is None else n_expansions
    return [[ChatMessage.from_user(builder.run(query=q.strip(), n_expansions=n)["prompt"])] for q in queries]


def chat_generator_like(expander: Any, cache: str | None = None, prefill: bool = True):
    """The chat generator of the expansion methods' LLM: `expander.chat_generator` when it has one (as it is: a
    remote API's structured output is its own settings), else a `LocalChatGenerator` with its model, adapter,
    generation and sampler settings, its cache (or `cache`), and `JSON_PREFILL` when `prefill`."""
    from expandr_haystack.components.chat_generator import LocalChatGenerator

    if expander.chat_generator is not None:
        return expander.chat_generator
    generation = expander.generation.replace(batch_size=min(expander.generation.batch_size, MULTIQUERY_BATCH_SIZE))
    return LocalChatGenerator(model=expander.model, adapter=expander.adapter, generation=generation,
                              sampler=expander.sampler_options, cache=expander.cache or cache,
                              **(JSON_PREFILL if prefill else {}))


@contextlib.contextmanager
def quiet_query_expander() -> Iterator[None]:
    """Hold back QueryExpander's per-query warnings (unreadable replies are counted instead); errors still show."""
    log = logging.getLogger(QUERY_EXPANDER_LOGGER)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def multiquery_hits(store: Any, queries: Sequence[str], query_ids: Sequence[str], expander: Any, depth: int,
                    encoder: str | None = None, device: ComponentDevice | None = None, progress_bar: bool = False,
                    timings: dict[str, float] | None = None,
                    prefill: bool = True) -> tuple[list[list[Document]], dict[str, Any]]:
    """
    The `haystack_multiquery` run of `evaluate`: every query through `multiquery_pipeline` with the expansion
    methods' LLM (`chat_generator_like(expander, prefill=prefill)`: a local LLM's replies start with
    `MULTIQUERY_REPLY_PREFIX` and end at `MULTIQUERY_REPLY_STOP` when `prefill`), `expander.n_expansions`
    alternatives, the top `depth` merged hits each. A local LLM first answers all queries in batches
    (`LocalChatGenerator.generate`: the same generator, so the same prompt, prefix and cache key; through the
    expander's cache, or a temporary one), so QueryExpander's one call per query is a cache hit.

    :returns: The hits per query, and ``{"stats": MultiQueryStats.to_dict(), "queries": {query_id: [searched
        query, ...]}, "replies": {query_id: reply}}`` (``replies`` empty with a remote generator).
    """
    from expandr_haystack.components.chat_generator import LocalChatGenerator

    timings = {} if timings is None else timings
    with contextlib.ExitStack() as stack:
        scratch = None if expander.cache else stack.enter_context(tempfile.TemporaryDirectory(prefix="multiquery-"))
        generator = chat_generator_like(expander, scratch and f"{scratch}/replies.sqlite", prefill)
        pipeline = multiquery_pipeline(store, generator, expander.n_expansions, depth, encoder, device)
        pipeline.warm_up()
        replies: dict[str, str] = {}
        if isinstance(generator, LocalChatGenerator):
            started = time.perf_counter()
            messages = expander_messages(pipeline.get_component("expander"), queries)
            replies = {q: r.text or "" for q, r in zip(query_ids, generator.generate(messages))}
            timings["expansion-multiquery"] = time.perf_counter() - started
        stats, hits, searched = MultiQueryStats(), [], {}
        with quiet_query_expander():
            for qid, query in tqdm(list(zip(query_ids, queries)), desc="Multi-query search", unit="query",
                                   disable=not progress_bar):
                out = pipeline.run({"expander": {"query": query}}, include_outputs_from={"expander"})
                searched[qid] = list(out["expander"]["queries"])
                hits.append(out["retriever"]["documents"][:depth])
                stats.add(query, searched[qid], replies.get(qid))
    return hits, {"stats": stats.to_dict(), "queries": searched, "replies": replies}


__all__ = ["JSON_PREFILL", "MULTIQUERY_BATCH_SIZE", "MULTIQUERY_REPLY_PREFIX", "MULTIQUERY_REPLY_STOP", "MultiQueryStats", "chat_generator_like",
           "expander_messages", "json_parsed", "multiquery_hits", "multiquery_pipeline", "query_embedder",
           "quiet_query_expander", "stats_line"]
