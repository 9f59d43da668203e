"""LocalChatGenerator: our local LLM as a Haystack ChatGenerator (for Haystack's own components, e.g. QueryExpander)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

from haystack import component, default_from_dict, default_to_dict
from haystack.dataclasses import ChatMessage, ChatRole

from expandr_haystack.cache import ExpansionCache, cache_key, check_cache_path
from expandr_haystack.generation import check_local_model, make_sampler
from expandr_haystack.generation.rows import engine_cache_key, extra_key_parts, row_seed
from expandr_haystack.models import DEFAULT_LLM
from expandr_haystack.options import GenerationSettings, SamplerOptions, fold_legacy

#: `generation_kwargs` a `run` call may set (Haystack's names; each overrides the `generation` field of that name).
RUN_GENERATION_KEYS = ("max_new_tokens", "temperature", "top_p", "seed")
#: `generation_kwargs` a `run` call may set that shape the reply (each overrides the init parameter of that name).
RUN_REPLY_KEYS = ("reply_prefix", "reply_stop")
#: Roles a prompt message may have (text only: no tool calls, images or files).
_ROLES = (ChatRole.SYSTEM, ChatRole.USER, ChatRole.ASSISTANT)


@component
class LocalChatGenerator:
    """
    Runs the package's local LLM behind Haystack's ChatGenerator interface (`run(messages) -> {"replies": [...]}`),
    so Haystack components that take a ChatGenerator (``QueryExpander``, ``LLMMessagesRouter``, agents without tools)
    run on the same model, engines and settings as `LLMQueryExpander`.

    The model is resolved and loaded as `LLMQueryExpander` does it (`generation.make_sampler`: the bundled
    SmolLM2-135M-Instruct by default, any HF id, local folder or GGUF file, an optional PEFT LoRA `adapter`; one
    loaded copy per model is shared by every component naming it). The messages go through the tokenizer's chat
    template (`generation.local.template`); the reply is the model's text as sampled, not cleaned. Sampling is
    seeded per conversation: the same messages with the same settings and `seed` give the same reply, alone or in a
    batch (float32 on CPU; see `expandr_haystack.generation` for other precisions), and from the cache.

    Structured output by assistant prefill: `reply_prefix` is written as the start of the assistant's turn (after the
    template's generation prompt) and the model continues it; `reply_stop` ends the reply at its first occurrence in
    the continuation. The returned reply is prefix + continuation (cut just after the stop, which is kept): with
    ``reply_prefix='{"queries": ["'`` and ``reply_stop="]}"`` it is the JSON object a component like ``QueryExpander``
    parses, when the model keeps to the shape in between: a lighter form of the structured output of OpenAI's
    `response_format` or llama.cpp's JSON grammar (the reply is started and stopped, not constrained token by token).

    `generate` answers many conversations at once (batched; cached ones cost nothing): call it first to fill the
    cache, and the per-conversation `run` calls a component like ``QueryExpander`` makes are cache hits.

    Usage:
    ```python
    from haystack.components.query import QueryExpander
    from expandr_haystack import LocalChatGenerator

    generator = LocalChatGenerator(generation={"temperature": 0.7, "max_new_tokens": 64}, cache="chat.sqlite",
                                   reply_prefix='{"queries": ["', reply_stop="]}")
    expander = QueryExpander(chat_generator=generator, n_expansions=2)
    print(expander.run(query="heat conduction in composite slabs")["queries"])
    ```
    """

    def __init__(
        self,
        model: str | None = None,
        adapter: str | None = None,
        generation: GenerationSettings | dict[str, Any] | None = None,
        sampler: SamplerOptions | dict[str, Any] | None = None,
        cache: str | None = None,
        reply_prefix: str | None = None,
        reply_stop: str | None = None,
    ):
        """
        :param model: None for the bundled SmolLM2-135M-Instruct, or a Hugging Face model id, local directory or GGUF
            file.
        :param adapter: Directory of a PEFT LoRA adapter (e.g. a training round's), applied to `model`.
        :param generation: What is sampled: a `GenerationSettings` (or a dict of its fields): temperature, top_p,
            max_new_tokens, batch_size (conversations generated together by `generate`), seed, progress_bar.
        :param sampler: How the model is loaded and run: a `SamplerOptions` (or a dict of its fields): engine,
            device, dtype, weight_precision, max_prompt_tokens (each message is cut to it), model_kwargs, token.
        :param cache: Path of a persistent sqlite cache (the expansion cache file may be shared: keys differ); None =
            no cache. A read-only file serves hits and stores nothing.
        :param reply_prefix: Text the assistant's reply starts with (assistant prefill): appended to the templated
            prompt after the generation prompt, and returned at the start of the reply. Part of the cache key:
            prefixed and unprefixed replies never mix. None = the model's reply from its first token.
        :param reply_stop: Text that ends the reply: the continuation is cut just after its first occurrence (kept,
            so a JSON object stays closed; a reply without it is returned whole). The cut is made on the sampled text,
            which sampling token by token makes the same as stopping there (the cache stores the uncut text).
        """
        self.generation = GenerationSettings.coerce(generation, "generation")
        self.sampler_options = SamplerOptions.coerce(sampler, "sampler")
        check_local_model(model, adapter, self.generation)
        self.model = model
        self.adapter = adapter
        self.cache = check_cache_path(cache)
        self.reply_prefix = check_reply_text(reply_prefix, "reply_prefix")
        self.reply_stop = check_reply_text(reply_stop, "reply_stop")
        self._sampler = None
        self._cache: ExpansionCache | None = None
        self._lock = threading.Lock()

    def to_dict(self) -> dict[str, Any]:
        """Serialize to a dictionary (the token stays an environment-variable reference)."""
        return default_to_dict(self, model=self.model, adapter=self.adapter, generation=self.generation,
                               sampler=self.sampler_options, cache=self.cache, reply_prefix=self.reply_prefix,
                               reply_stop=self.reply_stop)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LocalChatGenerator:
        """Deserialize from a dictionary made by `to_dict` (the input is not modified); flat generation or sampler
        keys (`temperature`, `engine`, ...) are read into their groups, as `LLMQueryExpander` reads them."""
        params = dict(data.get("init_parameters", {}))
        params = fold_legacy(params, "generation", GenerationSettings, cls.__name__)
        params = fold_legacy(params, "sampler", SamplerOptions, cls.__name__)
        return default_from_dict(cls, {**data, "init_parameters": params})

    def warm_up(self) -> None:
        """Load the model (shared with other components naming it) and open the cache; calling it again does
        nothing."""
        with self._lock:  # concurrent first calls (run_async) load and open once
            if self._sampler is None:
                self._sampler = make_sampler(self.model, self.adapter, None, self.sampler_options)
            if self.cache is not None and self._cache is None:
                self._cache = ExpansionCache(self.cache, on_read_only="skip")

    @property
    def cache_stats(self) -> dict[str, int]:
        """Hits, misses and entries of the persistent cache (zeros when there is none)."""
        return self._cache.stats() if self._cache else {"hits": 0, "misses": 0, "entries": 0}

    @component.output_types(replies=list[ChatMessage])
    def run(self, messages: list[ChatMessage], generation_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
        """
        Reply to one conversation.

        :param messages: The conversation: text messages from the system, user or assistant.
        :param generation_kwargs: Overrides for this call: of `generation` (`max_new_tokens`, `temperature`,
            `top_p`, `seed`) and of `reply_prefix` / `reply_stop` (other keys are refused: the local engines take no
            others).
        :returns: `replies`: one assistant `ChatMessage` whose meta holds `model` and `cached` (served by the cache).
        """
        return {"replies": self.generate([messages], generation_kwargs, argument="messages")}

    @component.output_types(replies=list[ChatMessage])
    async def run_async(self, messages: list[ChatMessage],
                        generation_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
        """Async `run`: the model runs in a worker thread, off the event loop."""
        return await asyncio.to_thread(self.run, messages, generation_kwargs)

    def generate(self, conversations: Sequence[Sequence[ChatMessage]], generation_kwargs: dict[str, Any] | None = None,
                 *, argument: str = "conversations") -> list[ChatMessage]:
        """
        One reply per conversation, generated in batches of `generation.batch_size` (cached conversations cost
        nothing; identical ones are generated once).

        :param conversations: Lists of `ChatMessage` (as `run` takes them).
        :param generation_kwargs: As in `run`, for every conversation.
        :returns: One assistant `ChatMessage` per conversation, in order.
        """
        settings, prefix, stop = self._settings(generation_kwargs)
        prompts = self._prompts(conversations, argument)  # loads the model (warm_up): the budget is in its tokens
        prefixed = {"reply_prefix": prefix} if prefix is not None else {}  # unprefixed keys as before the option
        seed_keys = [cache_key(kind="chat", model=self._sampler.identity, messages=p, temperature=settings.temperature,
                               top_p=settings.top_p, max_new_tokens=settings.max_new_tokens, seed=settings.seed,
                               **prefixed, **extra_key_parts(settings, self.sampler_options))
                     for p in prompts]
        keys = [engine_cache_key(k, self._sampler.engine) for k in seed_keys]
        texts = self._cache.get_many(keys) if self._cache is not None else {}
        cached = set(texts)
        if prefix is not None:  # the assistant's turn already begun: the model continues the prefix
            from expandr_haystack.generation.local import template

            prompts = [template(self._sampler.tokenizer, p) + prefix for p in prompts]
        todo = {k: (p, s) for k, p, s in zip(keys, prompts, seed_keys) if k not in texts}  # unique keys, in order
        if todo:
            outs = self._sampler.sample([p for p, _ in todo.values()],
                                        [row_seed(settings.seed, s) for _, s in todo.values()],
                                        [settings.temperature] * len(todo), settings.top_p, settings.max_new_tokens,
                                        settings.batch_size, progress_bar=settings.progress_bar, desc="Generating")
            new = dict(zip(todo, outs))
            texts.update(new)
            if self._cache is not None:
                self._cache.put_many(new)
        name = self.model or DEFAULT_LLM
        return [ChatMessage.from_assistant(reply_text(texts[k], prefix, stop),
                                           meta={"model": name, "cached": k in cached}) for k in keys]

    # -- internals ---------------------------------------------------------------------------------------------
    def _settings(self, generation_kwargs: dict[str, Any] | None) -> tuple[GenerationSettings, str | None, str | None]:
        """This call's generation settings, reply prefix and stop."""
        if generation_kwargs is None:
            return self.generation, self.reply_prefix, self.reply_stop
        if not isinstance(generation_kwargs, dict):
            raise TypeError(f"`generation_kwargs` must be a dict or None; got {type(generation_kwargs).__name__}.")
        unknown = sorted(set(generation_kwargs) - set(RUN_GENERATION_KEYS + RUN_REPLY_KEYS))
        if unknown:
            raise ValueError(f"`generation_kwargs`: {unknown} are not supported by the local engines; they take "
                             f"{list(RUN_GENERATION_KEYS + RUN_REPLY_KEYS)}.")
        prefix, stop = (check_reply_text(generation_kwargs.get(k, getattr(self, k)), f"generation_kwargs['{k}']")
                        for k in RUN_REPLY_KEYS)
        settings = self.generation.replace(**{k: v for k, v in generation_kwargs.items() if k in RUN_GENERATION_KEYS})
        return settings, prefix, stop

    def _prompts(self, conversations: Sequence[Sequence[ChatMessage]], argument: str) -> list[list[dict[str, str]]]:
        """The conversations as the sampler's chat messages (role, text cut to `max_prompt_tokens`): checked first,
        then the model is loaded (`warm_up`) to count tokens."""
        if isinstance(conversations, (str, ChatMessage)) or not isinstance(conversations, Sequence):
            raise TypeError(f"`{argument}` must be a list of ChatMessage lists; got {type(conversations).__name__}.")
        single = argument == "messages"  # `run`: one conversation, named `messages`
        checked = []
        for ci, messages in enumerate(conversations):
            where = argument if single else f"{argument}[{ci}]"
            if isinstance(messages, (str, ChatMessage)) or not isinstance(messages, Sequence) or not messages:
                raise TypeError(f"`{where}` must be a non-empty list of ChatMessage; got {messages!r:.80}.")
            for mi, m in enumerate(messages):
                if not isinstance(m, ChatMessage):
                    raise TypeError(f"`{where}[{mi}]` must be a ChatMessage; got {type(m).__name__}.")
                other = m.tool_calls or m.tool_call_results or m.images or m.files
                if m.role not in _ROLES or not m.texts or other:
                    what = "tool calls, images or files" if other else "no text"
                    raise ValueError(f"`{where}[{mi}]`: LocalChatGenerator takes plain text messages from the system, "
                                     f"user or assistant; got a {m.role.value} message with {what}.")
            checked.append([(f"{where}[{mi}]", m.role.value, "\n".join(m.texts)) for mi, m in enumerate(messages)])
        self.warm_up()
        return [[{"role": role, "content": self._sampler.truncate(text, name)} for name, role, text in messages]
                for messages in checked]


def check_reply_text(value: Any, argument: str) -> str | None:
    """`value` (a reply prefix or stop) if it is a non-empty str or None, else an error naming `argument`."""
    if value is not None and not isinstance(value, str):
        raise TypeError(f"`{argument}` must be a str or None; got {type(value).__name__}.")
    if value == "":
        raise ValueError(f"`{argument}` must be a non-empty str or None; got ''.")
    return value


def reply_text(generated: str, prefix: str | None, stop: str | None) -> str:
    """The reply: `prefix` (if any) + the generated continuation, cut just after the first `stop` in it (kept)."""
    if stop is not None and stop in generated:
        generated = generated[: generated.index(stop) + len(stop)]
    return (prefix or "") + generated


__all__ = ["RUN_GENERATION_KEYS", "RUN_REPLY_KEYS", "LocalChatGenerator", "check_reply_text", "reply_text"]
