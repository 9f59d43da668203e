"""
Text generation engines behind `LLMQueryExpander`: one interface, several engines.

- `local.LocalSampler`: batched sampling from a `transformers` causal LM with per-row seeds (decoder: the model's
  own forward, or `packed_llama.PackedLlamaDecoder` on CPU);
- `vllm.VLLMSampler`: in-process vLLM on a GPU, LoRA per request;
- `remote.ChatGeneratorSampler`: any Haystack ChatGenerator (remote APIs), bounded concurrency, one retry loop.

Every sampler has ``identity`` (what its texts depend on: weights, adapter, dtype and device, or the generator's
settings), ``engine`` (its name), ``truncate(text, argument)`` (its prompt budget, in its own tokens) and
``sample(prompts, seeds, temperatures, top_p, max_new_tokens, batch_size, progress_bar, desc)``, where a prompt is
a list of chat messages the sampler templates itself. `make_sampler` builds the right one.

Where a row's text does not depend on its batch (local engines; each row has its own seed and temperature):
- float32 on CPU (the default there; pinned by tests on the bundled model with the packed decoder and on a tiny
  random Llama with both decoders): a row's text is the same alone, in any batch, at any batch size, and from the
  cache. Padding to the batch's longest prompt changes float32 rounding only (~1e-7 relative), so a row could change
  only if a draw fell that close to a nucleus or sampling boundary; no test has seen it.
- bfloat16 / float16 (on CUDA, where ``dtype="auto"`` means bfloat16, and on CPU alike): it does *not* hold. A row's
  logits depend on its batch (the padded width and the batch size pick other kernels and reduction orders) by about
  the format's rounding (~1e-2 relative for bfloat16), enough to flip draws: ``expand([q])`` and the same query
  inside a batch can give different text (seen on an H100 with torch 2.11, and on CPU with a tiny random model in
  the dry run of ``benchmarks/gpu_check.sh``). What holds there: the same inputs with the same ``batch_size`` give
  the same text again (deterministic kernels), ``batch_size=1`` makes each row's text independent of the other rows,
  and a cache hit returns the text that was stored. For batch-independent text on a GPU use ``dtype="float32"``
  (expected to behave as on CPU, not yet checked on a GPU) or ``batch_size=1``.
- The cache never serves text across precisions or devices: a local sampler's ``identity`` (`sampler_identity`),
  which keys the cache and seeds each row, holds the resolved dtype and the device type for any non-CPU device
  (``...@bfloat16@cuda``); on CPU it is ``<model>@<dtype setting>`` as in 0.1.0, so CPU caches stay valid. The GPU
  model (H100 vs A100) and index (cuda:0 vs cuda:1) are not in it: one cache shared by different GPU models serves
  the text of whichever wrote it first.
"""

from __future__ import annotations

from typing import Any

#: Local generation engines (`LLMQueryExpander(backend=...)`, `expandr eval --backend`, `llm_backend` in configs).
BACKENDS = ("auto", "packed", "transformers", "vllm")
#: Engines whose texts are cached under the plain row key (the others add their name: a draw within rounding of a
#: nucleus boundary can differ between engines, and a cache hit must be what this configuration generates).
PLAIN_CACHE_ENGINES = ("transformers", "remote")


def resolve_dtype(dtype: str, device: str) -> str:
    """The dtype a local model runs in (the rule of `models.load_llm`): "auto" = bfloat16 on CUDA, float32 elsewhere."""
    if dtype == "auto":
        return "bfloat16" if str(device).startswith("cuda") else "float32"
    return dtype


def sampler_identity(model_id: str, dtype: str, device: str) -> str:
    """
    The ``identity`` of a local sampler: `model_id` (`models.model_identity`: weights + adapter), then the precision.
    On CPU ``<model_id>@<dtype as given>`` (unchanged since 0.1.0, so CPU caches stay valid); on any other device
    ``<model_id>@<resolved dtype>@<device type>``, e.g. ``...@bfloat16@cuda``: a cache written in one precision or
    on one kind of device is never served to another (see the module docstring for why that matters).

    Usage:
    ```python
    sampler_identity("hub:org/llm", "auto", "cpu")       # 'hub:org/llm@auto'
    sampler_identity("hub:org/llm", "auto", "cuda:1")    # 'hub:org/llm@bfloat16@cuda'
    ```
    """
    import torch

    kind = torch.device(device).type
    if kind == "cpu":
        return f"{model_id}@{dtype}"
    return f"{model_id}@{resolve_dtype(dtype, device)}@{kind}"


def make_sampler(model: str | None = None, adapter: str | None = None, chat_generator: Any | None = None,
                 backend: str = "auto", device: str = "cpu", dtype: str = "auto", max_prompt_tokens: int = 1024,
                 max_retries: int = 2, retry_backoff: float = 1.0, max_concurrency: int = 8,
                 model_kwargs: dict[str, Any] | None = None, token: str | None = None, precision: str = "float32"):
    """
    The sampler for a model (+ LoRA adapter) or a Haystack ChatGenerator.

    :param backend: For a local model: "auto" (the packed float32 CPU decoder where the model allows it, else
        transformers), "packed", "transformers" or "vllm".
    :param device: torch device string for a local model.
    :param max_retries: Remote only: retries of a failed call (local samplers are retried by the caller with new
        seeds).
    :param model_kwargs: transformers path only: extra keyword arguments of ``from_pretrained`` (`models.load_llm`).
    :param token: Hugging Face token for gated models (``from_pretrained(..., token=...)``; vLLM reads `HF_TOKEN`).
    :param precision: Local packed decoder only: its weight precision (`packed_llama.PRECISIONS`); texts in another
        precision than float32 are cached apart through the sampler's `engine` ("packed-int8-smoothed.2").
    """
    from expandr_haystack.models import load_llm, model_identity, resolve_llm_path

    if chat_generator is not None:
        from expandr_haystack.generation.remote import ChatGeneratorSampler

        return ChatGeneratorSampler(chat_generator, max_prompt_tokens=max_prompt_tokens, max_retries=max_retries,
                                    retry_backoff=retry_backoff, max_concurrency=max_concurrency)
    path = resolve_llm_path(model)
    if model_kwargs and backend == "vllm":
        raise ValueError("`model_kwargs` go to transformers' from_pretrained; backend 'vllm' does not take them.")
    if backend == "vllm":
        from expandr_haystack.generation.vllm import VLLMSampler

        sampler = VLLMSampler(path, adapter, dtype=dtype, max_prompt_tokens=max_prompt_tokens)
        # vLLM runs on CUDA only, and its engine name is part of every cache key (not in PLAIN_CACHE_ENGINES)
        sampler.identity = model_identity(path, adapter) + f"@{dtype}"
    else:
        from expandr_haystack.generation.local import LocalSampler

        llm, tokenizer = load_llm(model, adapter, device, dtype, model_kwargs=model_kwargs, token=token)
        sampler = LocalSampler(llm, tokenizer, max_prompt_tokens=max_prompt_tokens, backend=backend,
                               precision=precision)
        sampler.identity = sampler_identity(model_identity(path, adapter), dtype, device)
    return sampler


__all__ = ["BACKENDS", "PLAIN_CACHE_ENGINES", "make_sampler", "resolve_dtype", "sampler_identity"]
