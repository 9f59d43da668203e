"""LLMQueryExpander: the ExpandR query expander (an LLM writes a passage that answers the query)."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from haystack import component, default_from_dict, default_to_dict
from haystack.core.serialization import component_to_dict
from haystack.dataclasses import ChatMessage
from haystack.utils import ComponentDevice
from haystack.utils.deserialization import deserialize_chatgenerator_inplace

from expandr_haystack.cache import ExpansionCache, cache_key
from expandr_haystack.models import DEFAULT_LLM, load_llm, model_identity, resolve_device, resolve_llm_path

logger = logging.getLogger(__name__)

#: The ExpandR query-to-document prompt (paper, q2d).
BACKENDS = ("auto", "packed", "transformers", "vllm")

EXPANSION_PROMPT = "Please write a passage to answer the question.\nQuestion: {query}\nPassage:"
#: The ExpandR query-to-answer prompt used for the reward's self-consistency term (paper, q2a): sees the gold document.
ANSWER_PROMPT = (
    "Answer the question directly using the passage.\nPassage: {document}\nQuestion: {query}\nAnswer:"
)

_PREAMBLE = re.compile(
    r"^\s*(?:(?:sure|certainly|of course|okay|ok|absolutely|great)\b[!,.]*\s*)?"
    r"(?:(?:i(?:'d| would| am|'m) (?:be )?(?:happy|glad|here) to help|i can help)[^.!:\n]{0,60}[.!:]\s*)?"
    r"(?:here(?:'s| is| are)\b[^:\n]{0,100}[:.]\s*)?"
    r"(?:(?:passage|answer|response)\s*:\s*)?",
    re.IGNORECASE,
)
_QUOTES = "\"'“”‘’`"


def clean_generation(text: str, query: str | None = None) -> str:
    """
    Strip chat preambles ("Sure! Here is a passage:"), labels ("Passage:"), an echoed prompt, quotes and whitespace.

    :returns: The cleaned text; may be "" when nothing but boilerplate was generated.
    """
    text = text.replace("\r", "").strip()
    lines = [ln for ln in text.split("\n") if not re.match(r"^\s*(question|please write a passage)\b", ln, re.IGNORECASE)]
    text = "\n".join(lines).strip()
    if query and text.lower().startswith(query.strip().lower()):
        text = text[len(query.strip()):].lstrip(" :.-\n")
    for _ in range(2):
        text = _PREAMBLE.sub("", text, count=1).strip()
    if len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
        text = text[1:-1].strip()
    return re.sub(r"[ \t]+", " ", re.sub(r"\n{3,}", "\n\n", text)).strip()


def clean_text(text: str) -> str:
    """Drop control characters (except tab/newline: they carry nothing for retrieval) and replace lone surrogates
    (invalid unicode, which tokenizers reject) with '?'."""
    cleaned = "".join(ch for ch in text if ch in "\t\n" or (ord(ch) >= 32 and ord(ch) != 127))
    return cleaned.encode("utf-8", errors="replace").decode("utf-8")


def _check_query(query: Any, argument: str = "query") -> str:
    if not isinstance(query, str):
        raise TypeError(f"`{argument}` must be a str; got {type(query).__name__} ({query!r:.80}).")
    if not query.strip():
        raise ValueError(f"`{argument}` must be a non-empty string; got {query!r}.")
    cleaned = clean_text(query)
    if not cleaned.strip():
        raise ValueError(f"`{argument}` contains only control characters; got {query!r:.80}.")
    return cleaned


def _row_seed(*parts: Any) -> int:
    return int(hashlib.sha256("|".join(map(str, parts)).encode("utf-8", errors="replace")).hexdigest()[:15], 16)


@component
class LLMQueryExpander:
    """
    Writes pseudo-documents (expansions) for a query with an LLM, as in ExpandR.

    The prompt (default: the ExpandR q2d prompt) is applied through the model's chat template. The local backend
    is a ``transformers`` causal LM (bundled SmolLM2-135M-Instruct by default, any HF id or path, plus an optional
    PEFT LoRA ``adapter`` from training); alternatively any Haystack ChatGenerator (``OpenAIChatGenerator``,
    ``TransformersChatGenerator``, ...) can be passed as ``chat_generator``.

    Every generated row (query x sample index) has its own seed, so the same seed gives the same expansions no
    matter how queries are batched or which ones were already cached. Outputs are cleaned of chat preambles; an
    empty generation is retried with a new seed and, if still empty, reported (error or skip), never returned as "".

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
        on_failure: str = "raise",
        progress_bar: bool = False,
        backend: str = "auto",
    ):
        """
        Create the expander.

        :param model: None for the bundled SmolLM2-135M-Instruct, or a Hugging Face model id or local directory.
        :param adapter: Directory of a PEFT LoRA adapter (e.g. from `training/joint.py`), merged into `model`.
        :param chat_generator: A Haystack ChatGenerator to use instead of a local model (remote APIs).
        :param prompt: Template with a `{query}` placeholder (and optionally `{document}`), sent as the user turn.
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
        :param max_prompt_tokens: Longer queries are truncated (with a warning) so the prompt fits.
        :param max_retries: Retries for empty generations and failing remote calls.
        :param retry_backoff: First wait in seconds between remote retries; doubles each time.
        :param max_concurrency: Remote calls in flight at once (async).
        :param on_failure: "raise", or "skip" (return no expansions for that query; retrieval then uses the query).
        :param progress_bar: Show a progress bar while generating.
        :param backend: Local generation engine. "auto": the packed float32 CPU decoder for Llama-architecture models
            in float32 on CPU (same math as transformers, about 2x faster), else transformers; "packed" (fail if the
            model does not allow it); "transformers"; "vllm" (GPU, in-process vLLM with the LoRA `adapter`; needs
            the `vllm` extra). Unused with `chat_generator`.
        """
        if not isinstance(prompt, str) or "{query}" not in prompt:
            raise ValueError(f"`prompt` must be a string containing the placeholder '{{query}}'; got {prompt!r:.120}.")
        if not isinstance(n_expansions, int) or isinstance(n_expansions, bool) or n_expansions < 1:
            raise ValueError(f"`n_expansions` must be an integer >= 1; got {n_expansions!r}.")
        if not isinstance(temperature, (int, float)) or temperature < 0:
            raise ValueError(f"`temperature` must be a number >= 0 (0 = greedy); got {temperature!r}.")
        if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise ValueError(f"`top_p` must be in (0, 1]; got {top_p!r}.")
        for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size),
                            ("max_prompt_tokens", max_prompt_tokens), ("max_concurrency", max_concurrency)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1; got {value!r}.")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"`max_retries` must be an integer >= 0; got {max_retries!r}.")
        if not isinstance(retry_backoff, (int, float)) or isinstance(retry_backoff, bool) or retry_backoff < 0:
            raise ValueError(f"`retry_backoff` must be a number of seconds >= 0; got {retry_backoff!r}.")
        if backend not in BACKENDS:
            raise ValueError(f"`backend` must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}.")
        if on_failure not in ("raise", "skip"):
            raise ValueError(f"`on_failure` must be 'raise' or 'skip'; got {on_failure!r}.")
        if chat_generator is not None and (model is not None or adapter is not None):
            raise ValueError("Pass either `chat_generator` or a local `model`/`adapter`, not both.")
        if adapter is not None and not (Path(adapter).expanduser() / "adapter_config.json").exists():
            raise FileNotFoundError(f"`adapter`: {adapter!r} is not a PEFT adapter directory "
                                    f"(no adapter_config.json there).")
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
        self._sampler = None
        self._cache: ExpansionCache | None = None
        self._identity: str | None = None  # model + adapter + dtype (or the chat generator's settings)
        self._engine = ""  # the local generation engine when it is not transformers (part of the cache key)
        self._warm = False

    # -- Haystack plumbing ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Serialize to a dictionary (secrets of a chat generator stay as environment-variable references)."""
        return default_to_dict(
            self,
            model=self.model,
            adapter=self.adapter,
            chat_generator=component_to_dict(self.chat_generator, "chat_generator") if self.chat_generator else None,
            prompt=self.prompt,
            system_prompt=self.system_prompt,
            n_expansions=self.n_expansions,
            temperature=self.temperature,
            top_p=self.top_p,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            seed=self.seed,
            cache=self.cache,
            device=self.device.to_dict() if self.device is not None else None,
            dtype=self.dtype,
            max_prompt_tokens=self.max_prompt_tokens,
            max_retries=self.max_retries,
            retry_backoff=self.retry_backoff,
            max_concurrency=self.max_concurrency,
            on_failure=self.on_failure,
            progress_bar=self.progress_bar,
            backend=self.backend,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LLMQueryExpander:
        """Deserialize from a dictionary made by `to_dict`."""
        params = data.get("init_parameters", {})
        if params.get("device") is not None:
            params["device"] = ComponentDevice.from_dict(params["device"])
        if params.get("chat_generator") is not None:
            deserialize_chatgenerator_inplace(params, key="chat_generator")
        return default_from_dict(cls, data)

    def warm_up(self) -> None:
        """Load the local model (or warm the chat generator) and open the cache; calling it again does nothing."""
        if self._warm:
            return
        if self.chat_generator is not None:
            if hasattr(self.chat_generator, "warm_up"):
                self.chat_generator.warm_up()
            cfg = component_to_dict(self.chat_generator, "chat_generator")
            self._identity = "chat:" + cache_key(**cfg)
        elif self.backend == "vllm":
            from expandr_haystack.vllm_sampler import VLLMSampler

            self._sampler = VLLMSampler(resolve_llm_path(self.model), self.adapter, dtype=self.dtype,
                                        max_prompt_tokens=self.max_prompt_tokens)
            self._identity = model_identity(resolve_llm_path(self.model), self.adapter) + f"@{self.dtype}"
            self._engine = "vllm"
        else:
            from expandr_haystack.generation import LocalSampler

            model, tokenizer = load_llm(self.model, self.adapter, resolve_device(self.device), self.dtype)
            self._sampler = LocalSampler(model, tokenizer, max_prompt_tokens=self.max_prompt_tokens,
                                         backend=self.backend)
            self._identity = model_identity(resolve_llm_path(self.model), self.adapter) + f"@{self.dtype}"
            # the packed decoder is the same float32 math with the same row seeds, but a draw within rounding of a
            # nucleus boundary can differ: its texts are cached apart from the transformers path's, so that a cache
            # hit is always exactly what this configuration generates
            self._engine = "" if self._sampler.backend == "transformers" else self._sampler.backend
        if self.cache is not None and self._cache is None:
            self._cache = ExpansionCache(self.cache)
        self._warm = True

    @property
    def cache_stats(self) -> dict[str, int]:
        """Hits, misses and entries of the persistent cache (zeros when there is none)."""
        return self._cache.stats() if self._cache else {"hits": 0, "misses": 0, "entries": 0}

    # -- public API ------------------------------------------------------------------------------------------
    @component.output_types(query=str, expansions=list[str], failures=list[str])
    def run(self, query: str, document: str | None = None) -> dict[str, Any]:
        """
        Expand one query.

        :param query: The user query.
        :param document: Text for a `{document}` placeholder (answer prompts); unused by the default prompt.
        :returns: `query` (unchanged, for wiring to a retriever), `expansions` (`n_expansions` texts, fewer or none
            when generation failed and `on_failure="skip"`) and `failures` (empty, or one line saying how many
            expansions were skipped and that retrieval then uses the query alone).
        """
        query = _check_query(query)
        expansions = self.expand([query], documents=None if document is None else [document])[0]
        return {"query": query, "expansions": expansions, "failures": self._failures(expansions)}

    @component.output_types(query=str, expansions=list[str], failures=list[str])
    async def run_async(self, query: str, document: str | None = None) -> dict[str, Any]:
        """Async `run`: remote chat generators are called concurrently; a local model runs in a worker thread."""
        query = _check_query(query)
        docs = None if document is None else [document]
        if self.chat_generator is None:
            expansions = (await asyncio.to_thread(self.expand, [query], None, docs))[0]
        else:
            expansions = (await self.expand_async([query], documents=docs))[0]
        return {"query": query, "expansions": expansions, "failures": self._failures(expansions)}

    def _failures(self, expansions: list[str]) -> list[str]:
        missing = self.n_expansions - len(expansions)
        if missing <= 0:
            return []
        effect = ("retrieval uses the query alone" if not expansions
                  else "retrieval uses the query and the remaining expansions")
        return [(f"{missing} of {self.n_expansions} expansion(s) failed after {self.max_retries + 1} attempts and "
                 f"were skipped (on_failure='skip'); {effect}. The log has the error.")]

    def expand(
        self,
        queries: Sequence[str],
        n: int | None = None,
        documents: Sequence[str] | None = None,
        temperatures: Sequence[float] | None = None,
    ) -> list[list[str]]:
        """
        Expand many queries at once (batched; cached rows cost nothing). `run` and the training code use this.

        :param queries: The queries.
        :param n: Expansions per query (default `n_expansions`).
        :param documents: One text per query for a `{document}` placeholder in the prompt.
        :param temperatures: Sample i of every query uses `temperatures[i % len(temperatures)]`
            (default: `temperature` for all), e.g. `[0.8, 0.9, 1.0, 1.1]` for DPO candidates.
        :returns: For each query, its expansions in sample order.
        """
        rows = self._plan(queries, n, documents, temperatures)
        self._fill(rows, self._generate_rows)
        return self._collect(rows, len(queries))

    async def expand_async(self, queries: Sequence[str], n: int | None = None,
                           documents: Sequence[str] | None = None,
                           temperatures: Sequence[float] | None = None) -> list[list[str]]:
        """Like `expand`, with up to `max_concurrency` remote calls in flight."""
        rows = self._plan(queries, n, documents, temperatures)
        missing = self._lookup(rows)
        if missing:
            texts = await self._remote_rows_async(missing)
            self._store(missing, texts)
        return self._collect(rows, len(queries))

    # -- internals -------------------------------------------------------------------------------------------
    def _plan(self, queries, n, documents, temperatures) -> list[dict[str, Any]]:
        self.warm_up()
        if isinstance(queries, str) or not isinstance(queries, Sequence):
            raise TypeError(f"`queries` must be a list of strings; got {type(queries).__name__}.")
        n = self.n_expansions if n is None else n
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"`n` must be an integer >= 1; got {n!r}.")
        needs_doc = "{document}" in self.prompt
        if needs_doc and (documents is None or len(documents) != len(queries)):
            raise ValueError("This expander's `prompt` has a '{document}' placeholder: pass `documents`, one "
                             "string per query.")
        if documents is not None and len(documents) != len(queries):
            raise ValueError(f"`documents` must have one entry per query ({len(queries)}); got {len(documents)}.")
        temps = [self.temperature] if temperatures is None else [float(t) for t in temperatures]
        if not temps or any(t < 0 for t in temps):
            raise ValueError(f"`temperatures` must be a non-empty list of numbers >= 0; got {temperatures!r}.")
        rows = []
        for qi, query in enumerate(queries):
            query = self._truncate(_check_query(query, f"queries[{qi}]"))
            doc = None
            if needs_doc:
                if not isinstance(documents[qi], str) or not documents[qi].strip():
                    raise ValueError(f"`documents[{qi}]` must be a non-empty string.")
                doc = self._truncate(documents[qi], "documents")
            text = self.prompt.replace("{query}", query).replace("{document}", doc or "")
            for i in range(n):
                t = temps[i % len(temps)]
                key = cache_key(model=self._identity, prompt=self.prompt, system=self.system_prompt, query=query,
                                document=doc, index=i, temperature=t, top_p=self.top_p,
                                max_new_tokens=self.max_new_tokens, seed=self.seed)
                seed_key = key  # a row's random stream does not depend on the engine that samples it
                if self._engine:
                    key = cache_key(row=seed_key, engine=self._engine)
                rows.append({"q": qi, "i": i, "query": query, "user": text, "temperature": t, "key": key,
                             "seed_key": seed_key, "text": None})
        return rows

    def _truncate(self, text: str, argument: str = "query") -> str:
        if self._sampler is None:
            limit = self.max_prompt_tokens * 4  # remote: ~4 characters a token
            if len(text) > limit:
                logger.warning("`%s` of %d characters truncated to %d for the prompt.", argument, len(text), limit)
                return text[:limit]
            return text
        tok = self._sampler.tokenizer
        if len(text) < self.max_prompt_tokens:  # fewer characters than tokens allowed: cannot be too long
            return text
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= self.max_prompt_tokens:
            return text
        logger.warning("`%s` of %d tokens truncated to max_prompt_tokens=%d.", argument, len(ids),
                       self.max_prompt_tokens)
        return tok.decode(ids[: self.max_prompt_tokens], skip_special_tokens=True)

    def _lookup(self, rows) -> list[dict[str, Any]]:
        if self._cache is not None:
            found = self._cache.get_many([r["key"] for r in rows])
            for r in rows:
                r["text"] = found.get(r["key"])
        return [r for r in rows if r["text"] is None]

    def _store(self, rows, texts) -> None:
        done = {}
        for r, t in zip(rows, texts):
            r["text"] = t
            if t and self._cache is not None:
                done[r["key"]] = t
        if self._cache is not None:
            self._cache.put_many(done)

    def _fill(self, rows, generate) -> None:
        missing = self._lookup(rows)
        if missing:
            self._store(missing, generate(missing))

    def _generate_rows(self, rows) -> list[str]:
        if self.chat_generator is not None:
            return asyncio.run(self._remote_rows_async(rows)) if not _in_event_loop() else self._remote_rows(rows)
        tok = self._sampler.tokenizer
        prompts = [self._chat_text(tok, r["user"]) for r in rows]
        texts = [""] * len(rows)
        todo = list(range(len(rows)))
        for attempt in range(self.max_retries + 1):
            seeds = [_row_seed(self.seed, rows[k]["seed_key"], attempt) for k in todo]
            outs = self._sampler.sample([prompts[k] for k in todo], seeds, [rows[k]["temperature"] for k in todo],
                                        self.top_p, self.max_new_tokens, self.batch_size,
                                        progress_bar=self.progress_bar and attempt == 0, desc="Expanding")
            for k, out in zip(todo, outs):
                texts[k] = clean_generation(out, rows[k]["query"])
            todo = [k for k in todo if not texts[k]]
            if not todo:
                break
        return texts

    def _chat_text(self, tokenizer, user: str) -> str:
        messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else []) + [
            {"role": "user", "content": user}]
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return (self.system_prompt + "\n\n" if self.system_prompt else "") + user + "\n"

    def _messages(self, row) -> list[ChatMessage]:
        msgs = [ChatMessage.from_system(self.system_prompt)] if self.system_prompt else []
        return msgs + [ChatMessage.from_user(row["user"])]

    def _remote_kwargs(self, row) -> dict[str, Any]:
        return {"generation_kwargs": {"temperature": row["temperature"], "top_p": self.top_p}}

    def _remote_rows(self, rows) -> list[str]:
        texts = []
        for r in rows:
            texts.append(self._call_with_retries(lambda r=r: self.chat_generator.run(
                messages=self._messages(r), **self._remote_kwargs(r)), r, time.sleep))
        return texts

    async def _remote_rows_async(self, rows) -> list[str]:
        sem = asyncio.Semaphore(self.max_concurrency)
        has_async = hasattr(self.chat_generator, "run_async")
        if not has_async:  # a sync-only generator runs in threads: max_concurrency of them, not asyncio's default
            pool = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="expandr-remote")
            try:
                return await self._remote_rows_gather(rows, sem, pool)
            finally:
                pool.shutdown(wait=False)
        return await self._remote_rows_gather(rows, sem, None)

    async def _remote_rows_gather(self, rows, sem, pool) -> list[str]:
        loop = asyncio.get_running_loop()

        async def one(r):
            async with sem:
                for attempt in range(self.max_retries + 1):
                    try:
                        if pool is None:
                            reply = await self.chat_generator.run_async(messages=self._messages(r),
                                                                         **self._remote_kwargs(r))
                        else:
                            reply = await loop.run_in_executor(pool, functools.partial(
                                self.chat_generator.run, messages=self._messages(r), **self._remote_kwargs(r)))
                        text = _reply_text(reply, r["query"])
                        if text:
                            return text
                        error: Exception = ValueError("empty reply")
                    except Exception as exc:  # noqa: BLE001 - any remote failure is retried, then reported
                        error = exc
                    if attempt < self.max_retries:
                        await asyncio.sleep(self.retry_backoff * 2**attempt)
                return self._failed(r, error)

        return list(await asyncio.gather(*(one(r) for r in rows)))

    def _call_with_retries(self, call, row, sleep) -> str:
        error: Exception = ValueError("empty reply")
        for attempt in range(self.max_retries + 1):
            try:
                text = _reply_text(call(), row["query"])
                if text:
                    return text
                error = ValueError("empty reply")
            except Exception as exc:  # noqa: BLE001
                error = exc
            if attempt < self.max_retries:
                sleep(self.retry_backoff * 2**attempt)
        return self._failed(row, error)

    def _failed(self, row, error: Exception) -> str:
        message = (f"LLMQueryExpander: no expansion for query {row['query']!r:.80} (sample {row['i']}) after "
                   f"{self.max_retries + 1} attempts: {error}")
        if self.on_failure == "raise":
            raise RuntimeError(message) from error
        logger.warning("%s; skipped (on_failure='skip').", message)
        return ""

    def _collect(self, rows, n_queries) -> list[list[str]]:
        out: list[list[str]] = [[] for _ in range(n_queries)]
        for r in rows:
            if r["text"]:
                out[r["q"]].append(r["text"])
            elif self.on_failure == "raise":
                raise RuntimeError(f"LLMQueryExpander: the model produced only empty text for query "
                                   f"{r['query']!r:.80} (sample {r['i']}) after {self.max_retries + 1} attempts.")
            else:
                logger.warning("No expansion for query %r (sample %d); skipped.", r["query"][:80], r["i"])
        return out


def _reply_text(reply: dict[str, Any], query: str) -> str:
    replies = reply.get("replies") or []
    if not replies:
        return ""
    first = replies[0]
    text = getattr(first, "text", None) if not isinstance(first, str) else first
    return clean_generation(text or "", query)


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False


__all__ = ["ANSWER_PROMPT", "DEFAULT_LLM", "EXPANSION_PROMPT", "LLMQueryExpander", "clean_generation"]
