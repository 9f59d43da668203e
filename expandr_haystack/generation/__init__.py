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
  cache, except where a draw falls within float32 rounding of a boundary: the batch's padding and size move a row's
  logits by ~1e-5 (the packed decoder's attention blocks past prompt position 32, its single-row MLP projection),
  and where the nucleus holds many near-equal tail tokens that reorders them. Seen once: 1 row of 60 Cranfield
  queries x 32 tokens at batch 5 (issue 24's sharding check). What holds exactly: the same rows in the same batches
  give the same text, so `expandr expand --shard` shards by blocks of rows (`shards`), not by single rows.
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

from expandr_haystack.generation.rows import PLAIN_CACHE_ENGINES
from expandr_haystack.options import ENGINES, SamplerOptions


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


def check_local_model(model: str | None, adapter: str | None, generation) -> None:
    """
    The construction-time checks of a local model's settings, shared by the components that load one
    (`LLMQueryExpander`, `LocalChatGenerator`): `generation` (a `GenerationSettings`) has no pass-through
    `generation_kwargs` (the local engines take only its own fields), `adapter` is a PEFT adapter folder or None, and a
    named `model` resolves (a missing local path fails here, naming `model`; None, the bundled model, is prepared at
    `warm_up`).
    """
    from expandr_haystack.checks import check_adapter_dir
    from expandr_haystack.models import resolve_llm_path
    from expandr_haystack.options import GenerationSettings

    if generation.generation_kwargs:
        raise ValueError(f"`generation.generation_kwargs`: {sorted(generation.generation_kwargs)} are not "
                         f"supported by the local engines (they take {list(GenerationSettings.OWN_KEYS)}); other "
                         "keys go only to a `chat_generator`.")
    check_adapter_dir(adapter)
    if model is not None:
        resolve_llm_path(model)


def make_sampler(model: str | None = None, adapter: str | None = None, chat_generator: Any | None = None,
                 options: SamplerOptions | None = None):
    """
    The sampler for a model (+ LoRA adapter), loaded and run as `options` say, or for a Haystack ChatGenerator
    (which takes only `options`' remote settings: max_prompt_tokens, max_retries, retry_backoff, max_concurrency).
    Local samplers are retried by the caller with new seeds; texts in another `weight_precision` than float32 are
    cached apart through the sampler's `engine` ("packed-int8-smoothed.3").
    """
    from expandr_haystack.models import load_llm, model_identity, resolve_device, resolve_llm_path

    o = options or SamplerOptions()
    if chat_generator is not None:
        from expandr_haystack.generation.remote import ChatGeneratorSampler

        return ChatGeneratorSampler(chat_generator, max_prompt_tokens=o.max_prompt_tokens, max_retries=o.max_retries,
                                    retry_backoff=o.retry_backoff, max_concurrency=o.max_concurrency)
    if o.engine == "llama_cpp":
        from expandr_haystack.generation.llama_cpp import LlamaCppSampler
        from expandr_haystack.models import DEFAULT_LLM, bundled_gguf

        path = str(bundled_gguf()) if model in (None, DEFAULT_LLM) else resolve_llm_path(model)
        sampler = LlamaCppSampler(path, adapter, max_prompt_tokens=o.max_prompt_tokens, engine_kwargs=o.engine_kwargs)
        sampler.identity = model_identity(path, adapter)  # the engine's name (with its version) is in every key
        return sampler
    path = resolve_llm_path(model)
    device = resolve_device(o.device)
    if o.engine == "vllm":
        from expandr_haystack.generation.vllm import VLLMSampler

        sampler = VLLMSampler(path, adapter, dtype=o.dtype, max_prompt_tokens=o.max_prompt_tokens,
                              engine_kwargs=o.engine_kwargs)
        # vLLM runs on CUDA only, and its engine name is part of every cache key (not in PLAIN_CACHE_ENGINES)
        sampler.identity = model_identity(path, adapter) + f"@{o.dtype}"
    else:
        from expandr_haystack.generation.local import LocalSampler

        token = o.token.resolve_value() if o.token is not None else None
        llm, tokenizer = load_llm(model, adapter, device, o.dtype, model_kwargs=o.model_kwargs, token=token)
        sampler = LocalSampler(llm, tokenizer, max_prompt_tokens=o.max_prompt_tokens, engine=o.engine,
                               weight_precision=o.weight_precision)
        sampler.identity = sampler_identity(model_identity(path, adapter), o.dtype, device)
    return sampler


__all__ = ["ENGINES", "PLAIN_CACHE_ENGINES", "check_local_model", "make_sampler", "resolve_dtype", "sampler_identity"]
