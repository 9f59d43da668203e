"""LLMQueryExpander: the ExpandR query expander (an LLM writes a passage that answers the query)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from haystack import Document, component, default_from_dict, default_to_dict

from expandr_haystack.cache import ExpansionCache, check_cache_path
from expandr_haystack.checks import check_choice, check_int
from expandr_haystack.core.text import (
    ANSWER_PROMPT,
    EXPANSION_PROMPT,
    GROUNDED_PROMPT,
    check_query,
    clean_generation,
    has_placeholder,
)
from expandr_haystack.generation import check_local_model, make_sampler
from expandr_haystack.generation.rows import (
    ExpansionRow,
    collect_rows,
    failure_counts,
    plan_rows,
    row_prompts,
    row_seed,
    take_outputs,
)
from expandr_haystack.models import DEFAULT_LLM
from expandr_haystack.options import GenerationSettings, SamplerOptions, fold_legacy

ON_FAILURE = ("skip", "raise")
#: Old flat names of files saved before the option groups, and the field each is now.
LEGACY_NAMES = {"backend": "engine", "precision": "weight_precision"}
_GENERATION_FIELDS = {f.name for f in fields(GenerationSettings)}
_SAMPLER_FIELDS = {f.name for f in fields(SamplerOptions)}


@component
class LLMQueryExpander:
    """
    Writes pseudo-documents (expansions) for a query with an LLM, as in ExpandR.

    The prompt (default: the ExpandR q2d prompt) is applied through the model's chat template. The local model is a
    ``transformers`` causal LM (bundled SmolLM2-135M-Instruct by default, any HF id or path, plus an optional PEFT
    LoRA ``adapter`` from training), loaded and run as `sampler` (a `SamplerOptions`) says; alternatively any
    Haystack ChatGenerator (``OpenAIChatGenerator``, ``HuggingFaceLocalChatGenerator``, ...) can be passed ready-made
    as ``chat_generator``. What is sampled (temperature, top-p, length, seed) is `generation` (a
    `GenerationSettings`). The engines live in `expandr_haystack.generation`.

    Every generated row (query x sample index) has its own seed, so the same seed gives the same expansions no
    matter how queries are batched or which ones were already cached. Outputs are cleaned of chat preambles; an
    empty generation is retried with a new seed. A row that still fails never costs the batch: with
    ``on_failure="skip"`` (default) the query keeps its other expansions (or none: retrieval then uses the query
    alone, as Haystack's own ``QueryExpander`` falls back to the original query), with a warning, and the failure is
    counted in ``failures`` and ``last_failures``; ``on_failure="raise"`` raises after the batch (the rows that
    worked are cached).

    Usage:
    ```python
    from expandr_haystack import LLMQueryExpander
    from expandr_haystack.options import GenerationSettings

    expander = LLMQueryExpander(n_expansions=2, generation=GenerationSettings(temperature=0.7),
                                cache="expansions.sqlite")
    expander.warm_up()
    result = expander.run(query="what similarity laws must be obeyed when constructing aeroelastic models?")
    print(result["expansions"][0])
    ```
    """

    def __init__(
        self,
        model: str | None = None,
        adapter: str | None = None,
        chat_generator: Any | None = None,
        prompt: str = EXPANSION_PROMPT,
        system_prompt: str | None = None,
        n_expansions: int = 1,
        generation: GenerationSettings | dict[str, Any] | None = None,
        sampler: SamplerOptions | dict[str, Any] | None = None,
        cache: str | None = None,
        on_failure: str = "skip",
        passages_k: int = 3,
        passage_words: int = 50,
    ):
        """
        :param model: None for the bundled SmolLM2-135M-Instruct, or a Hugging Face model id or local directory.
        :param adapter: Directory of a PEFT LoRA adapter (e.g. from `training/joint.py`), applied to `model`.
        :param chat_generator: A Haystack ChatGenerator to use instead of a local model (remote APIs).
        :param prompt: Template with a `{query}` placeholder, sent as the user turn; optionally `{document}` (the
            answer prompt, `ANSWER_PROMPT`) or `{passages}` (grounded expansion, `GROUNDED_PROMPT`: the expander then
            reads the `documents` of a first retrieval). Each may also be written as Haystack's Jinja
            `{{ query }}`, `{{ document }}`, `{{ passages }}` (`core.text.render_prompt` fills both forms).
        :param system_prompt: Optional system message.
        :param n_expansions: Expansions per query (>= 1).
        :param generation: What is sampled: a `GenerationSettings` (or a dict of its fields): temperature, top_p,
            max_new_tokens, batch_size, seed, progress_bar, and `generation_kwargs` passed through to a
            `chat_generator`.
        :param sampler: How the local model is loaded and run: a `SamplerOptions` (or a dict of its fields): engine,
            device, dtype, weight_precision, max_prompt_tokens, model_kwargs, token, and the remote retry settings.
        :param cache: Path of a persistent sqlite cache; None = no cache. Read-only: hits served, misses not stored.
        :param on_failure: "skip" (a row that fails every attempt is left out, with a warning; retrieval uses the
            query and its remaining expansions) or "raise".
        :param passages_k: Grounded prompts: how many of the given documents go into `{passages}`.
        :param passage_words: Grounded prompts: words kept of each passage (title first).
        """
        if not isinstance(prompt, str) or not has_placeholder(prompt, "query"):
            raise ValueError(f"`prompt` must be a string containing the placeholder '{{query}}' (or Jinja "
                             f"'{{{{ query }}}}'); got {prompt!r:.120}.")
        if has_placeholder(prompt, "document") and has_placeholder(prompt, "passages"):
            raise ValueError("`prompt` may hold '{document}' (answer prompt) or '{passages}' (grounded expansion), "
                             "not both.")
        check_int(n_expansions, "n_expansions")
        self.generation = GenerationSettings.coerce(generation, "generation")
        self.sampler_options = SamplerOptions.coerce(sampler, "sampler")
        check_choice(on_failure, "on_failure", ON_FAILURE)
        check_int(passages_k, "passages_k")
        check_int(passage_words, "passage_words")
        if chat_generator is not None:
            if model is not None or adapter is not None:
                raise ValueError("Pass either `chat_generator` or a local `model`/`adapter`, not both.")
            options = self.sampler_options
            if options.model_kwargs or options.engine == "vllm" or options.weight_precision not in ("float32",
                                                                                                   "auto"):
                raise ValueError("`sampler` settings `model_kwargs`, `engine='vllm'` and `weight_precision` apply to "
                                 "a local model, not with `chat_generator`.")
        else:
            check_local_model(model, adapter, self.generation)  # a missing local path fails here, naming `model`
        self.model = model
        self.adapter = adapter
        self.chat_generator = chat_generator
        self.prompt = prompt
        self.system_prompt = system_prompt
        self.n_expansions = n_expansions
        self.cache = check_cache_path(cache)  # a bad value in a pipeline YAML fails when it loads
        self.on_failure = on_failure
        self.passages_k = passages_k
        self.passage_words = passage_words
        self._sampler = None
        self._cache: ExpansionCache | None = None
        #: ``{query index: failed samples}`` of the last `expand` call (empty when every row worked).
        self.last_failures: dict[int, int] = {}

    def to_dict(self) -> dict[str, Any]:
        """Serialize to a dictionary (secrets stay environment-variable references)."""
        return default_to_dict(
            self, model=self.model, adapter=self.adapter, chat_generator=self.chat_generator, prompt=self.prompt,
            system_prompt=self.system_prompt, n_expansions=self.n_expansions, generation=self.generation,
            sampler=self.sampler_options, cache=self.cache, on_failure=self.on_failure, passages_k=self.passages_k,
            passage_words=self.passage_words)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LLMQueryExpander:
        """Deserialize from a dictionary made by `to_dict` (the input is not modified). Files saved before the
        option groups (flat `temperature`, `backend`, `precision`, ...) load with the same settings; `backend` and
        `precision` are read with a DeprecationWarning naming their new place; they were made in float32, so they keep
        `weight_precision="float32"` unless they say otherwise (the default became "auto" later)."""
        params = dict(data.get("init_parameters", {}))
        flat = set(params) & (_GENERATION_FIELDS | _SAMPLER_FIELDS | set(LEGACY_NAMES))
        params = fold_legacy(params, "generation", GenerationSettings, cls.__name__)
        params = fold_legacy(params, "sampler", SamplerOptions, cls.__name__, LEGACY_NAMES)
        if flat:
            sampler = params.get("sampler") or {}
            params["sampler"] = {"weight_precision": "float32"} | dict(sampler.get("init_parameters", sampler))
        return default_from_dict(cls, {**data, "init_parameters": params})

    def warm_up(self) -> None:
        """Load the local model (or warm the chat generator) and open the cache; calling it again does nothing."""
        if self._sampler is None:
            self._sampler = make_sampler(self.model, self.adapter, self.chat_generator, self.sampler_options)
        if self.cache is not None and self._cache is None:
            self._cache = ExpansionCache(self.cache, on_read_only="skip")  # hits served, misses not stored

    def with_settings(self, **changes: Any) -> LLMQueryExpander:
        """
        A copy with some settings changed (checked like `__init__`): an init parameter (`prompt=...`) or a field of
        `generation` / `sampler` by its name (`seed=7`, `temperature=0.5`, `engine="transformers"`). The copy
        shares this expander's loaded engine (unless the model, adapter, generator or a sampler field changed) and
        its open cache.
        """
        names = ("model", "adapter", "chat_generator", "prompt", "system_prompt", "n_expansions", "generation",
                 "sampler", "cache", "on_failure", "passages_k", "passage_words")
        unknown = sorted(set(changes) - set(names) - _GENERATION_FIELDS - _SAMPLER_FIELDS)
        if unknown:
            raise ValueError(f"`with_settings`: unknown setting(s) {unknown}; valid: {sorted(names)}, the fields "
                             f"of GenerationSettings {sorted(_GENERATION_FIELDS)} and of SamplerOptions "
                             f"{sorted(_SAMPLER_FIELDS)}.")
        params = {n: getattr(self, n) for n in names if n not in ("generation", "sampler")}
        params["generation"] = self.generation.replace(**{k: v for k, v in changes.items() if k in _GENERATION_FIELDS})
        params["sampler"] = self.sampler_options.replace(**{k: v for k, v in changes.items() if k in _SAMPLER_FIELDS})
        copy = type(self)(**(params | {k: v for k, v in changes.items() if k in names}))
        if (copy.model, copy.adapter, copy.chat_generator, copy.sampler_options) == (
                self.model, self.adapter, self.chat_generator, self.sampler_options):
            copy._sampler = self._sampler
        if copy.cache == self.cache:
            copy._cache = self._cache
        return copy

    @property
    def cache_stats(self) -> dict[str, int]:
        """Hits, misses and entries of the persistent cache (zeros when there is none)."""
        return self._cache.stats() if self._cache else {"hits": 0, "misses": 0, "entries": 0}

    @property
    def engine(self) -> str:
        """The generation engine in use after `warm_up`: "packed" (float32; "packed-int8-smoothed.3",
        "packed-int8-smoothed.3-w64" (7-bit weights), "packed-bfloat16" in another precision), "transformers",
        "vllm" or "remote"."""
        self.warm_up()
        return self._sampler.engine

    @property
    def grounded(self) -> bool:
        """Whether the prompt reads retrieved passages (`{passages}`): `run` then needs `documents`."""
        return has_placeholder(self.prompt, "passages")

    # -- public API (the edge: inputs are checked here, once) -----------------------------------------------
    @component.output_types(query=str, expansions=list[str], failures=list[str])
    def run(self, query: str, document: str | None = None, documents: list[Document] | None = None) -> dict[str, Any]:
        """
        Expand one query.

        :param query: The user query.
        :param document: Text for a `{document}` placeholder (answer prompts); unused by the default prompt.
        :param documents: The hits of a first retrieval, for a `{passages}` placeholder (grounded expansion; the
            first `passages_k` are used); unused by the default prompt.
        :returns: `query` (unchanged, for wiring to a retriever), `expansions` (`n_expansions` texts, fewer or none
            when generation failed) and `failures` (empty, or one line saying how many expansions were skipped and
            that retrieval then uses the query alone).
        """
        checked = self._checked([query], None if document is None else [document],
                                None if documents is None else [documents], "query")
        expansions = self._expand(*checked)[0]
        query = checked[0][0]
        return {"query": query, "expansions": expansions, "failures": self._failure_lines(expansions)}

    @component.output_types(query=str, expansions=list[str], failures=list[str])
    async def run_async(self, query: str, document: str | None = None,
                        documents: list[Document] | None = None) -> dict[str, Any]:
        """Async `run`: remote chat generators are called concurrently; a local model runs in a worker thread."""
        checked = self._checked([query], None if document is None else [document],
                                None if documents is None else [documents], "query")
        expansions = (await self._expand_async(*checked))[0]
        query = checked[0][0]
        return {"query": query, "expansions": expansions, "failures": self._failure_lines(expansions)}

    def expand(
        self,
        queries: Sequence[str],
        n: int | None = None,
        documents: Sequence[str] | None = None,
        temperatures: Sequence[float] | None = None,
        passages: Sequence[Sequence[Document | str]] | None = None,
    ) -> list[list[str]]:
        """
        Expand many queries at once (batched; cached rows cost nothing). `run` and the training code use this.

        :param queries: The queries.
        :param n: Expansions per query (default `n_expansions`).
        :param documents: One text per query for a `{document}` placeholder in the prompt.
        :param temperatures: Sample i of every query uses `temperatures[i % len(temperatures)]`
            (default: `generation.temperature` for all), e.g. `[0.8, 0.9, 1.0, 1.1]` for DPO candidates.
        :param passages: One list of retrieved documents per query, for a grounded (`{passages}`) prompt.
        :returns: For each query, its expansions in sample order (failed samples left out; see `on_failure`).
        """
        return self._expand(*self._checked(queries, documents, passages), n, temperatures)

    async def expand_async(self, queries: Sequence[str], n: int | None = None,
                           documents: Sequence[str] | None = None,
                           temperatures: Sequence[float] | None = None,
                           passages: Sequence[Sequence[Document | str]] | None = None) -> list[list[str]]:
        """Like `expand`, awaited: a remote generator gets up to `max_concurrency` calls in flight; a local model
        runs in a worker thread."""
        return await self._expand_async(*self._checked(queries, documents, passages), n, temperatures)

    def prompt_messages(self, queries: Sequence[str], documents: Sequence[str] | None = None,
                        passages: Sequence[Sequence[Document | str]] | None = None) -> list[list[dict[str, str]]]:
        """
        The chat messages each query is generated from, exactly as `expand` sends them (query and document cut to
        the engine's prompt budget, passages formatted): DPO pairs use these as their `prompt`, so the policy DPO
        trains is the one that sampled the candidates.
        """
        return [p["messages"] for p in self._prompts(*self._checked(queries, documents, passages))]

    # -- internals (inputs trusted: checked by the public methods above) -------------------------------------
    def _expand(self, queries, documents, passages, n=None, temperatures=None) -> list[list[str]]:
        rows = self._plan(queries, documents, passages, n, temperatures)
        missing = self._lookup(rows)
        if missing:
            self._generate(missing)
            self._store(missing)
        return self._collect(rows, len(queries))

    async def _expand_async(self, queries, documents, passages, n=None, temperatures=None) -> list[list[str]]:
        if self.chat_generator is None:
            return await asyncio.to_thread(self._expand, queries, documents, passages, n, temperatures)
        rows = self._plan(queries, documents, passages, n, temperatures)
        missing = self._lookup(rows)
        if missing:
            g = self.generation
            outs = await self._sampler.sample_async([r.messages for r in missing], [0] * len(missing),
                                                    [r.temperature for r in missing], g.top_p, g.max_new_tokens,
                                                    clean=self._cleaner(missing),
                                                    generation_kwargs=g.generation_kwargs)
            take_outputs(missing, outs)
            self._store(missing)
        return self._collect(rows, len(queries))

    def _checked(self, queries, documents, passages, query_argument: str | None = None):
        """The inputs of `expand` checked once: queries cleaned, documents and passages matched to them."""
        if isinstance(queries, str) or not isinstance(queries, Sequence):
            raise TypeError(f"`queries` must be a list of strings; got {type(queries).__name__}.")
        queries = [check_query(q, query_argument or f"queries[{i}]") for i, q in enumerate(queries)]
        needs_doc = has_placeholder(self.prompt, "document")
        if needs_doc and (documents is None or len(documents) != len(queries)):
            raise ValueError("This expander's `prompt` has a '{document}' placeholder: pass `documents`, one "
                             "string per query.")
        if documents is not None and len(documents) != len(queries):
            raise ValueError(f"`documents` must have one entry per query ({len(queries)}); got {len(documents)}.")
        if needs_doc:
            for qi, doc in enumerate(documents):
                if not isinstance(doc, str) or not doc.strip():
                    raise ValueError(f"`documents[{qi}]` must be a non-empty string.")
        if self.grounded:
            if passages is None or len(passages) != len(queries):
                raise ValueError("This expander's `prompt` has a '{passages}' placeholder (grounded expansion): pass "
                                 "the first retrieval's `documents` (`passages`), one list per query.")
            for qi, hits in enumerate(passages):
                if isinstance(hits, (str, Document)) or not isinstance(hits, Sequence):
                    raise TypeError(f"`passages[{qi}]` must be a list of Documents (the first retrieval's hits).")
        return queries, documents if needs_doc else None, passages if self.grounded else None

    def _prompts(self, queries, documents, passages) -> list[dict[str, Any]]:
        self.warm_up()
        return row_prompts(self._sampler, self.prompt, self.system_prompt, queries, documents, passages,
                           self.passages_k, self.passage_words)

    def _plan(self, queries, documents, passages, n, temperatures) -> list[ExpansionRow]:
        n = check_int(self.n_expansions if n is None else n, "n")
        temps = [self.generation.temperature] if temperatures is None else [float(t) for t in temperatures]
        if not temps or any(t < 0 for t in temps):
            raise ValueError(f"`temperatures` must be a non-empty list of numbers >= 0; got {temperatures!r}.")
        prompts = self._prompts(queries, documents, passages)  # loads the engine (warm_up)
        return plan_rows(self._sampler, prompts, n, temps, self.prompt,
                         self.system_prompt, self.generation, self.sampler_options)

    def _lookup(self, rows: list[ExpansionRow]) -> list[ExpansionRow]:
        if self._cache is not None:
            found = self._cache.get_many([r.key for r in rows])
            for r in rows:
                r.text = found.get(r.key)
        return [r for r in rows if r.text is None]

    def _store(self, rows: list[ExpansionRow]) -> None:
        if self._cache is not None:
            self._cache.put_many({r.key: r.text for r in rows if r.text})

    def _cleaner(self, rows: list[ExpansionRow]):
        return lambda k, text: clean_generation(text, rows[k].query)

    def _generate(self, rows: list[ExpansionRow]) -> None:
        """Fill `text` of every row: remote rows are retried inside the sampler (with backoff); local rows whose
        cleaned text is empty are sampled again with a new seed, up to `max_retries` times."""
        g = self.generation
        if self.chat_generator is not None:
            outs = self._sampler.sample([r.messages for r in rows], [0] * len(rows), [r.temperature for r in rows],
                                        g.top_p, g.max_new_tokens, clean=self._cleaner(rows),
                                        generation_kwargs=g.generation_kwargs)
            take_outputs(rows, outs)
            return
        todo = rows
        for attempt in range(self.sampler_options.max_retries + 1):
            outs = self._sampler.sample([r.messages for r in todo],
                                        [row_seed(g.seed, r.seed_key, attempt) for r in todo],
                                        [r.temperature for r in todo], g.top_p, g.max_new_tokens, g.batch_size,
                                        progress_bar=g.progress_bar and attempt == 0, desc="Expanding")
            take_outputs(todo, [clean_generation(out, r.query) for r, out in zip(todo, outs)])
            todo = [r for r in todo if not r.text]
            if not todo:
                break

    def _collect(self, rows: list[ExpansionRow], n_queries: int) -> list[list[str]]:
        self.last_failures = failure_counts(rows)
        return collect_rows(rows, n_queries, self.sampler_options.max_retries + 1, self.on_failure == "raise")

    def _failure_lines(self, expansions: list[str]) -> list[str]:
        missing = self.n_expansions - len(expansions)
        if missing <= 0:
            return []
        effect = ("retrieval uses the query alone" if not expansions
                  else "retrieval uses the query and the remaining expansions")
        return [(f"{missing} of {self.n_expansions} expansion(s) failed after {self.sampler_options.max_retries + 1} "
                 f"attempts and were skipped (on_failure='skip'); {effect}. The log has the error.")]


__all__ = ["ANSWER_PROMPT", "DEFAULT_LLM", "EXPANSION_PROMPT", "GROUNDED_PROMPT", "ExpansionRow", "LLMQueryExpander",
           "clean_generation"]
