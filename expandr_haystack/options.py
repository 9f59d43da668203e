"""
Typed option groups: the settings a component passes on to what it loads, written once and shared by every
component that loads the same thing.

- `EncoderOptions`: how a sentence-transformers encoder is loaded and run (`ExpandRQueryEmbedder`, and through it
  `ExpandRRetriever` and `RewardScorer`); the names and meanings of Haystack's `SentenceTransformersTextEmbedder`.
- `SamplerOptions`: how a local LLM (or a chat generator) is loaded and called (`LLMQueryExpander`,
  `generation.make_sampler`, the training rounds, `expandr pairs`, `expandr eval`).
- `GenerationSettings`: what is sampled (temperature, top-p, length, batch size, base seed).
- `FusionSettings`: how `ExpandRRetriever` turns a query and its expansions into one ranking (mean / RRF, PRF).

Each group checks its values once, when it is made; the code below the components trusts them. Groups serialise
as Haystack serialises a nested object (``{"type": ..., "init_parameters": {...}}``, loaded under the package's
allow-list), and a component also accepts a plain dict for a group (``generation={"temperature": 0.7}``).

Usage:
```python
from expandr_haystack import LLMQueryExpander, ExpandRQueryEmbedder
from expandr_haystack.options import EncoderOptions, GenerationSettings, SamplerOptions

embedder = ExpandRQueryEmbedder(model="intfloat/e5-small-v2", prefix="query: ",
                                encoder=EncoderOptions(batch_size=64, truncate_dim=256))
expander = LLMQueryExpander(generation=GenerationSettings(temperature=0.7), sampler=SamplerOptions(engine="packed"))
```
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal

from haystack.core.serialization import generate_qualified_class_name
from haystack.utils import ComponentDevice, Secret, deserialize_secrets_inplace

from expandr_haystack.checks import check_choice, check_int, check_number

#: Encoder runtimes (sentence-transformers' `backend`, as Haystack's embedders name it; "ctranslate2" is this
#: package's: `expandr_haystack.encoders.ctranslate2`).
ENCODER_BACKENDS = ("torch", "onnx", "openvino", "ctranslate2")
#: Local generation engines (`SamplerOptions.engine`; `expandr eval --engine`, `llm_engine` in configs).
ENGINES = ("auto", "packed", "transformers", "vllm", "llama_cpp")
#: Weight precisions of the packed CPU decoder (`SamplerOptions.weight_precision`).
WEIGHT_PRECISIONS = ("auto", "float32", "int8", "bfloat16")
#: Model dtypes of the transformers / vLLM engines (`SamplerOptions.dtype`).
DTYPES = ("auto", "float32", "bfloat16", "float16")


def default_token() -> Secret:
    """Hugging Face's environment variables, as Haystack's components default `token` (None when neither is set)."""
    return Secret.from_env_var(["HF_API_TOKEN", "HF_TOKEN"], strict=False)


def _check_kwargs(value: Any, argument: str) -> dict[str, Any] | None:
    if value is not None and not (isinstance(value, dict) and all(isinstance(k, str) for k in value)):
        raise TypeError(f"`{argument}` must be a dict with string keys or None; got {value!r:.120}.")
    return None if value is None else dict(value)


def _check_token(token: Any, argument: str = "token") -> None:
    if token is not None and not isinstance(token, Secret):
        raise TypeError(f"`{argument}` must be a haystack.utils.Secret (e.g. Secret.from_env_var('HF_TOKEN')) or "
                        f"None; got {type(token).__name__}.")


def _serialized_model_kwargs(model_kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
    """A JSON-friendly copy of `model_kwargs` (torch dtypes as "torch.bfloat16", as Haystack's HF components)."""
    if model_kwargs is None:
        return None
    from haystack.utils.hf import serialize_hf_model_kwargs

    out = copy.deepcopy(model_kwargs)
    serialize_hf_model_kwargs(out)
    return out


class _Options:
    """Serialisation shared by the option groups (Haystack's nested-object layout)."""

    def to_dict(self) -> dict[str, Any]:
        params: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (Secret, ComponentDevice)):
                value = value.to_dict()
            elif f.name == "model_kwargs":
                value = _serialized_model_kwargs(value)
            params[f.name] = copy.deepcopy(value)
        return {"type": generate_qualified_class_name(type(self)), "init_parameters": params}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        params = copy.deepcopy(data.get("init_parameters", data))
        return cls.coerce(params, cls.__name__)

    @classmethod
    def coerce(cls, value: Any, argument: str) -> Any:
        """`value` as this group: None = the defaults; a group as is; a dict (plain, or as `to_dict` writes it) of
        its fields. Unknown keys are refused, naming `argument` and the valid keys."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise TypeError(f"`{argument}` must be a {cls.__name__}, a dict of its fields or None; got "
                            f"{type(value).__name__}.")
        if set(value) <= {"type", "init_parameters"} and "init_parameters" in value:
            value = value["init_parameters"]
        params = copy.deepcopy(value)
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - names)
        if unknown:
            raise ValueError(f"`{argument}`: unknown key(s) {unknown}; valid: {sorted(names)}.")
        if isinstance(params.get("token"), dict):
            deserialize_secrets_inplace(params, keys=["token"])
        if isinstance(params.get("device"), dict):
            params["device"] = ComponentDevice.from_dict(params["device"])
        if params.get("model_kwargs"):
            from haystack.utils.hf import deserialize_hf_model_kwargs

            deserialize_hf_model_kwargs(params["model_kwargs"])
        return cls(**params)

    def replace(self, **changes: Any) -> Any:
        """A copy with `changes` (checked like the constructor)."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class EncoderOptions(_Options):
    """
    How a sentence-transformers encoder is loaded and run; the names and meanings of Haystack's
    `SentenceTransformersTextEmbedder` (the text-side settings, `prefix`/`suffix`, stay on each component: a query
    and a document take different ones).

    :param batch_size: Texts encoded together.
    :param progress_bar: Show a progress bar when encoding many texts.
    :param token: Hugging Face token for gated or private models (default: `HF_API_TOKEN` or `HF_TOKEN` when set);
        serialised as the variable names, never the value.
    :param trust_remote_code: Allow models with custom code.
    :param revision: Branch, tag or commit of a hub model.
    :param local_files_only: Never download; use the local Hugging Face cache only.
    :param truncate_dim: Truncate embeddings to this dimension (Matryoshka models); None = no truncation.
    :param model_kwargs: Keyword arguments for the model's `from_pretrained`.
    :param tokenizer_kwargs: Keyword arguments for the tokenizer (`model_max_length` also sets `max_seq_length`).
    :param config_kwargs: Keyword arguments for `AutoConfig.from_pretrained`.
    :param encode_kwargs: Extra keyword arguments for `SentenceTransformer.encode` (e.g. `prompt_name`, `task`);
        the ones the components set themselves (batch size, normalisation, precision, ...) are refused.
    :param backend: The encoder runtime: "torch", "onnx" or "openvino" (the last two need `optimum`), or
        "ctranslate2" (CPU, BERT-family encoders, needs `ctranslate2`: the transformer converted once and run in int8
        by CTranslate2; its options `compute_type` ("int8", "int8_float32", "int16", "float32"), `intra_threads` and
        `max_batch_tokens` go in `model_kwargs`, see `expandr_haystack.encoders.ctranslate2`).
    """

    batch_size: int = 32
    progress_bar: bool = False
    token: Secret | None = field(default_factory=default_token)
    trust_remote_code: bool = False
    revision: str | None = None
    local_files_only: bool = False
    truncate_dim: int | None = None
    model_kwargs: dict[str, Any] | None = None
    tokenizer_kwargs: dict[str, Any] | None = None
    config_kwargs: dict[str, Any] | None = None
    encode_kwargs: dict[str, Any] | None = None
    backend: Literal["torch", "onnx", "openvino", "ctranslate2"] = "torch"

    #: `SentenceTransformer.encode` arguments the components set themselves, with the setting to use instead.
    OWN_ENCODE_ARGUMENTS: ClassVar[dict[str, str]] = {
        "batch_size": "batch_size", "show_progress_bar": "progress_bar", "normalize_embeddings":
        "normalize_embeddings", "precision": "precision", "convert_to_numpy": "-", "convert_to_tensor": "-",
        "output_value": "-", "device": "device"}

    def __post_init__(self) -> None:
        check_int(self.batch_size, "batch_size")
        _check_token(self.token)
        if self.truncate_dim is not None:
            check_int(self.truncate_dim, "truncate_dim")
        for name in ("model_kwargs", "tokenizer_kwargs", "config_kwargs", "encode_kwargs"):
            object.__setattr__(self, name, _check_kwargs(getattr(self, name), name))
        check_choice(self.backend, "backend", ENCODER_BACKENDS)
        from expandr_haystack.encoders import ctranslate2 as ct2  # imports no ctranslate2 itself

        if self.backend == "ctranslate2":
            ct2.check_options(self.model_kwargs)
        elif set(self.model_kwargs or {}) & set(ct2.OPTIONS):
            raise ValueError(f"`model_kwargs` {sorted(set(self.model_kwargs) & set(ct2.OPTIONS))} are options of "
                             f"backend='ctranslate2'; this encoder's backend is {self.backend!r}.")
        clash = sorted(set(self.encode_kwargs or {}) & set(self.OWN_ENCODE_ARGUMENTS))
        if clash:
            raise ValueError(f"`encode_kwargs` may not set {clash}: use the component's own settings "
                             f"({', '.join(self.OWN_ENCODE_ARGUMENTS[k] for k in clash)}).")

    def loader_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `expandr_haystack.models.load_encoder`."""
        return {name: getattr(self, name) for name in ("token", "trust_remote_code", "revision", "local_files_only",
                                                        "truncate_dim", "model_kwargs", "tokenizer_kwargs",
                                                        "config_kwargs", "backend")}


@dataclass(frozen=True)
class SamplerOptions(_Options):
    """
    How the expander's LLM is loaded and called (`generation.make_sampler`).

    :param engine: Local generation engine: "auto" (the packed CPU decoder for Llama-architecture models on CPU,
        else transformers), "packed" (fail if the model does not allow it), "transformers", "vllm" (GPU,
        in-process vLLM with the LoRA adapter per request; needs the `vllm` extra) or "llama_cpp" (a GGUF file, None
        = the bundled one, run natively by llama.cpp in its own quantization on any CPU, the LoRA adapter converted
        to GGUF once; needs the `llama-cpp` extra). Unused with a chat generator.
    :param device: Device for the local model (None = best available, resolved at `warm_up`).
    :param dtype: "auto" (bfloat16 on GPU, float32 on CPU), "float32", "bfloat16" or "float16".
    :param weight_precision: Weight precision of the packed CPU decoder: "auto" (the default: int8 where it runs,
        else float32; the choice and its reason are logged at INFO), "float32" (exact: the reference), "int8"
        (per-channel int8 weights through FBGEMM on smoothed 8-bit inputs; x86 CPUs with AVX2, 7-bit weights
        without AVX512-VNNI) or "bfloat16" (CPUs with native bfloat16 only). Texts in each precision (and int8 weight
        width) are cached apart. Packed decoder only; the other engines ignore "auto".
    :param max_prompt_tokens: Longer queries (and documents) are truncated, with a warning, so the prompt fits.
    :param model_kwargs: Keyword arguments for `AutoModelForCausalLM.from_pretrained` (transformers engines), e.g.
        ``{"device_map": "auto"}`` or a quantization config; part of the cache key when given.
    :param token: Hugging Face token for gated models; serialised as the variable names, never the value.
    :param max_retries: Retries for empty generations (new seed) and failing remote calls (with backoff).
    :param retry_backoff: First wait in seconds between remote retries; doubles each time.
    :param max_concurrency: Remote calls in flight at once.
    :param engine_kwargs: Keyword arguments for the engine itself: llama-cpp-python's ``Llama(...)`` with
        `engine='llama_cpp'` (e.g. ``{"n_ctx": 8192}``, ``{"n_threads": 4}``; defaults: 4096 and every core), or
        vLLM's ``LLM(...)`` with `engine='vllm'`, e.g.
        ``{"tensor_parallel_size": 4}`` (one model over 4 GPUs; an in-process ``LLM`` refuses ``data_parallel_size`` > 1),
        ``{"gpu_memory_utilization": 0.8}`` (default 0.4: joint training keeps room for its trainers) or
        ``{"max_model_len": 8192}``. They change where and how fast rows are generated, not their texts.
    """

    engine: str = "auto"
    device: ComponentDevice | None = None
    dtype: str = "auto"
    weight_precision: str = "auto"
    max_prompt_tokens: int = 1024
    model_kwargs: dict[str, Any] | None = None
    token: Secret | None = field(default_factory=default_token)
    max_retries: int = 2
    retry_backoff: float = 1.0
    max_concurrency: int = 8
    engine_kwargs: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        check_choice(self.engine, "engine", ENGINES)
        if self.device is not None and not isinstance(self.device, ComponentDevice):
            raise TypeError(f"`device` must be a haystack ComponentDevice or None; got {type(self.device).__name__}.")
        check_choice(self.dtype, "dtype", DTYPES)
        check_choice(self.weight_precision, "weight_precision", WEIGHT_PRECISIONS)
        if self.weight_precision not in ("float32", "auto") and self.engine in ("vllm", "transformers", "llama_cpp"):
            raise ValueError(f"`weight_precision`={self.weight_precision!r} is the packed CPU decoder's; it does not "
                             f"apply with `engine`={self.engine!r} (use `dtype` with transformers/vLLM; a GGUF file "
                             "carries its own quantization).")
        check_int(self.max_prompt_tokens, "max_prompt_tokens")
        object.__setattr__(self, "model_kwargs", _check_kwargs(self.model_kwargs, "model_kwargs"))
        if self.model_kwargs and self.engine in ("vllm", "llama_cpp"):
            raise ValueError(f"`model_kwargs` go to transformers' from_pretrained; `engine`={self.engine!r} does not "
                             "take them (use `engine_kwargs`).")
        _check_token(self.token)
        check_int(self.max_retries, "max_retries", minimum=0)
        check_number(self.retry_backoff, "retry_backoff", 0.0)
        check_int(self.max_concurrency, "max_concurrency")
        object.__setattr__(self, "engine_kwargs", _check_kwargs(self.engine_kwargs, "engine_kwargs"))
        if self.engine_kwargs and self.engine not in ("vllm", "llama_cpp"):
            raise ValueError(f"`engine_kwargs` go to vLLM's LLM(...) or llama.cpp's Llama(...); `engine`={self.engine!r} "
                             "does not take them (use `model_kwargs` for transformers' from_pretrained).")


@dataclass(frozen=True)
class GenerationSettings(_Options):
    """
    What the expander samples.

    :param temperature: Sampling temperature (>= 0; 0 = greedy).
    :param top_p: Nucleus sampling mass, in (0, 1].
    :param max_new_tokens: Length limit of an expansion. The paper uses 512; the default 96 keeps CPU runs fast and
        covers the short passages a retriever's 256-token window reads anyway.
    :param batch_size: Rows generated together by a local model.
    :param seed: Base seed; each row's seed derives from it, the query and the sample index.
    :param progress_bar: Show a progress bar while generating.
    :param generation_kwargs: Further settings passed through to a chat generator's `generation_kwargs` (e.g.
        ``{"presence_penalty": 0.5}``); refused with a local model, whose engines take only the ones above.
    """

    temperature: float = 1.0
    top_p: float = 0.9
    max_new_tokens: int = 96
    batch_size: int = 16
    seed: int = 42
    progress_bar: bool = False
    generation_kwargs: dict[str, Any] | None = None

    #: `generation_kwargs` keys that are fields of this group (Haystack generators take them in that dict).
    OWN_KEYS: ClassVar[tuple[str, ...]] = ("max_new_tokens", "temperature", "top_p")

    def __post_init__(self) -> None:
        object.__setattr__(self, "temperature", check_number(self.temperature, "temperature", 0.0))
        object.__setattr__(self, "top_p", check_number(self.top_p, "top_p", 0.0, 1.0, low_open=True))
        check_int(self.max_new_tokens, "max_new_tokens")
        check_int(self.batch_size, "batch_size")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise TypeError(f"`seed` must be an integer; got {self.seed!r}.")
        extra = _check_kwargs(self.generation_kwargs, "generation_kwargs")
        own = sorted(set(extra or {}) & set(self.OWN_KEYS))
        if own:
            raise ValueError(f"`generation_kwargs` may not set {own}: they are fields of GenerationSettings.")
        object.__setattr__(self, "generation_kwargs", extra or None)

    @classmethod
    def from_generation_kwargs(cls, generation_kwargs: dict[str, Any] | None, **settings: Any) -> GenerationSettings:
        """Settings from Haystack-style `generation_kwargs` (its `max_new_tokens`, `temperature`, `top_p` win over
        `settings`; the other keys stay pass-through)."""
        kwargs = _check_kwargs(generation_kwargs, "generation_kwargs") or {}
        own = {k: kwargs.pop(k) for k in cls.OWN_KEYS if k in kwargs}
        return cls(**(settings | own), generation_kwargs=kwargs or None)


#: How `ExpandRRetriever` combines a query with its expansions (`FusionSettings.method`).
FUSIONS = ("mean", "rrf")


@dataclass(frozen=True)
class FusionSettings(_Options):
    """
    How a query and its expansions become one ranking (`ExpandRRetriever`; the math is `core.fusion`).

    :param method: "mean" (the ExpandR fused vector w·q̂ + (1-w)·mean(ê)) or "rrf" (reciprocal-rank fusion of one
        search per query and expansion vector).
    :param query_weight: w, the query's weight in the fused vector (mean), in [0, 1] (0.5 = the paper's mean).
    :param rrf_k: The k constant of reciprocal-rank fusion.
    :param rrf_depth: Hits taken from each search before RRF.
    :param feedback_k: Rocchio pseudo-relevance feedback (mean): 0 = off; k > 0 searches once, then again with
        v' = f·v̂ + (1-f)·mean(top-k document vectors), f = `feedback_weight`. Refused with "rrf".
    :param feedback_weight: f above, in [0, 1].
    """

    method: str = "mean"
    query_weight: float = 0.5
    rrf_k: int = 60
    rrf_depth: int = 100
    feedback_k: int = 0
    feedback_weight: float = 0.7

    def __post_init__(self) -> None:
        check_choice(self.method, "method", FUSIONS)
        object.__setattr__(self, "query_weight", check_number(self.query_weight, "query_weight", 0.0, 1.0))
        check_int(self.rrf_k, "rrf_k")
        check_int(self.rrf_depth, "rrf_depth")
        check_feedback(self.method, self.feedback_k)
        object.__setattr__(self, "feedback_weight", check_number(self.feedback_weight, "feedback_weight", 0.0, 1.0))

    @classmethod
    def coerce(cls, value: Any, argument: str) -> FusionSettings:
        """As `_Options.coerce`, and a method name alone ("mean" / "rrf") stands for the defaults with it."""
        return cls(method=value) if isinstance(value, str) else super().coerce(value, argument)


def check_feedback(method: str, feedback_k: Any, method_argument: str = "method") -> int:
    """`feedback_k` (an int >= 0) for fusion `method`: Rocchio feedback is a mean-fusion setting, so k > 0 with
    "rrf", which would ignore it, is a ValueError naming both (`method_argument`: the method's name where it was
    given, `fusion` for a `retrieve` call)."""
    check_int(feedback_k, "feedback_k", minimum=0)
    if feedback_k and method == "rrf":
        raise ValueError(f"`feedback_k`={feedback_k} (pseudo-relevance feedback) applies to `{method_argument}`='mean' "
                         f"only; with `{method_argument}`='rrf' it would be ignored: set feedback_k=0 or "
                         f"{method_argument}='mean'.")
    return feedback_k


def add_sampler_arguments(parser: Any, aliases: tuple[str, ...] = ()) -> None:
    """`--engine` (with `aliases`, e.g. the old `--backend`) and `--weight-precision`, as every command that loads the
    expander's LLM takes them (`SamplerOptions.engine` / `.weight_precision`)."""
    parser.add_argument("--engine", *aliases, dest="engine", default="auto", choices=ENGINES,
                        help="LLM generation engine (default auto: the packed decoder for the bundled model on CPU"
                             + (f"; {'/'.join(aliases)}: its old name" if aliases else "") + ")")
    parser.add_argument("--weight-precision", default="auto", choices=WEIGHT_PRECISIONS,
                        help="the packed decoder's weights (default auto: int8 where the CPU runs it, logged; "
                             "float32: the exact reference)")


def fold_legacy(params: dict[str, Any], group: str, cls: type, owner: str,
                renamed: dict[str, str] | None = None) -> dict[str, Any]:
    """
    Fold the flat keys of an older serialised component into its option group `group` (a copy of `params`).

    A key that is a field of `cls` moves into the group; a key of `renamed` (old name -> new field name) moves under
    its new name with a `DeprecationWarning` naming both. Keys already in the group win over flat ones.
    """
    renamed = renamed or {}
    names = {f.name for f in fields(cls)}
    moved = {k: params[k] for k in list(params) if k in names or k in renamed}
    if not moved:
        return params
    out = {k: v for k, v in params.items() if k not in moved}
    old = [k for k in moved if k in renamed]
    if old:
        warnings.warn(f"{owner}: {', '.join(f'`{k}` is now `{group}.{renamed[k]}`' for k in old)}; the old name "
                      "is read from files saved by earlier versions and will be removed. Save the pipeline again to "
                      "update it.", DeprecationWarning, stacklevel=3)
    given = out.get(group)
    given = {} if given is None else dict(given.get("init_parameters", given)) if isinstance(given, dict) else given
    if not isinstance(given, dict):  # a ready group object: flat keys would be ignored silently otherwise
        raise TypeError(f"{owner}: both `{group}` and its flat keys {sorted(moved)} are set; keep one.")
    out[group] = {renamed.get(k, k): v for k, v in moved.items()} | given
    return out


__all__ = ["DTYPES", "ENCODER_BACKENDS", "ENGINES", "FUSIONS", "WEIGHT_PRECISIONS", "EncoderOptions", "FusionSettings",
           "GenerationSettings", "SamplerOptions", "add_sampler_arguments", "check_feedback", "default_token",
           "fold_legacy"]
