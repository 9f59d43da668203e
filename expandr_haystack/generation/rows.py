"""
Row planning, shared by every engine: the chat messages a query is generated from, and one row per (query, sample)
with its cache key and its seed. The messages planned here are the ones the engine samples and the ones a DPO pair
trains on (`LLMQueryExpander.prompt_messages`), so the two cannot drift apart.

Usage:
```python
prompts = row_prompts(sampler, EXPANSION_PROMPT, None, ["what is lift ?"])
rows = plan_rows(sampler, prompts, n=2, temperatures=[1.0], prompt=EXPANSION_PROMPT, system_prompt=None,
                 generation=GenerationSettings(), sampler_options=SamplerOptions())
```
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from expandr_haystack.cache import cache_key
from expandr_haystack.core.text import chat_messages, format_passages

logger = logging.getLogger(__name__)

#: Engines whose texts are cached under the plain row key (the others add their name: a draw within rounding of a
#: nucleus boundary can differ between engines, and a cache hit must be what this configuration generates).
PLAIN_CACHE_ENGINES = ("transformers", "remote")


@dataclass
class ExpansionRow:
    """One text to generate: sample `sample` of query `query_index`, with its cache key and its seed's key."""

    query_index: int
    sample: int
    query: str
    messages: list[dict[str, str]]
    temperature: float
    key: str  # the cache key (the seed key plus the engine where the engine's texts are cached apart)
    seed_key: str  # the row's random stream: does not depend on the engine that samples it
    text: str | None = None
    error: Exception | None = None


def engine_cache_key(seed_key: str, engine: str) -> str:
    """The cache key of a text whose seed key is `seed_key`: the seed key itself for `PLAIN_CACHE_ENGINES`, else a key
    that adds the engine (its texts are cached apart)."""
    return seed_key if engine in PLAIN_CACHE_ENGINES else cache_key(row=seed_key, engine=engine)


def row_seed(*parts: Any) -> int:
    """The sampling seed of a row (its base seed, seed key and attempt)."""
    return int(hashlib.sha256("|".join(map(str, parts)).encode("utf-8", errors="replace")).hexdigest()[:15], 16)


def row_prompts(sampler, prompt: str, system_prompt: str | None, queries: Sequence[str],
                documents: Sequence[str] | None = None, passages: Sequence[Sequence[Any]] | None = None,
                passages_k: int = 3, passage_words: int = 50) -> list[dict[str, Any]]:
    """Per query: the query and document cut to the sampler's prompt budget, the prompt's fields and the chat
    messages. Inputs are trusted (checked by the component)."""
    out = []
    for qi, query in enumerate(queries):
        query = sampler.truncate(query, "query")
        doc = None if documents is None else sampler.truncate(documents[qi], "documents")
        fields = {} if passages is None else {"passages": format_passages(passages[qi], passages_k, passage_words)}
        out.append({"query": query, "document": doc, "fields": fields,
                    "messages": chat_messages(prompt, query, system_prompt, doc, **fields)})
    return out


def extra_key_parts(generation, sampler_options) -> dict[str, Any]:
    """Cache-key parts of the settings beyond the original ones, present only when set: keys made with the default
    settings stay exactly those of earlier versions (existing caches stay valid)."""
    parts: dict[str, Any] = {}
    if generation.generation_kwargs:
        parts["generation_kwargs"] = generation.generation_kwargs
    if sampler_options.model_kwargs:
        serialized = sampler_options.to_dict()["init_parameters"]["model_kwargs"]
        parts["model_kwargs"] = json.loads(json.dumps(serialized, sort_keys=True, default=repr))
    return parts


def plan_rows(sampler, prompts: list[dict[str, Any]], n: int, temperatures: Sequence[float], prompt: str,
              system_prompt: str | None, generation, sampler_options) -> list[ExpansionRow]:
    """`n` rows per query of `prompts` (`row_prompts`); sample i at `temperatures[i % len(temperatures)]`. The seed
    key holds everything the text depends on; the cache key adds the engine where its texts are cached apart."""
    extra = extra_key_parts(generation, sampler_options)
    rows = []
    for qi, p in enumerate(prompts):
        for i in range(n):
            t = temperatures[i % len(temperatures)]
            seed_key = cache_key(model=sampler.identity, prompt=prompt, system=system_prompt, query=p["query"],
                                 document=p["document"], index=i, temperature=t, top_p=generation.top_p,
                                 max_new_tokens=generation.max_new_tokens, seed=generation.seed, **p["fields"],
                                 **extra)
            key = engine_cache_key(seed_key, sampler.engine)
            rows.append(ExpansionRow(qi, i, p["query"], p["messages"], t, key, seed_key))
    return rows


def take_outputs(rows: list[ExpansionRow], outs: list[str | Exception]) -> None:
    """Store each engine output (a text, or the exception of a row that failed) on its row."""
    for r, out in zip(rows, outs):
        if isinstance(out, Exception):
            r.text, r.error = "", out
        else:
            r.text, r.error = out, (None if out else ValueError("the model produced only empty text"))


def failure_counts(rows: list[ExpansionRow]) -> dict[int, int]:
    """``{query index: failed samples}`` (empty when every row has a text)."""
    failures: dict[int, int] = {}
    for r in rows:
        if not r.text:
            failures[r.query_index] = failures.get(r.query_index, 0) + 1
    return failures


def collect_rows(rows: list[ExpansionRow], n_queries: int, attempts: int, raise_on_failure: bool) -> list[list[str]]:
    """Each query's texts in sample order. A failed row is logged and skipped, or (`raise_on_failure`) raised after
    the batch, the rows that worked being cached by the caller."""
    out: list[list[str]] = [[] for _ in range(n_queries)]
    failed = [r for r in rows if not r.text]
    for r in rows:
        if r.text:
            out[r.query_index].append(r.text)
    if failed and raise_on_failure:
        first = failed[0]
        raise RuntimeError(f"LLMQueryExpander: no expansion for query {first.query!r:.80} (sample {first.sample}) "
                           f"after {attempts} attempts: {first.error}" + (
                               f" ({len(failed)} rows failed in all; the others are cached)" if len(failed) > 1
                               else "")) from first.error
    for r in failed:
        logger.warning("LLMQueryExpander: no expansion for query %r (sample %d) after %d attempts: %s; skipped "
                       "(on_failure='skip').", r.query[:80], r.sample, attempts, r.error)
    return out


__all__ = ["PLAIN_CACHE_ENGINES", "ExpansionRow", "collect_rows", "engine_cache_key", "extra_key_parts", "failure_counts", "plan_rows",
           "row_prompts", "row_seed", "take_outputs"]
