"""LLMQueryExpander: the ExpandR query expander (an LLM writes a passage that answers the query)."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from haystack import Document, component, default_from_dict, default_to_dict
from haystack.utils import ComponentDevice, Secret, deserialize_secrets_inplace

from expandr_haystack.cache import ExpansionCache, cache_key
from expandr_haystack.checks import check_adapter_dir, check_choice, check_int, check_number
from expandr_haystack.core.text import (
    ANSWER_PROMPT,
    EXPANSION_PROMPT,
    GROUNDED_PROMPT,
    chat_messages,
    check_query,
    clean_generation,
    format_passages,
    has_placeholder,
)
from expandr_haystack.generation import BACKENDS, PLAIN_CACHE_ENGINES, make_sampler
from expandr_haystack.generation.packed_llama import PRECISIONS
from expandr_haystack.models import DEFAULT_LLM, resolve_device, resolve_llm_path

logger = logging.getLogger(__name__)

ON_FAILURE = ("skip", "raise")
#: Settings the loaded engine depends on (`with_settings` keeps the engine when none of them changes).
_ENGINE_SETTINGS = ("model", "adapter", "chat_generator", "device", "dtype", "backend", "max_prompt_tokens",
                    "max_retries", "retry_backoff", "max_concurrency", "model_kwargs", "token", "precision")
#: `generation_kwargs` keys that are this component's own settings (the key wins over the argument).
GENERATION_SETTINGS = ("max_new_tokens", "temperature", "top_p")


def _split_generation_kwargs(generation_kwargs: dict[str, Any] | None, local: bool) -> tuple[dict, dict]:
    """``(own settings, the rest)`` of `generation_kwargs`; the rest only goes to a chat generator."""
    if generation_kwargs is None:
        return {}, {}
    if not isinstance(generation_kwargs, dict) or not all(isinstance(k, str) for k in generation_kwargs):
        raise TypeError(f"`generation_kwargs` must be a dict with string keys; got {generation_kwargs!r:.120}.")
    own = {k: v for k, v in generation_kwargs.items() if k in GENERATION_SETTINGS}
    rest = {k: v for k, v in generation_kwargs.items() if k not in GENERATION_SETTINGS}
    if local and rest:
        raise ValueError(f"`generation_kwargs`: {sorted(rest)} not supported by the local backends (they take "
                         f"{list(GENERATION_SETTINGS)}); other keys go only to a `chat_generator`.")
    return own, rest


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


def _row_seed(*parts: Any) -> int:
    return int(hashlib.sha256("|".join(map(str, parts)).encode("utf-8", errors="replace")).hexdigest()[:15], 16)


def _serialized_model_kwargs(model_kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
    """A JSON-friendly copy of `model_kwargs` (torch dtypes as "torch.bfloat16", as Haystack's HF components)."""
    if not model_kwargs:
        return None
    import copy

    from haystack.utils.hf import serialize_hf_model_kwargs

    out = copy.deepcopy(model_kwargs)
    serialize_hf_model_kwargs(out)
    return out


@component
class LLMQueryExpander:
    """
    Writes pseudo-documents (expansions) for a query with an LLM, as in ExpandR.

    The prompt (default: the ExpandR q2d prompt) is applied through the model's chat template. The local model is a
    ``transformers`` causal LM (bundled SmolLM2-135M-Instruct by default, any HF id or path, plus an optional PEFT
    LoRA ``adapter`` from training); alternatively any Haystack ChatGenerator (``OpenAIChatGenerator``,
    ``TransformersChatGenerator``, ...) can be passed as ``chat_generator``. The engines live in
    `expandr_haystack.generation`; this component plans the rows, serves them from the cache and cleans the text.

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

    expander = LLMQueryExpander(n_expansions=1, cache="expansions.sqlite")
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
        temperature: float = 1.0,
        top_p: float = 0.9,
        max_new_tokens: int = 96,
        batch_size: int = 16,
        seed: int = 42,
        cache: str | None = None,
        device: ComponentDevice | None = None,
        dtype: str = "auto",
        max_prompt_tokens: int = 1024,
        max_retries: int = 2,
        retry_backoff: float = 1.0,
        max_concurrency: int = 8,
        on_failure: str = "skip",
        progress_bar: bool = False,
        backend: str = "auto",
        passages_k: int = 3,
        passage_words: int = 50,
        generation_kwargs: dict[str, Any] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        token: Secret | None = Secret.from_env_var(["HF_API_TOKEN", "HF_TOKEN"], strict=False),  # noqa: B008
        precision: str = "float32",
    ):
        """
        Create the expander.

        :param model: None for the bundled SmolLM2-135M-Instruct, or a Hugging Face model id or local directory.
        :param adapter: Directory of a PEFT LoRA adapter (e.g. from `training/joint.py`), merged into `model`.
        :param chat_generator: A Haystack ChatGenerator to use instead of a local model (remote APIs).
        :param prompt: Template with a `{query}` placeholder, sent as the user turn; optionally `{document}` (the
            answer prompt, `ANSWER_PROMPT`) or `{passages}` (grounded expansion, `GROUNDED_PROMPT`: the expander then
            reads the `documents` of a first retrieval). Each may also be written as Haystack's Jinja
            `{{ query }}`, `{{ document }}`, `{{ passages }}` (`core.text.render_prompt` fills both forms).
        :param system_prompt: Optional system message.
        :param n_expansions: Expansions per query (>= 1).
        :param temperature: Sampling temperature (>= 0; 0 = greedy).
        :param top_p: Nucleus sampling mass, in (0, 1].
        :param max_new_tokens: Length limit of an expansion. The paper uses 512; the default 96 keeps CPU runs
            fast and covers the short passages a retriever's 256-token window uses anyway.
        :param batch_size: Rows generated together by the local model.
        :param seed: Base seed; each row's seed derives from it, the query and the sample index.
        :param cache: Path of a persistent sqlite cache; None = no cache.
        :param device: Device for the local model (None = best available).
        :param dtype: "auto" (bfloat16 on GPU, float32 on CPU), "float32", "bfloat16" or "float16".
        :param max_prompt_tokens: Longer queries (and documents) are truncated, with a warning, so the prompt fits.
        :param max_retries: Retries for empty generations (new seed) and failing remote calls (with backoff).
        :param retry_backoff: First wait in seconds between remote retries; doubles each time.
        :param max_concurrency: Remote calls in flight at once.
        :param on_failure: "skip" (a row that fails every attempt is left out, with a warning; retrieval uses the
            query and its remaining expansions) or "raise".
        :param progress_bar: Show a progress bar while generating.
        :param backend: Local generation engine. "auto": the packed float32 CPU decoder for Llama-architecture models
            in float32 on CPU (same math as transformers, about 2x faster), else transformers; "packed" (fail if the
            model does not allow it); "transformers"; "vllm" (GPU, in-process vLLM with the LoRA `adapter`; needs
            the `vllm` extra). Unused with `chat_generator`.
        :param passages_k: Grounded prompts: how many of the given documents go into `{passages}`.
        :param passage_words: Grounded prompts: words kept of each passage (title first).
        :param generation_kwargs: Generation settings as Haystack generators take them, e.g.
            ``{"max_new_tokens": 128, "temperature": 0.7, "top_p": 0.95}``: those three set the arguments of the same
            name (the key wins); any other key is passed through to the `chat_generator`'s `generation_kwargs` (with a
            local model it is refused: the local backends only take those three). Stored without the three.
        :param model_kwargs: Keyword arguments for ``AutoModelForCausalLM.from_pretrained`` of the local
            (transformers) model, e.g. ``{"device_map": "auto"}``, ``{"attn_implementation": "sdpa"}`` or a
            quantization config; part of the cache key when given. Not with `chat_generator` or `backend="vllm"`.
        :param token: Hugging Face token for gated models (the paper config names a gated Llama), passed to
            ``from_pretrained`` as ``token=``; default: the `HF_API_TOKEN` or `HF_TOKEN` environment variable when set.
            Serialized as a reference to the variable, never as its value.
        :param precision: Weight precision of the packed CPU decoder: "float32" (exact, the default), "int8"
            (per-channel int8 weights through FBGEMM on smoothed 8-bit inputs, the vocabulary head included, CPUs
            with AVX512-VNNI only; 1.7x float32's tokens/s, expand nDCG@10 not measurably different:
            docs/benchmarks.md, "Expansion at int8"), "bfloat16" (CPUs with native bfloat16 only: AVX512-BF16 or
            AMX) or "auto" (int8 where the CPU has AVX512-VNNI, else float32; `packed_llama.resolve_precision`). Texts in any precision but
            float32 are cached apart (float32 keys are unchanged). Local packed decoder only.
        """
        if not isinstance(prompt, str) or not has_placeholder(prompt, "query"):
            raise ValueError(f"`prompt` must be a string containing the placeholder '{{query}}' (or Jinja "
                             f"'{{{{ query }}}}'); got {prompt!r:.120}.")
        own, generation_kwargs = _split_generation_kwargs(generation_kwargs, local=chat_generator is None)
        temperature = own.get("temperature", temperature)
        top_p = own.get("top_p", top_p)
        max_new_tokens = own.get("max_new_tokens", max_new_tokens)
        if model_kwargs is not None and not (isinstance(model_kwargs, dict)
                                             and all(isinstance(k, str) for k in model_kwargs)):
            raise TypeError(f"`model_kwargs` must be a dict with string keys; got {model_kwargs!r:.120}.")
        if model_kwargs and (chat_generator is not None or backend == "vllm"):
            raise ValueError("`model_kwargs` go to transformers' from_pretrained of a local model; they do not apply "
                             "with `chat_generator` or `backend='vllm'`.")
        if token is not None and not isinstance(token, Secret):
            raise TypeError("`token` must be a haystack.utils.Secret (e.g. Secret.from_env_var('HF_TOKEN')) or None; "
                            f"got {type(token).__name__}.")
        check_int(n_expansions, "n_expansions")
        check_number(temperature, "temperature", 0.0)
        check_number(top_p, "top_p", 0.0, 1.0, low_open=True)
        for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size),
                            ("max_prompt_tokens", max_prompt_tokens), ("max_concurrency", max_concurrency)):
            check_int(value, name)
        check_int(max_retries, "max_retries", minimum=0)
        check_number(retry_backoff, "retry_backoff", 0.0)
        check_choice(backend, "backend", BACKENDS)
        check_choice(precision, "precision", PRECISIONS)
        if precision not in ("float32", "auto") and (chat_generator is not None or backend in ("vllm",
                                                                                              "transformers")):
            raise ValueError(f"`precision`={precision!r} is the packed CPU decoder's; it does not apply with "
                             "`chat_generator` or `backend` 'transformers'/'vllm' (use `dtype` there).")
        check_choice(on_failure, "on_failure", ON_FAILURE)
        check_int(passages_k, "passages_k")
        check_int(passage_words, "passage_words")
        if has_placeholder(prompt, "document") and has_placeholder(prompt, "passages"):
            raise ValueError("`prompt` may hold '{document}' (answer prompt) or '{passages}' (grounded expansion), "
                             "not both.")
        if chat_generator is not None and (model is not None or adapter is not None):
            raise ValueError("Pass either `chat_generator` or a local `model`/`adapter`, not both.")
        check_adapter_dir(adapter)
        if model is not None and chat_generator is None:
            resolve_llm_path(model)  # fails early, with the argument's name, on a missing local path
        self.model = model
        self.adapter = adapter
        self.chat_generator = chat_generator
        self.prompt = prompt
        self.system_prompt = system_prompt
        self.n_expansions = n_expansions
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.seed = seed
        self.cache = cache
        self.device = device  # None = best available, resolved at warm_up (keeps YAML portable)
        self.dtype = dtype
        self.max_prompt_tokens = max_prompt_tokens
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self.max_concurrency = max_concurrency
        self.on_failure = on_failure
        self.progress_bar = progress_bar
        self.backend = backend
        self.passages_k = passages_k
        self.passage_words = passage_words
        self.generation_kwargs = generation_kwargs  # the keys beyond max_new_tokens/temperature/top_p
        self.model_kwargs = dict(model_kwargs) if model_kwargs else None
        self.token = token
        self.precision = precision
        self._sampler = None
        self._cache: ExpansionCache | None = None
        #: ``{query index: failed samples}`` of the last `expand` call (empty when every row worked).
        self.last_failures: dict[int, int] = {}

    # -- Haystack plumbing ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Serialize to a dictionary (secrets of a chat generator stay as environment-variable references)."""
        return default_to_dict(
            self, model=self.model, adapter=self.adapter, chat_generator=self.chat_generator, prompt=self.prompt,
            system_prompt=self.system_prompt, n_expansions=self.n_expansions, temperature=self.temperature,
            top_p=self.top_p, max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, seed=self.seed,
            cache=self.cache, device=self.device, dtype=self.dtype, max_prompt_tokens=self.max_prompt_tokens,
            max_retries=self.max_retries, retry_backoff=self.retry_backoff, max_concurrency=self.max_concurrency,
            on_failure=self.on_failure, progress_bar=self.progress_bar, backend=self.backend,
            passages_k=self.passages_k, passage_words=self.passage_words,
            generation_kwargs=self.generation_kwargs or None, model_kwargs=_serialized_model_kwargs(self.model_kwargs),
            token=self.token.to_dict() if self.token is not None else None, precision=self.precision,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LLMQueryExpander:
        """Deserialize from a dictionary made by `to_dict` (the input is not modified)."""
        import copy

        data = copy.deepcopy(data)
        params = data.get("init_parameters", {})
        deserialize_secrets_inplace(params, keys=["token"])
        if params.get("model_kwargs"):
            from haystack.utils.hf import deserialize_hf_model_kwargs

            deserialize_hf_model_kwargs(params["model_kwargs"])
        return default_from_dict(cls, data)

    def warm_up(self) -> None:
        """Load the local model (or warm the chat generator) and open the cache; calling it again does nothing."""
        if self._sampler is None:
            self._sampler = make_sampler(
                self.model, self.adapter, self.chat_generator, backend=self.backend,
                device=resolve_device(self.device) if self.chat_generator is None else "cpu", dtype=self.dtype,
                max_prompt_tokens=self.max_prompt_tokens, max_retries=self.max_retries,
                retry_backoff=self.retry_backoff, max_concurrency=self.max_concurrency,
                model_kwargs=self.model_kwargs, token=self.token.resolve_value() if self.token is not None else None,
                precision=self.precision)
        if self.cache is not None and self._cache is None:
            self._cache = ExpansionCache(self.cache)

    def with_settings(self, **changes: Any) -> LLMQueryExpander:
        """
        A copy with some init settings changed (validated like `__init__`), e.g. another `seed` or `prompt`. The copy
        shares this expander's loaded engine (unless an engine setting changed) and its open cache.
        """
        names = [n for n in inspect.signature(type(self).__init__).parameters if n != "self"]
        unknown = sorted(set(changes) - set(names))
        if unknown:
            raise ValueError(f"`with_settings`: unknown setting(s) {unknown}; valid: {names}.")
        copy = type(self)(**({n: getattr(self, n) for n in names} | changes))
        if not set(changes) & set(_ENGINE_SETTINGS):
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
        """The generation engine in use after `warm_up`: "packed" (float32; "packed-int8-smoothed.2",
        "packed-bfloat16" in another precision), "transformers", "vllm" or "remote"."""
        self.warm_up()
        return self._sampler.engine

    # -- public API ------------------------------------------------------------------------------------------
    @property
    def grounded(self) -> bool:
        """Whether the prompt reads retrieved passages (`{passages}`): `run` then needs `documents`."""
        return has_placeholder(self.prompt, "passages")

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
        query = check_query(query)
        expansions = self.expand([query], documents=None if document is None else [document],
                                 passages=None if documents is None else [documents])[0]
        return {"query": query, "expansions": expansions, "failures": self._failure_lines(expansions)}

    @component.output_types(query=str, expansions=list[str], failures=list[str])
    async def run_async(self, query: str, document: str | None = None,
                        documents: list[Document] | None = None) -> dict[str, Any]:
        """Async `run`: remote chat generators are called concurrently; a local model runs in a worker thread."""
        query = check_query(query)
        expansions = (await self.expand_async([query], documents=None if document is None else [document],
                                              passages=None if documents is None else [documents]))[0]
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
            (default: `temperature` for all), e.g. `[0.8, 0.9, 1.0, 1.1]` for DPO candidates.
        :param passages: One list of retrieved documents per query, for a grounded (`{passages}`) prompt.
        :returns: For each query, its expansions in sample order (failed samples left out; see `on_failure`).
        """
        rows = self._plan(queries, n, documents, temperatures, passages)
        missing = self._lookup(rows)
        if missing:
            self._generate(missing)
            self._store(missing)
        return self._collect(rows, len(queries))

    async def expand_async(self, queries: Sequence[str], n: int | None = None,
                           documents: Sequence[str] | None = None,
                           temperatures: Sequence[float] | None = None,
                           passages: Sequence[Sequence[Document | str]] | None = None) -> list[list[str]]:
        """Like `expand`, awaited: a remote generator gets up to `max_concurrency` calls in flight; a local model
        runs in a worker thread."""
        if self.chat_generator is None:
            return await asyncio.to_thread(self.expand, queries, n, documents, temperatures, passages)
        rows = self._plan(queries, n, documents, temperatures, passages)
        missing = self._lookup(rows)
        if missing:
            outs = await self._sampler.sample_async([r.messages for r in missing], [0] * len(missing),
                                                    [r.temperature for r in missing], self.top_p,
                                                    self.max_new_tokens, clean=self._cleaner(missing),
                                                    generation_kwargs=self.generation_kwargs)
            self._take(missing, outs)
            self._store(missing)
        return self._collect(rows, len(queries))

    # -- internals -------------------------------------------------------------------------------------------
    def _plan(self, queries, n, documents, temperatures, passages=None) -> list[ExpansionRow]:
        self.warm_up()
        if isinstance(queries, str) or not isinstance(queries, Sequence):
            raise TypeError(f"`queries` must be a list of strings; got {type(queries).__name__}.")
        n = check_int(self.n_expansions if n is None else n, "n")
        needs_doc = has_placeholder(self.prompt, "document")
        if needs_doc and (documents is None or len(documents) != len(queries)):
            raise ValueError("This expander's `prompt` has a '{document}' placeholder: pass `documents`, one "
                             "string per query.")
        if documents is not None and len(documents) != len(queries):
            raise ValueError(f"`documents` must have one entry per query ({len(queries)}); got {len(documents)}.")
        if self.grounded and (passages is None or len(passages) != len(queries)):
            raise ValueError("This expander's `prompt` has a '{passages}' placeholder (grounded expansion): pass the "
                             "first retrieval's `documents` (`passages`), one list per query.")
        temps = [self.temperature] if temperatures is None else [float(t) for t in temperatures]
        if not temps or any(t < 0 for t in temps):
            raise ValueError(f"`temperatures` must be a non-empty list of numbers >= 0; got {temperatures!r}.")
        cache_engine = "" if self._sampler.engine in PLAIN_CACHE_ENGINES else self._sampler.engine
        rows = []
        for qi, query in enumerate(queries):
            query = self._sampler.truncate(check_query(query, f"queries[{qi}]"), "query")
            doc = None
            if needs_doc:
                if not isinstance(documents[qi], str) or not documents[qi].strip():
                    raise ValueError(f"`documents[{qi}]` must be a non-empty string.")
                doc = self._sampler.truncate(documents[qi], "documents")
            fields = {}
            if self.grounded:
                if isinstance(passages[qi], (str, Document)) or not isinstance(passages[qi], Sequence):
                    raise TypeError(f"`passages[{qi}]` must be a list of Documents (the first retrieval's hits).")
                fields["passages"] = format_passages(passages[qi], self.passages_k, self.passage_words)
            messages = chat_messages(self.prompt, query, self.system_prompt, doc, **fields)
            for i in range(n):
                t = temps[i % len(temps)]
                seed_key = cache_key(model=self._sampler.identity, prompt=self.prompt, system=self.system_prompt,
                                     query=query, document=doc, index=i, temperature=t, top_p=self.top_p,
                                     max_new_tokens=self.max_new_tokens, seed=self.seed, **fields,
                                     **self._extra_key_parts())
                key = cache_key(row=seed_key, engine=cache_engine) if cache_engine else seed_key
                rows.append(ExpansionRow(qi, i, query, messages, t, key, seed_key))
        return rows

    def _extra_key_parts(self) -> dict[str, Any]:
        """Cache-key parts of the settings beyond the original ones, present only when set: keys made with the
        default settings stay exactly those of earlier versions (existing caches stay valid)."""
        parts: dict[str, Any] = {}
        if self.generation_kwargs:
            parts["generation_kwargs"] = self.generation_kwargs
        if self.model_kwargs:
            import json

            serialized = _serialized_model_kwargs(self.model_kwargs)
            parts["model_kwargs"] = json.loads(json.dumps(serialized, sort_keys=True, default=repr))
        return parts

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

    def _take(self, rows: list[ExpansionRow], outs: list[str | Exception]) -> None:
        for r, out in zip(rows, outs):
            if isinstance(out, Exception):
                r.text, r.error = "", out
            else:
                r.text, r.error = out, (None if out else ValueError("the model produced only empty text"))

    def _generate(self, rows: list[ExpansionRow]) -> None:
        """Fill `text` of every row: remote rows are retried inside the sampler (with backoff); local rows whose
        cleaned text is empty are sampled again with a new seed, up to `max_retries` times."""
        if self.chat_generator is not None:
            outs = self._sampler.sample([r.messages for r in rows], [0] * len(rows), [r.temperature for r in rows],
                                        self.top_p, self.max_new_tokens, clean=self._cleaner(rows),
                                        generation_kwargs=self.generation_kwargs)
            self._take(rows, outs)
            return
        todo = rows
        for attempt in range(self.max_retries + 1):
            outs = self._sampler.sample([r.messages for r in todo],
                                        [_row_seed(self.seed, r.seed_key, attempt) for r in todo],
                                        [r.temperature for r in todo], self.top_p, self.max_new_tokens,
                                        self.batch_size, progress_bar=self.progress_bar and attempt == 0,
                                        desc="Expanding")
            self._take(todo, [clean_generation(out, r.query) for r, out in zip(todo, outs)])
            todo = [r for r in todo if not r.text]
            if not todo:
                break

    def _collect(self, rows: list[ExpansionRow], n_queries: int) -> list[list[str]]:
        out: list[list[str]] = [[] for _ in range(n_queries)]
        failed = [r for r in rows if not r.text]
        for r in rows:
            if r.text:
                out[r.query_index].append(r.text)
        self.last_failures = {}
        for r in failed:
            self.last_failures[r.query_index] = self.last_failures.get(r.query_index, 0) + 1
        if failed:
            first = failed[0]
            message = (f"LLMQueryExpander: no expansion for query {first.query!r:.80} (sample {first.sample}) after "
                       f"{self.max_retries + 1} attempts: {first.error}")
            if self.on_failure == "raise":
                raise RuntimeError(message + (f" ({len(failed)} rows failed in all; the others are cached)"
                                              if len(failed) > 1 else "")) from first.error
            for r in failed:
                logger.warning("LLMQueryExpander: no expansion for query %r (sample %d) after %d attempts: %s; "
                               "skipped (on_failure='skip').", r.query[:80], r.sample, self.max_retries + 1, r.error)
        return out

    def _failure_lines(self, expansions: list[str]) -> list[str]:
        missing = self.n_expansions - len(expansions)
        if missing <= 0:
            return []
        effect = ("retrieval uses the query alone" if not expansions
                  else "retrieval uses the query and the remaining expansions")
        return [(f"{missing} of {self.n_expansions} expansion(s) failed after {self.max_retries + 1} attempts and "
                 f"were skipped (on_failure='skip'); {effect}. The log has the error.")]


__all__ = ["ANSWER_PROMPT", "DEFAULT_LLM", "EXPANSION_PROMPT", "GROUNDED_PROMPT", "ExpansionRow", "LLMQueryExpander",
           "clean_generation"]
