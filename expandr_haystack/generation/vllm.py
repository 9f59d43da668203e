"""
GPU sampling through an in-process ``vllm.LLM``, with the LoRA adapter from training (optional extra ``vllm``).

Same interface as ``LocalSampler.sample``: one completion per templated prompt, each row with its own seed and
temperature (vLLM's per-request ``SamplingParams(seed=...)``), so a row's text does not depend on its batch. Several
samples of one query are separate requests with their own seeds; vLLM's prefix caching computes their shared prompt
once, which is what ``SamplingParams(n=k)`` would save, without tying a sample's text to its siblings.
Checked against the vLLM 0.33 API (``LLM.generate(prompts, sampling_params, use_tqdm=, lora_request=)``,
``TokensPrompt``, ``LoRARequest``); vLLM 0.33 requires torch 2.14.0.

The engine takes ``gpu_memory_utilization`` of the GPU (default 0.4, leaving room for the retriever and DPO steps of
joint training); `engine_kwargs` (``SamplerOptions.engine_kwargs``) go to ``vllm.LLM`` as they are, e.g.
``tensor_parallel_size`` to spread one engine over several GPUs. It is memoised per
(model, dtype, settings); ``models.release_models()`` frees it. The adapter is not merged:
vLLM applies it per request (``LoRARequest``), so a new round's adapter needs no new engine.

Usage:
```python
sampler = VLLMSampler("meta-llama/Meta-Llama-3-8B-Instruct", adapter="runs/paper/round_1/adapter")
texts = sampler.sample(prompts, seeds=[1, 2], temperatures=[1.0, 0.8], top_p=0.9, max_new_tokens=512)
```
"""

from __future__ import annotations

import importlib.util
import json
import threading
from collections.abc import Sequence
from pathlib import Path

from expandr_haystack.generation.local import END_TOKENS_ENGINE, Prompt, end_token_ids, template, truncate_tokens

_ENGINES: dict[tuple, object] = {}
_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed `max_lora_rank` values (1 aside)
_LOCK = threading.Lock()


def vllm_unavailable_reason() -> str | None:
    """Why the vLLM backend cannot run here (None when it can)."""
    if importlib.util.find_spec("vllm") is None:
        return "the `vllm` package is not installed (pip install 'expandr-haystack[vllm]' on a CUDA machine)"
    import torch

    if not torch.cuda.is_available():
        return f"no CUDA GPU is visible to torch {torch.__version__} (vLLM needs one)"
    return None


def release_engines() -> None:
    """Drop the memoised vLLM engines (their GPU memory is returned once nothing else refers to them)."""
    with _LOCK:
        _ENGINES.clear()


class VLLMSampler:
    """Per-row-seeded sampling with ``vllm.LLM`` (see the module docstring)."""

    def __init__(self, model: str, adapter: str | None = None, dtype: str = "auto",
                 gpu_memory_utilization: float = 0.4, max_model_len: int | None = 4096, max_prompt_tokens: int = 1024,
                 engine_kwargs: dict | None = None):
        reason = vllm_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"`engine`='vllm' cannot run: {reason}. Use engine 'auto' on CPU.")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"`gpu_memory_utilization` must be in (0, 1]; got {gpu_memory_utilization!r}.")
        from transformers import AutoTokenizer
        from vllm import LLM

        self.max_prompt_tokens = max_prompt_tokens
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        # vLLM stops at the model's EOS; the other end tokens as the local samplers do (`END_TOKENS`)
        self.stop_ids, extra = end_token_ids(self.tokenizer)
        #: the engine in cache keys: "vllm" ("vllm+eog" where the tokenizer has end tokens besides its EOS)
        self.engine = "vllm" + (END_TOKENS_ENGINE if extra else "")
        self.lora = None
        rank = 16
        if adapter is not None:
            from vllm.lora.request import LoRARequest

            from expandr_haystack.models import fingerprint

            adapter_dir = Path(adapter).expanduser().resolve()
            rank = int(json.loads((adapter_dir / "adapter_config.json").read_text()).get("r", 16))
            # vLLM caches an adapter by its integer id: derive it from the content, so a retrained adapter in the
            # same folder is loaded afresh rather than served from the cache
            self.lora = LoRARequest("expandr", int(fingerprint(adapter_dir)[:8], 16) % (2**31 - 1) + 1,
                                    str(adapter_dir))
        max_lora_rank = next((r for r in _LORA_RANKS if r >= rank), None)
        if max_lora_rank is None:
            raise ValueError(f"`adapter`: LoRA rank {rank} is above what vLLM supports ({_LORA_RANKS[-1]}).")
        settings = {"gpu_memory_utilization": gpu_memory_utilization, "max_model_len": max_model_len,
                    **(engine_kwargs or {})}  # e.g. tensor_parallel_size (SamplerOptions)
        key = (model, dtype, max_lora_rank, json.dumps(settings, sort_keys=True, default=str))
        with _LOCK:
            if key not in _ENGINES:
                _ENGINES[key] = LLM(model=model, dtype="bfloat16" if dtype == "auto" else dtype, enable_lora=True,
                                    max_lora_rank=max_lora_rank, enable_prefix_caching=True, **settings)
            self.llm = _ENGINES[key]

    backend = "vllm"

    def truncate(self, text: str, argument: str = "query") -> str:
        """`text` cut to `max_prompt_tokens` tokens (with a warning naming `argument` when it is cut)."""
        return truncate_tokens(self.tokenizer, text, self.max_prompt_tokens, argument)

    def tokenize(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        """Token ids of prompts, templated first when given as chat messages."""
        return [self.tokenizer(template(self.tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]

    def sample(self, prompts: Sequence[Prompt], seeds: Sequence[int], temperatures: Sequence[float], top_p: float,
               max_new_tokens: int, batch_size: int = 16, progress_bar: bool = False,
               desc: str = "Generating") -> list[str]:
        """One completion per prompt; vLLM schedules the batches itself (`batch_size` is not used)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [SamplingParams(temperature=float(t), top_p=top_p if t > 0 else 1.0, max_tokens=max_new_tokens,
                                 seed=int(s) % (2**63), skip_special_tokens=True, stop_token_ids=self.stop_ids)
                  for s, t in zip(seeds, temperatures)]
        requests = [TokensPrompt(prompt_token_ids=ids) for ids in self.tokenize(prompts)]
        outputs = self.llm.generate(requests, params, use_tqdm=progress_bar, lora_request=self.lora)
        return [out.outputs[0].text for out in outputs]
