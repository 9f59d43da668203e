"""Remote chat generators are called concurrently, never more than `max_concurrency` at once, never twice per row."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
from haystack import component, default_to_dict
from haystack.dataclasses import ChatMessage

from expandr_haystack import LLMQueryExpander
from expandr_haystack.options import SamplerOptions

QUERIES = [f"what is the effect of mach number {k} on the lift of a swept wing ." for k in range(40)]


@component
class SlowRemote:
    """A stand-in remote ChatGenerator: each call takes `latency` seconds; records how many were in flight."""

    def __init__(self, latency: float = 0.05, with_async: bool = True):
        self.latency = latency
        self.with_async = with_async
        self.calls = 0
        self.in_flight = 0
        self.peak = 0
        self._lock = threading.Lock()

    def to_dict(self) -> dict[str, Any]:
        return default_to_dict(self, latency=self.latency, with_async=self.with_async)

    def _enter(self) -> None:
        with self._lock:
            self.calls += 1
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)

    def _leave(self, messages) -> dict[str, Any]:
        with self._lock:
            self.in_flight -= 1
        return {"replies": [ChatMessage.from_assistant(f"A passage about {messages[-1].text[-40:]}")]}

    @component.output_types(replies=list[ChatMessage])
    def run(self, messages: list[ChatMessage], generation_kwargs: dict[str, Any] | None = None):
        self._enter()
        time.sleep(self.latency)
        return self._leave(messages)


@component
class SlowAsyncRemote(SlowRemote):
    @component.output_types(replies=list[ChatMessage])
    async def run_async(self, messages: list[ChatMessage], generation_kwargs: dict[str, Any] | None = None):
        self._enter()
        await asyncio.sleep(self.latency)
        return self._leave(messages)


@pytest.mark.parametrize("remote_cls", [SlowAsyncRemote, SlowRemote], ids=["run_async", "sync-run-in-threads"])
def test_remote_expansion_is_concurrent_bounded_and_cached(remote_cls, tmp_path):
    remote = remote_cls()
    expander = LLMQueryExpander(chat_generator=remote, sampler=SamplerOptions(max_concurrency=8), n_expansions=1,
                                cache=str(tmp_path / "remote.sqlite"))
    first = expander.expand(QUERIES)
    assert remote.calls == len(QUERIES) and all(len(x) == 1 and x[0] for x in first)
    assert remote.peak == 8  # concurrent (not serial), and never above the bound
    again = expander.expand(QUERIES)  # every row cached: no paid call twice
    assert again == first and remote.calls == len(QUERIES)


def test_async_expansion_inside_a_running_event_loop(tmp_path):
    remote = SlowAsyncRemote()
    expander = LLMQueryExpander(chat_generator=remote, sampler=SamplerOptions(max_concurrency=4),
                                cache=str(tmp_path / "r.sqlite"))

    async def main():
        return await expander.expand_async(QUERIES[:12])

    out = asyncio.run(main())
    assert len(out) == 12 and remote.peak == 4 and remote.calls == 12
