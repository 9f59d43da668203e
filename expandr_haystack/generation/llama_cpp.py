"""
llama.cpp as a generation engine (`SamplerOptions(engine="llama_cpp")`): a GGUF model, the form local models are
shared in, runs natively in its own quantization (Q4, Q8, F16, ...) on any CPU llama.cpp builds for (x86 with
AVX2/AVX-512, ARM with NEON), through ``llama-cpp-python`` (the ``llama-cpp`` extra; it compiles llama.cpp from
source, ~7 min on 2 cores). A 0.5-8B model in Q4 takes about half a byte a weight of memory.

- ``model``: a ``.gguf`` file; None = the bundled SmolLM2-135M-Instruct Q4_1 file as shipped (the other engines run
  its dequantised float32 copy). The prompt is templated and tokenized by the same Hugging Face tokenizer as on the
  other engines (transformers reads it from the GGUF file), so a row's prompt tokens are theirs.
- ``adapter``: a PEFT LoRA folder (what `expandr train` writes) is converted once into a GGUF LoRA adapter
  (`lora_to_gguf`, cached next to nothing else: in ``$EXPANDR_HOME/adapters-gguf/<fingerprint>.gguf``) that llama.cpp
  applies over the quantized base at run time.
- Sampling: temperature and top-p only, as on the other engines (llama-cpp-python's own defaults, top-k 40, min-p
  0.05 and a repeat penalty of 1.1, are switched off), each row with its own seed: a row's text is reproducible
  within this engine (same llama.cpp build and model file), not equal to another engine's, so the engine's name,
  with llama-cpp-python's version, is part of every cache key.
- Rows run one after another (llama.cpp's high-level API decodes one sequence at a time; a prompt prefix shared with
  the previous row is not recomputed): its strength is the one-query case a served pipeline lives in; for batches the
  packed decoder is faster (docs/benchmarks.md, "Expansion engines side by side").

Usage:
```python
from expandr_haystack import LLMQueryExpander

expander = LLMQueryExpander(model="/models/qwen2.5-1.5b-instruct-q4_k_m.gguf", sampler={"engine": "llama_cpp"})
expander.run("what is the boundary layer")
```
"""

from __future__ import annotations

import atexit
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from expandr_haystack.generation.local import Prompt, template, truncate_tokens
from expandr_haystack.generation.packed_llama import interleave_rotary_halves

_LOCK = threading.Lock()
#: (file, adapter file, settings) -> (llama_cpp.Llama, its lock), shared by samplers: one Llama decodes one sequence
#: at a time, so every sampler over it takes the same lock
_LLAMAS: dict[tuple, tuple[Any, threading.Lock]] = {}
_TOKENIZERS: dict[tuple, Any] = {}  # (file, its size and mtime) -> the tokenizer read from it, shared by samplers

#: llama-cpp-python's defaults that the other engines do not apply, switched off for every row.
NEUTRAL_SAMPLING = {"top_k": 0, "min_p": 0.0, "typical_p": 1.0, "repeat_penalty": 1.0, "frequency_penalty": 0.0,
                    "presence_penalty": 0.0}

#: Hugging Face projection names -> llama.cpp tensor names, per layer (Llama-style models).
LORA_TARGETS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down"}

#: Architectures whose adapters `lora_to_gguf` converts; True: llama.cpp stores q/k rows in the rotary order
#: ``convert_hf_to_gguf.py`` permutes them to, so the adapter's q/k rows are permuted the same way.
LORA_ARCHITECTURES = {"llama": True, "qwen2": False, "qwen3": False}


def llama_cpp_unavailable_reason() -> str | None:
    """Why `engine='llama_cpp'` cannot run here (None when ``llama_cpp`` imports)."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - a broken native library raises OSError/RuntimeError too
        return (f"`import llama_cpp` fails ({type(exc).__name__}: {exc}); install the `llama-cpp` extra "
                "(`pip install 'expandr-haystack[llama-cpp]'`, which compiles llama.cpp: ~7 min)")
    return None


def gguf_metadata(path: Path) -> dict[str, Any]:
    """The scalar and string fields of a GGUF file's header (``general.architecture``, ``<arch>.block_count``, ...)."""
    from gguf import GGUFReader, GGUFValueType

    fields = {}
    for name, field in GGUFReader(str(path)).fields.items():
        if not field.types or field.types[0] == GGUFValueType.ARRAY:
            continue
        value = field.parts[field.data[0]]
        fields[name] = bytes(value).decode("utf-8", "replace") if field.types[0] == GGUFValueType.STRING \
            else value.tolist()[0]
    return fields


def lora_to_gguf(adapter: str | os.PathLike, base_gguf: str | os.PathLike, out: str | os.PathLike) -> Path:
    """
    Write the PEFT LoRA adapter in folder `adapter` (``adapter_config.json``, ``adapter_model.safetensors``) for the
    base model file `base_gguf` as a GGUF LoRA adapter at `out` (float32, ``adapter.lora.alpha`` = the scale's
    numerator: llama.cpp scales ``B A`` by ``alpha / r``; rsLoRA's ``alpha / sqrt(r)`` is written as
    ``alpha * sqrt(r)``). The q/k rows of a Llama base are permuted as llama.cpp's converter permutes the base's.
    What it cannot convert (DoRA, adapted embeddings or head, another architecture) is a ValueError naming `adapter`.
    """
    import numpy as np
    from gguf import GGUFType, GGUFWriter, Keys
    from safetensors.numpy import load_file

    folder = Path(adapter)
    config = json.loads((folder / "adapter_config.json").read_text())
    if config.get("use_dora"):
        raise ValueError(f"`adapter`: {folder} is a DoRA adapter; llama.cpp applies plain LoRA only.")
    meta = gguf_metadata(Path(base_gguf))
    arch = meta.get("general.architecture")
    if arch not in LORA_ARCHITECTURES:
        raise ValueError(f"`adapter`: converting LoRA adapters for a {arch!r} base is not supported here (only "
                         f"{sorted(LORA_ARCHITECTURES)}); convert it with llama.cpp's convert_lora_to_gguf.py.")
    rank = int(config["r"])
    alpha = float(config.get("lora_alpha", rank)) * (rank ** 0.5 if config.get("use_rslora") else 1.0)
    heads = {"attn_q": meta[f"{arch}.attention.head_count"],
             "attn_k": meta.get(f"{arch}.attention.head_count_kv", meta[f"{arch}.attention.head_count"])}
    weights = load_file(str(folder / "adapter_model.safetensors"))
    tensors = []
    for name in sorted(weights):
        if ".lora_A." not in name:
            if ".lora_B." not in name:
                raise ValueError(f"`adapter`: tensor {name!r} is not a LoRA A/B matrix (adapted embeddings, head or "
                                 "norms); llama.cpp's adapters hold LoRA matrices of the layers' projections only.")
            continue
        stem = name.split(".lora_A.")[0].removeprefix("base_model.model.").removeprefix("model.")
        parts = stem.split(".")
        target = LORA_TARGETS.get(".".join(parts[2:]))
        if parts[0] != "layers" or target is None:
            raise ValueError(f"`adapter`: LoRA on {stem!r} cannot be converted (projections of the layers only: "
                             f"{sorted(LORA_TARGETS)}).")
        a = weights[name].astype(np.float32)  # [r, in]
        b = weights[name.replace(".lora_A.", ".lora_B.")].astype(np.float32)  # [out, r]
        if LORA_ARCHITECTURES[arch] and target in heads:
            b = interleave_rotary_halves(b, heads[target])
        tensors.append((f"blk.{int(parts[1])}.{target}.weight", a, b))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    writer = GGUFWriter(str(staging), arch)
    writer.add_type(GGUFType.ADAPTER)
    writer.add_string(Keys.Adapter.TYPE, "lora")
    writer.add_float32(Keys.Adapter.LORA_ALPHA, alpha)
    for tensor, a, b in tensors:
        writer.add_tensor(f"{tensor}.lora_a", np.ascontiguousarray(a))
        writer.add_tensor(f"{tensor}.lora_b", np.ascontiguousarray(b))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    staging.replace(out)  # atomic: a reader never sees half a file
    return out


def cached_lora_gguf(adapter: str, base_gguf: str) -> str:
    """`lora_to_gguf` once per adapter content and base file, kept under ``$EXPANDR_HOME/adapters-gguf/``."""
    from expandr_haystack.models import expandr_home, fingerprint

    key = f"{fingerprint(Path(adapter))[:16]}-{fingerprint(Path(base_gguf))[:8]}"
    target = expandr_home() / "adapters-gguf" / f"{key}.gguf"
    if not target.exists():
        lora_to_gguf(adapter, base_gguf, target)
    return str(target)


def gguf_tokenizer(path: Path):
    """The Hugging Face tokenizer stored in a GGUF file (chat template included), as transformers reads it; read once
    per file (and again if the file changes)."""
    from transformers import AutoTokenizer

    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _LOCK:
        if key in _TOKENIZERS:
            return _TOKENIZERS[key]
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:  # transformers raises several types for GGUF files it cannot read
        raise ValueError(f"`model`: transformers cannot read the tokenizer of {path} ({type(exc).__name__}: {exc}); "
                         "the llama_cpp engine templates prompts with it, as the other engines do.") from exc
    with _LOCK:
        return _TOKENIZERS.setdefault(key, tokenizer)


class LlamaCppSampler:
    """Per-row-seeded sampling of a GGUF model with llama.cpp (see the module docstring)."""

    backend = "llama_cpp"

    def __init__(self, model: str, adapter: str | None = None, max_prompt_tokens: int = 1024,
                 engine_kwargs: dict[str, Any] | None = None):
        reason = llama_cpp_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"`engine`='llama_cpp' cannot run: {reason}.")
        path = Path(model).expanduser()
        if not path.is_file() or path.suffix.lower() != ".gguf":
            raise ValueError(f"`model`: engine 'llama_cpp' runs a GGUF file; got {model!r}. Convert a Hugging Face "
                             "model with llama.cpp's convert_hf_to_gguf.py, or use engine 'auto'.")
        import llama_cpp

        self.max_prompt_tokens = max_prompt_tokens
        self.tokenizer = gguf_tokenizer(path)
        lora = cached_lora_gguf(adapter, str(path)) if adapter is not None else None
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        # llama-cpp-python's defaults are a 512-token context and half the cores
        settings = {"n_ctx": 4096, "n_threads": threads, "n_threads_batch": threads, **(engine_kwargs or {})}
        stat = path.stat()  # a file rewritten in place is loaded afresh
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, lora,
               json.dumps(settings, sort_keys=True, default=str))
        with _LOCK:
            if key not in _LLAMAS:
                _LLAMAS[key] = (llama_cpp.Llama(model_path=str(path), lora_path=lora, verbose=False, **settings),
                                threading.Lock())
            self.llama, self._lock = _LLAMAS[key]  # the lock is the Llama's: samplers sharing it take turns
        self.engine = f"llama_cpp-{llama_cpp.__version__}"
        self.tokens_generated = 0

    def truncate(self, text: str, argument: str = "query") -> str:
        """`text` cut to `max_prompt_tokens` tokens (with a warning naming `argument` when it is cut)."""
        return truncate_tokens(self.tokenizer, text, self.max_prompt_tokens, argument)

    def tokenize(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        """Token ids of prompts, templated first when given as chat messages (the template adds its own special
        tokens)."""
        return [self.tokenizer(template(self.tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]

    def sample(self, prompts: Sequence[Prompt], seeds: Sequence[int], temperatures: Sequence[float], top_p: float,
               max_new_tokens: int, batch_size: int = 16, progress_bar: bool = False,
               desc: str = "Generating") -> list[str]:
        """One completion per prompt, row by row (`batch_size` is not used); ``seeds[i]`` and ``temperatures[i]``
        (0 = greedy) drive row ``i``."""
        from tqdm.auto import tqdm

        texts = []
        with self._lock:
            for ids, seed, temperature in tqdm(list(zip(self.tokenize(prompts), seeds, temperatures)), desc=desc,
                                               unit="text", disable=not progress_bar):
                out = self.llama.create_completion(ids, max_tokens=max_new_tokens, temperature=float(temperature),
                                                   top_p=top_p if temperature > 0 else 1.0,
                                                   seed=int(seed) % (2**32), **NEUTRAL_SAMPLING)
                # an EOS counts as a sampled token, as the packed decoder counts it
                self.tokens_generated += int(out["usage"]["completion_tokens"]) + (out["choices"][0]["finish_reason"]
                                                                                   == "stop")
                texts.append(out["choices"][0]["text"])
        return texts


def release_llamas() -> None:
    """Close every memoised llama.cpp model (also at exit, while llama.cpp's library is still loaded)."""
    with _LOCK:
        for llama, _ in _LLAMAS.values():
            llama.close()
        _LLAMAS.clear()
        _TOKENIZERS.clear()


atexit.register(release_llamas)


__all__ = ["LlamaCppSampler", "cached_lora_gguf", "gguf_metadata", "llama_cpp_unavailable_reason", "lora_to_gguf",
           "release_llamas"]
