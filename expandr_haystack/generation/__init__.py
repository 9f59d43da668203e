"""
Text generation engines behind `LLMQueryExpander`: one interface, several engines.

- `local.LocalSampler`: batched sampling from a `transformers` causal LM with per-row seeds (decoder: the model's
  own forward, or `packed_llama.PackedLlamaDecoder` on CPU);
- `vllm.VLLMSampler`: in-process vLLM on a GPU, LoRA per request;
- `remote.ChatGeneratorSampler`: any Haystack ChatGenerator (remote APIs), bounded concurrency, one retry loop.

Every sampler has ``identity`` (what its texts depend on: weights, adapter, dtype, or the generator's settings),
``engine`` (its name), ``truncate(text, argument)`` (its prompt budget, in its own tokens) and
``sample(prompts, seeds, temperatures, top_p, max_new_tokens, batch_size, progress_bar, desc)``, where a prompt is
a list of chat messages the sampler templates itself. `make_sampler` builds the right one.
"""

from __future__ import annotations

from typing import Any

#: Local generation engines (`LLMQueryExpander(backend=...)`, `expandr eval --backend`, `llm_backend` in configs).
BACKENDS = ("auto", "packed", "transformers", "vllm")
#: Engines whose texts are cached under the plain row key (the others add their name: a draw within rounding of a
#: nucleus boundary can differ between engines, and a cache hit must be what this configuration generates).
PLAIN_CACHE_ENGINES = ("transformers", "remote")


def make_sampler(model: str | None = None, adapter: str | None = None, chat_generator: Any | None = None,
                 backend: str = "auto", device: str = "cpu", dtype: str = "auto", max_prompt_tokens: int = 1024,
                 max_retries: int = 2, retry_backoff: float = 1.0, max_concurrency: int = 8):
    """
    The sampler for a model (+ LoRA adapter) or a Haystack ChatGenerator.

    :param backend: For a local model: "auto" (the packed float32 CPU decoder where the model allows it, else
        transformers), "packed", "transformers" or "vllm".
    :param device: torch device string for a local model.
    :param max_retries: Remote only: retries of a failed call (local samplers are retried by the caller with new
        seeds).
    """
    from expandr_haystack.models import load_llm, model_identity, resolve_llm_path

    if chat_generator is not None:
        from expandr_haystack.generation.remote import ChatGeneratorSampler

        return ChatGeneratorSampler(chat_generator, max_prompt_tokens=max_prompt_tokens, max_retries=max_retries,
                                    retry_backoff=retry_backoff, max_concurrency=max_concurrency)
    path = resolve_llm_path(model)
    if backend == "vllm":
        from expandr_haystack.generation.vllm import VLLMSampler

        sampler = VLLMSampler(path, adapter, dtype=dtype, max_prompt_tokens=max_prompt_tokens)
    else:
        from expandr_haystack.generation.local import LocalSampler

        llm, tokenizer = load_llm(model, adapter, device, dtype)
        sampler = LocalSampler(llm, tokenizer, max_prompt_tokens=max_prompt_tokens, backend=backend)
    sampler.identity = model_identity(path, adapter) + f"@{dtype}"
    return sampler


__all__ = ["BACKENDS", "PLAIN_CACHE_ENGINES", "make_sampler"]
