"""
Sampling through any Haystack ChatGenerator (OpenAI, Azure, Ollama, Hugging Face API, ...), for `LLMQueryExpander`.

Rows are sent concurrently, at most `max_concurrency` in flight: through the generator's `run_async` when it has
one, else through its `run` in a pool of `max_concurrency` threads. Each row is tried up to `max_retries + 1` times,
waiting `retry_backoff * 2**k` seconds before retry k + 1, on an exception and on a reply that is empty after
cleaning. A row that fails every attempt comes back as its last exception; it never costs the other rows.

Usage:
```python
from haystack.components.generators.chat import OpenAIChatGenerator
from expandr_haystack.generation.remote import ChatGeneratorSampler

sampler = ChatGeneratorSampler(OpenAIChatGenerator(), max_concurrency=8)
texts = sampler.sample([[{"role": "user", "content": "Please write a passage ..."}]], seeds=[1], temperatures=[1.0],
                       top_p=0.9, max_new_tokens=96)
```
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from haystack.core.serialization import component_to_dict
from haystack.dataclasses import ChatMessage

from expandr_haystack.cache import cache_key

logger = logging.getLogger(__name__)

#: Characters a token is taken to have when truncating text for a remote model (no tokenizer here).
CHARS_PER_TOKEN = 4


class ChatGeneratorSampler:
    """Concurrent, retried sampling through a Haystack ChatGenerator (see the module docstring)."""

    engine = "remote"

    def __init__(self, chat_generator: Any, max_prompt_tokens: int = 1024, max_retries: int = 2,
                 retry_backoff: float = 1.0, max_concurrency: int = 8):
        self.chat_generator = chat_generator
        self.max_prompt_tokens = max_prompt_tokens
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self.max_concurrency = max_concurrency
        if hasattr(chat_generator, "warm_up"):
            chat_generator.warm_up()
        #: Identity of the generator's settings (secrets stay references): part of every cache key.
        self.identity = "chat:" + cache_key(**component_to_dict(chat_generator, "chat_generator"))

    def truncate(self, text: str, argument: str = "query") -> str:
        """`text` cut to about `max_prompt_tokens` tokens (4 characters a token), with a warning when cut."""
        limit = self.max_prompt_tokens * CHARS_PER_TOKEN
        if len(text) <= limit:
            return text
        logger.warning("`%s` of %d characters truncated to %d for the prompt.", argument, len(text), limit)
        return text[:limit]

    def sample(self, messages: Sequence[list[dict[str, str]]], seeds: Sequence[int], temperatures: Sequence[float],
               top_p: float, max_new_tokens: int, batch_size: int = 16, progress_bar: bool = False,
               desc: str = "Generating", clean: Callable[[int, str], str] | None = None,
               generation_kwargs: dict[str, Any] | None = None) -> list[str | Exception]:
        """
        One completion per row (sync entry point of `sample_async`; runs its own event loop, in a worker thread
        when the caller is already inside one).

        :param clean: ``clean(row, text)`` applied to every reply; a reply that cleans to "" is retried.
        :param generation_kwargs: More ``generation_kwargs`` for the generator (temperature and top_p are the rows').
        :returns: Per row its cleaned text, or the exception of its last attempt when every attempt failed.
        """
        coroutine = self.sample_async(messages, seeds, temperatures, top_p, max_new_tokens, clean=clean,
                                      generation_kwargs=generation_kwargs)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(coroutine)
        box: dict[str, Any] = {}
        worker = threading.Thread(target=lambda: box.update(result=asyncio.run(coroutine)), name="expandr-remote")
        worker.start()
        worker.join()
        return box["result"]

    async def sample_async(self, messages: Sequence[list[dict[str, str]]], seeds: Sequence[int],
                           temperatures: Sequence[float], top_p: float, max_new_tokens: int, batch_size: int = 16,
                           progress_bar: bool = False, desc: str = "Generating",
                           clean: Callable[[int, str], str] | None = None,
                           generation_kwargs: dict[str, Any] | None = None) -> list[str | Exception]:
        """Like `sample`, awaited: up to `max_concurrency` calls in flight. `seeds` are not sent (APIs differ)."""
        semaphore = asyncio.Semaphore(self.max_concurrency)
        pool = None
        if not hasattr(self.chat_generator, "run_async"):  # sync-only: max_concurrency threads, not asyncio's default
            pool = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="expandr-remote")
        try:
            rows = [self._row(k, m, t, top_p, semaphore, pool, clean, generation_kwargs)
                    for k, (m, t) in enumerate(zip(messages, temperatures))]
            return list(await asyncio.gather(*rows))
        finally:
            if pool is not None:
                pool.shutdown(wait=False)

    async def _row(self, k: int, messages, temperature: float, top_p: float, semaphore, pool, clean,
                   generation_kwargs: dict[str, Any] | None = None):
        chat = [ChatMessage.from_system(m["content"]) if m["role"] == "system" else ChatMessage.from_user(m["content"])
                for m in messages]
        kwargs = {"messages": chat,
                  "generation_kwargs": (generation_kwargs or {}) | {"temperature": temperature, "top_p": top_p}}
        error: Exception = ValueError("empty reply")
        async with semaphore:
            for attempt in range(self.max_retries + 1):
                try:
                    if pool is None:
                        reply = await self.chat_generator.run_async(**kwargs)
                    else:
                        loop = asyncio.get_running_loop()
                        reply = await loop.run_in_executor(pool, functools.partial(self.chat_generator.run, **kwargs))
                    text = reply_text(reply)
                    text = clean(k, text) if clean is not None else text.strip()
                    if text:
                        return text
                    error = ValueError("empty reply")
                except Exception as exc:  # noqa: BLE001 - any remote failure is retried, then reported
                    error = exc
                if attempt < self.max_retries:
                    await asyncio.sleep(self.retry_backoff * 2**attempt)
        return error


def reply_text(reply: dict[str, Any]) -> str:
    """The text of a ChatGenerator's first reply ("" when there is none)."""
    replies = reply.get("replies") or []
    if not replies:
        return ""
    first = replies[0]
    text = first if isinstance(first, str) else getattr(first, "text", None)
    return text or ""


__all__ = ["CHARS_PER_TOKEN", "ChatGeneratorSampler", "reply_text"]
