"""
The ``"ctranslate2"`` encoder backend (issue 26): a sentence-transformers encoder whose transformer runs in
CTranslate2's `Encoder` (int8 weights by default), without Optimum.

`load_encoder(model, "cpu", backend="ctranslate2")` loads the model with sentence-transformers as usual, converts its
transformer once into ``$EXPANDR_HOME/encoders/ctranslate2/<key>-<compute_type>/`` (the key: the model's weights
fingerprint, the loading options and the CTranslate2 version; later loads reuse the folder) and puts a CTranslate2
stand-in where the torch model was (the torch weights are dropped). Everything else is sentence-transformers' own:
tokenisation, length sorting, pooling, normalisation, `truncate_dim`, prompts, `max_seq_length`; `encode` takes the
same arguments and returns the same kind of vectors. Each load checks the converted model against the torch one on a
few texts before dropping the torch weights (`MIN_COSINE`).

The options of this backend go in `EncoderOptions.model_kwargs`, as sentence-transformers' own ONNX backend takes
``file_name`` / ``provider`` there (`OPTIONS`; the rest of `model_kwargs` still goes to ``from_pretrained``):

- ``compute_type``: "int8" (default: int8 weights and activations in the matrix multiplies, float32 elsewhere),
  "int8_float32" (the same on CPU), "int16" or "float32" (no quantisation: torch's vectors to rounding).
- ``intra_threads``: CPU threads (default: torch's `get_num_threads()` at load time, as the torch backend uses).
- ``max_batch_tokens``: tokens per CTranslate2 call (default 256). sentence-transformers hands over its
  `batch_size` texts padded to the longest; the stand-in runs them in groups of at most this many tokens (a long
  document alone, many short queries together), each without padding. Whole padded 64-document batches ran ~3x
  slower per document than one document per call on a 2-core Xeon; 256 was the best budget for documents and
  queries alike (docs/benchmarks.md, "Indexing with the CTranslate2 backend").

Only BERT-family encoders convert (`ENCODER_CONFIGS`: what CTranslate2's Transformers converter turns into an
encoder), only on the CPU. A converted encoder cannot be trained or saved with `save_pretrained`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

#: `model_kwargs` keys this backend reads (and removes before sentence-transformers loads the model).
OPTIONS = ("compute_type", "intra_threads", "max_batch_tokens")
#: CPU compute types (CTranslate2's names); "int8" is the default of this backend.
COMPUTE_TYPES = ("int8", "int8_float32", "int16", "float32")
DEFAULT_COMPUTE_TYPE = "int8"
DEFAULT_MAX_BATCH_TOKENS = 256
#: Transformers configurations CTranslate2 converts into an encoder-only model.
ENCODER_CONFIGS = ("BertConfig", "DistilBertConfig", "RobertaConfig", "XLMRobertaConfig")
#: The least cosine between the converted and the torch sentence vectors on `CHECK_TEXTS` (int8 on MiniLM: > 0.99;
#: a conversion that maps a weight wrongly lands far below).
MIN_COSINE = 0.95
CHECK_TEXTS = ("what similarity laws must be obeyed when constructing aeroelastic models of heated aircraft ?",
               "buckling of thin cylindrical shells under axial compression",
               "flow separation in overexpanded rocket nozzles")
INSTALL = "pip install ctranslate2  (or: pip install 'expandr-haystack[fast]')"

_CONVERT_LOCK = threading.Lock()


def split_options(model_kwargs: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(this backend's options, checked and with defaults filled in except `intra_threads`; the rest of
    `model_kwargs`, None when nothing is left) for `load_encoder`."""
    check_options(model_kwargs)
    rest = {k: v for k, v in (model_kwargs or {}).items() if k not in OPTIONS}
    options = {"compute_type": DEFAULT_COMPUTE_TYPE, "intra_threads": None,
               "max_batch_tokens": DEFAULT_MAX_BATCH_TOKENS}
    options.update({k: v for k, v in (model_kwargs or {}).items() if k in OPTIONS})
    return options, rest or None


def check_options(model_kwargs: dict[str, Any] | None, argument: str = "model_kwargs") -> None:
    """Check this backend's keys in `model_kwargs` (without importing ctranslate2); errors name the key."""
    kwargs = model_kwargs or {}
    if "compute_type" in kwargs and kwargs["compute_type"] not in COMPUTE_TYPES:
        raise ValueError(f"`{argument}['compute_type']` must be one of {COMPUTE_TYPES} with backend='ctranslate2'; "
                         f"got {kwargs['compute_type']!r}.")
    for key, least in (("intra_threads", 0), ("max_batch_tokens", 1)):
        value = kwargs.get(key)
        if key in kwargs and (value is not None or key == "max_batch_tokens") and (
                isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise ValueError(f"`{argument}['{key}']` must be an int >= {least}"
                             f"{' or None' if key == 'intra_threads' else ''} with backend='ctranslate2'; "
                             f"got {value!r}.")


def import_ctranslate2():
    """The `ctranslate2` module, or an ImportError that says how to install it."""
    try:
        import ctranslate2
    except ImportError as exc:
        raise ImportError(f"backend='ctranslate2' needs the ctranslate2 package, which cannot be imported ({exc}): "
                          f"{INSTALL}; or use backend='torch'.") from exc
    return ctranslate2


def cache_root() -> Path:
    from expandr_haystack.models import expandr_home

    return expandr_home() / "encoders" / "ctranslate2"


def converted_dir(identity: str, compute_type: str, root: Path | None = None) -> Path:
    """Where the conversion of the model `identity` (a string that changes with its weights and loading options)
    to `compute_type` lives."""
    ctranslate2 = import_ctranslate2()
    key = hashlib.sha256(json.dumps([identity, ctranslate2.__version__]).encode()).hexdigest()[:24]
    return (root or cache_root()) / f"{key}-{compute_type}"


def _transformer_module(encoder):
    """The encoder's first module when it is a sentence-transformers text `Transformer` that CTranslate2 converts;
    a ValueError naming what it is otherwise."""
    module = encoder[0] if len(encoder) else None
    hf = getattr(module, "model", None)
    config = getattr(hf, "config", None)
    if config is None or getattr(module, "tokenizer", None) is None:
        raise ValueError(f"backend='ctranslate2' converts a sentence-transformers model whose first module is a "
                         f"Hugging Face text transformer; this one starts with {type(module).__name__}.")
    if type(config).__name__ not in ENCODER_CONFIGS:
        raise ValueError(f"backend='ctranslate2' converts BERT-family encoders ({', '.join(ENCODER_CONFIGS)}); this "
                         f"model's transformer is {getattr(config, 'model_type', '?')!r} ({type(config).__name__}). "
                         f"Use backend='torch'.")
    return module


def _convert(module, target: Path, compute_type: str) -> None:
    """Convert `module`'s Hugging Face model (as loaded) into `target`, atomically (a partial folder is renamed)."""
    ctranslate2 = import_ctranslate2()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".source-", dir=target.parent) as source:
        module.model.save_pretrained(source)
        module.tokenizer.save_pretrained(source)
        config_file = Path(source) / "config.json"
        config = json.loads(config_file.read_text())
        if config.get("model_type") in ("bert", "roberta", "xlm-roberta") and "position_embedding_type" not in config:
            # transformers 5 dropped the attribute (absolute positions only); the converter still asserts on it
            config["position_embedding_type"] = "absolute"
            config_file.write_text(json.dumps(config))
        partial = Path(tempfile.mkdtemp(prefix=f".partial-{target.name}-", dir=target.parent))
        try:
            try:
                ctranslate2.converters.TransformersConverter(source).convert(
                    str(partial), quantization=compute_type, force=True)
            except Exception as exc:  # the converter raises ValueError, AssertionError, KeyError, ...
                raise ValueError(f"backend='ctranslate2': CTranslate2 cannot convert this "
                                 f"{type(module.model.config).__name__} model ({type(exc).__name__}: {exc}). Use "
                                 f"backend='torch'.") from exc
            try:
                partial.rename(target)
            except OSError:
                if not (target / "model.bin").exists():  # not another process's finished conversion: a real error
                    raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)


def ensure_converted(module, identity: str, compute_type: str, root: Path | None = None) -> Path:
    """The folder of the converted model, converting it first unless an earlier load did."""
    target = converted_dir(identity, compute_type, root)
    with _CONVERT_LOCK:
        if not (target / "model.bin").exists():
            _convert(module, target, compute_type)
    return target


class CTranslate2Transformer:
    """
    Stands in for the Hugging Face model inside sentence-transformers' `Transformer` module: the same keyword inputs
    (`input_ids`, `attention_mask`, `token_type_ids`), ``{"last_hidden_state": tensor}`` out (zeros at padded
    positions, which pooling masks out), computed by a `ctranslate2.Encoder` in groups of at most `max_batch_tokens`
    tokens without padding.
    """

    def __init__(self, encoder, config, path: Path, compute_type: str, max_batch_tokens: int):
        import torch

        self.encoder = encoder
        self.config = config
        self.path = path
        self.compute_type = compute_type
        self.max_batch_tokens = max_batch_tokens
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.token_types = int(getattr(config, "type_vocab_size", 0) or 0) > 0  # DistilBERT has none

    def __repr__(self) -> str:
        return (f"CTranslate2Transformer({self.path.name}, compute_type={self.compute_type!r}, "
                f"max_batch_tokens={self.max_batch_tokens})")

    def groups(self, lengths: list[int]) -> list[list[int]]:
        """Consecutive rows, at most `max_batch_tokens` tokens (rows x longest row) each, at least one row."""
        out, group, longest = [], [], 0
        for i, n in enumerate(lengths):
            if group and (len(group) + 1) * max(longest, n) > self.max_batch_tokens:
                out.append(group)
                group, longest = [], 0
            group.append(i)
            longest = max(longest, n)
        return out + [group] if group else out

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, **_ignored):
        import torch

        ids = input_ids.detach().cpu().numpy()
        mask = (np.ones_like(ids, dtype=bool) if attention_mask is None
                else attention_mask.detach().cpu().numpy().astype(bool))
        types = token_type_ids.detach().cpu().numpy() if token_type_ids is not None and self.token_types else None
        positions = [np.flatnonzero(row) for row in mask]
        hidden = None
        for group in self.groups([len(p) for p in positions]):
            group = [i for i in group if len(positions[i])]
            if not group:
                continue
            result = self.encoder.forward_batch(
                [ids[i, positions[i]].tolist() for i in group],
                token_type_ids=None if types is None else [types[i, positions[i]].tolist() for i in group])
            states = torch.from_numpy(np.asarray(result.last_hidden_state, dtype=np.float32))
            if hidden is None:
                hidden = torch.zeros((*ids.shape, states.shape[-1]), dtype=torch.float32)
            for j, i in enumerate(group):
                hidden[i, torch.from_numpy(positions[i])] = states[j, : len(positions[i])]
        if hidden is None:
            hidden = torch.zeros((*ids.shape, self.config.hidden_size), dtype=torch.float32)
        return {"last_hidden_state": hidden.to(input_ids.device)}

    __call__ = forward


def to_ctranslate2(encoder, identity: str, *, compute_type: str = DEFAULT_COMPUTE_TYPE,
                   intra_threads: int | None = None, max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
                   root: Path | None = None):
    """
    Turn the (freshly loaded, torch, CPU) sentence-transformers `encoder` into the CTranslate2 backend, in place, and
    return it. `identity` must change whenever the loaded weights would (`load_encoder` passes the model's
    fingerprint and loading options); `root` defaults to `cache_root()`. Raises ImportError (ctranslate2 missing),
    ValueError (a model, device or option this backend does not take; a conversion that does not match torch).
    """
    import torch

    ctranslate2 = import_ctranslate2()
    check_options({"compute_type": compute_type, "intra_threads": intra_threads, "max_batch_tokens": max_batch_tokens})
    if encoder.device.type != "cpu":
        raise ValueError(f"backend='ctranslate2' runs on the CPU only; the encoder's device is {encoder.device}. Use "
                         f"device='cpu', or backend='torch' on a GPU.")
    supported = ctranslate2.get_supported_compute_types("cpu")
    if compute_type not in supported:
        raise ValueError(f"`model_kwargs['compute_type']`={compute_type!r}: this CPU runs only {sorted(supported)} "
                         f"in CTranslate2.")
    module = _transformer_module(encoder)
    path = ensure_converted(module, identity, compute_type, root)
    threads = torch.get_num_threads() if intra_threads is None else intra_threads
    engine = ctranslate2.Encoder(str(path), device="cpu", compute_type=compute_type, intra_threads=threads,
                                 inter_threads=1)
    texts = list(CHECK_TEXTS)
    reference = encoder.encode(texts, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)
    hf = module.model
    stand_in = CTranslate2Transformer(engine, hf.config, path, compute_type, max_batch_tokens)
    module._modules.pop("model", None)  # the torch weights go: CTranslate2 computes the forward pass
    object.__setattr__(module, "model", stand_in)
    vectors = encoder.encode(texts, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)
    cosine = float((vectors * reference).sum(1).min())
    if not cosine >= MIN_COSINE:
        del module.__dict__["model"]
        module.model = hf
        raise ValueError(f"backend='ctranslate2': the converted model ({path}) does not reproduce the torch encoder "
                         f"(least cosine {cosine:.4f} < {MIN_COSINE} on {len(texts)} check texts); delete that folder "
                         f"to convert again, try compute_type='float32', or use backend='torch'.")
    return encoder


__all__ = ["COMPUTE_TYPES", "DEFAULT_COMPUTE_TYPE", "DEFAULT_MAX_BATCH_TOKENS", "ENCODER_CONFIGS", "MIN_COSINE",
           "OPTIONS", "CTranslate2Transformer", "check_options", "converted_dir", "ensure_converted",
           "import_ctranslate2", "split_options", "to_ctranslate2"]
