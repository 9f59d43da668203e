"""ExpandRQueryEmbedder: the ExpandR fused query vector."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from haystack import component, default_from_dict, default_to_dict
from haystack.utils import ComponentDevice, Secret, deserialize_secrets_inplace
from haystack.utils.hf import deserialize_hf_model_kwargs, serialize_hf_model_kwargs

from expandr_haystack.checks import check_choice, check_int, check_number
from expandr_haystack.core.fusion import fuse, unit
from expandr_haystack.core.text import check_expansions, check_query, clean_text
from expandr_haystack.models import ENCODER_BACKENDS, load_encoder, resolve_device, resolve_encoder_path

#: The default `token`: Hugging Face's environment variables, as Haystack's embedders (None when neither is set).
DEFAULT_TOKEN = Secret.from_env_var(["HF_API_TOKEN", "HF_TOKEN"], strict=False)
#: Output precisions (as Haystack's SentenceTransformersTextEmbedder).
PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")
#: The `load_encoder` options a component passes through (and serialises) unchanged.
ENCODER_OPTIONS = ("token", "trust_remote_code", "revision", "local_files_only", "truncate_dim", "model_kwargs",
                   "tokenizer_kwargs", "config_kwargs", "backend")
#: `SentenceTransformer.encode` arguments this component sets itself, with the parameter to use instead.
_OWN_ENCODE_ARGUMENTS = {
    "batch_size": "batch_size", "show_progress_bar": "progress_bar", "normalize_embeddings": "normalize_embeddings",
    "precision": "precision", "convert_to_numpy": "-", "convert_to_tensor": "-", "output_value": "-",
    "device": "device",
}


def serialize_encoder_options(data: dict[str, Any]) -> dict[str, Any]:
    """`default_to_dict` output with `model_kwargs` made serialisable (torch dtypes as strings), on a copy."""
    params = data["init_parameters"]
    if params.get("model_kwargs") is not None:
        params["model_kwargs"] = copy.deepcopy(params["model_kwargs"])
        serialize_hf_model_kwargs(params["model_kwargs"])
    return data


def deserialize_encoder_options(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of a serialised component with its `token` Secret and `model_kwargs` restored (the input unchanged)."""
    data = copy.deepcopy(data)
    params = data.setdefault("init_parameters", {})
    deserialize_secrets_inplace(params, keys=["token"])
    if params.get("model_kwargs") is not None:
        deserialize_hf_model_kwargs(params["model_kwargs"])
    return data


@component
class ExpandRQueryEmbedder:
    """
    Embeds a query together with its LLM expansions into one ExpandR query vector.

    The vector is `fuse(E(query), E(expansions))` with a sentence-transformers encoder (bundled all-MiniLM-L6-v2 by
    default; use the same encoder that embedded the documents). Feed it to any Haystack embedding retriever
    (InMemory, Qdrant, Elasticsearch, pgvector, ...) to serve an ExpandR query over a corpus at scale.

    It takes the encoder options of Haystack's `SentenceTransformersTextEmbedder` (`prefix`, `suffix`, `token`,
    `trust_remote_code`, `model_kwargs`, `tokenizer_kwargs`, `encode_kwargs`, `backend`, `precision`,
    `truncate_dim`, `normalize_embeddings`, ...). Without expansions and with `normalize_embeddings=True` its vector
    is the stock embedder's for the same model and prefix. For an E5-style encoder, index with
    `SentenceTransformersDocumentEmbedder(model=m, prefix="passage: ")` and query with
    `ExpandRQueryEmbedder(model=m, prefix="query: ")`; expansions get the query's prefix unless `expansion_prefix`
    says otherwise.

    Usage:
    ```python
    from haystack import Pipeline
    from haystack.components.retrievers.in_memory import InMemoryEmbeddingRetriever
    from expandr_haystack import LLMQueryExpander, ExpandRQueryEmbedder

    p = Pipeline()
    p.add_component("expander", LLMQueryExpander())
    p.add_component("embedder", ExpandRQueryEmbedder())
    p.add_component("retriever", InMemoryEmbeddingRetriever(document_store=store))
    p.connect("expander.query", "embedder.query")
    p.connect("expander.expansions", "embedder.expansions")
    p.connect("embedder.embedding", "retriever.query_embedding")
    ```
    """

    def __init__(
        self,
        model: str | None = None,
        query_weight: float = 0.5,
        device: ComponentDevice | None = None,
        batch_size: int = 32,
        progress_bar: bool = False,
        *,
        token: Secret | None = DEFAULT_TOKEN,
        prefix: str = "",
        suffix: str = "",
        expansion_prefix: str | None = None,
        expansion_suffix: str | None = None,
        normalize_embeddings: bool = False,
        trust_remote_code: bool = False,
        revision: str | None = None,
        local_files_only: bool = False,
        truncate_dim: int | None = None,
        model_kwargs: dict[str, Any] | None = None,
        tokenizer_kwargs: dict[str, Any] | None = None,
        config_kwargs: dict[str, Any] | None = None,
        encode_kwargs: dict[str, Any] | None = None,
        backend: Literal["torch", "onnx", "openvino"] = "torch",
        precision: Literal["float32", "int8", "uint8", "binary", "ubinary"] = "float32",
        quantization_ranges: list[list[float]] | None = None,
    ):
        """
        The encoder options after `progress_bar` are those of Haystack's `SentenceTransformersTextEmbedder`, with the
        same meaning, so a pipeline can swap the stock query embedder for this one; `expansion_prefix`/`_suffix` are
        this component's own.

        :param model: None for the bundled all-MiniLM-L6-v2, or a sentence-transformers model id or local directory.
        :param query_weight: Weight w of the query in the fused vector, in [0, 1] (0.5 = paper).
        :param device: Device for the encoder (None = best available).
        :param batch_size: Texts encoded together.
        :param progress_bar: Show a progress bar when encoding many texts.
        :param token: Hugging Face token for gated or private models (default: `HF_API_TOKEN` or `HF_TOKEN` when set).
        :param prefix: Put before the query, e.g. "query: " for E5 or BGE's instruction. Documents keep their own
            prefix on the indexing side (`SentenceTransformersDocumentEmbedder(prefix="passage: ")` for E5).
        :param suffix: Put after the query.
        :param expansion_prefix: Put before each expansion; None = the same as `prefix`. The expansions are part of
            the query representation (the fused vector stands in for the query), so by default they are embedded as
            the query is, as query2doc embeds "query + pseudo-document" on the query side and as E5 advises "query: "
            for text matched against passages. Set it to the document prefix (e.g. "passage: ") to embed them as
            pseudo-documents instead (HyDE). Encoders without prefixes (the paper's MiniLM) are unaffected.
        :param expansion_suffix: Put after each expansion; None = the same as `suffix`.
        :param normalize_embeddings: L2-normalise the output vector. The query and each expansion are always
            normalised before fusion (the ExpandR fused vector is defined on unit vectors, as in training); without
            expansions the output is the unit query vector either way, and with expansions its norm is below 1 unless
            this is True. Rankings by cosine or inner product are the same either way.
        :param trust_remote_code: Allow models with custom code.
        :param revision: Branch, tag or commit of a hub model.
        :param local_files_only: Never download; use the local Hugging Face cache only.
        :param truncate_dim: Truncate embeddings to this dimension (Matryoshka models); None = no truncation.
        :param model_kwargs: Keyword arguments for the model's `from_pretrained`.
        :param tokenizer_kwargs: Keyword arguments for the tokenizer (`model_max_length` also sets `max_seq_length`).
        :param config_kwargs: Keyword arguments for `AutoConfig.from_pretrained`.
        :param encode_kwargs: Extra keyword arguments for `SentenceTransformer.encode` (e.g. `prompt_name`, `task`);
            the ones this component sets itself (batch size, normalisation, precision, ...) are refused.
        :param backend: "torch", "onnx" or "openvino" (the last two need `optimum`).
        :param precision: Precision of the output vector: "float32", or a quantised "int8", "uint8", "binary",
            "ubinary" (as the documents were stored). The query and expansions are fused in float32 and the fused
            vector is quantised; `encode`/`embed_fused` always return float32.
        :param quantization_ranges: Calibration ranges for "int8"/"uint8" (shape (2, dimension)), as Haystack.
        """
        check_number(query_weight, "query_weight", 0.0, 1.0)
        check_int(batch_size, "batch_size")
        resolve_encoder_path(model)  # a missing local path fails here, naming `model`
        check_choice(backend, "backend", ENCODER_BACKENDS)
        check_choice(precision, "precision", PRECISIONS)
        if precision in ("int8", "uint8") and quantization_ranges is None:
            raise ValueError(f"Precision {precision!r} requires `quantization_ranges` computed from a representative "
                             f"sample of embeddings.")
        for name, value in (("prefix", prefix), ("suffix", suffix)):
            if not isinstance(value, str):
                raise TypeError(f"`{name}` must be a str; got {type(value).__name__}.")
        for name, value in (("expansion_prefix", expansion_prefix), ("expansion_suffix", expansion_suffix)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"`{name}` must be a str or None (= the query's); got {type(value).__name__}.")
        if token is not None and not isinstance(token, Secret):
            raise TypeError(f"`token` must be a haystack Secret or None; got {type(token).__name__}.")
        if truncate_dim is not None:
            check_int(truncate_dim, "truncate_dim")
        for name, value in (("model_kwargs", model_kwargs), ("tokenizer_kwargs", tokenizer_kwargs),
                            ("config_kwargs", config_kwargs), ("encode_kwargs", encode_kwargs)):
            if value is not None and not isinstance(value, dict):
                raise TypeError(f"`{name}` must be a dict or None; got {type(value).__name__}.")
        clash = sorted(set(encode_kwargs or {}) & set(_OWN_ENCODE_ARGUMENTS))
        if clash:
            raise ValueError(f"`encode_kwargs` may not set {clash}: use this component's own parameters "
                             f"({', '.join(_OWN_ENCODE_ARGUMENTS[k] for k in clash)}).")
        self.model = model
        self.query_weight = float(query_weight)
        self.device = device  # None = best available, resolved at warm_up (keeps YAML portable)
        self.batch_size = batch_size
        self.progress_bar = progress_bar
        self.token = token
        self.prefix = prefix
        self.suffix = suffix
        self.expansion_prefix = expansion_prefix
        self.expansion_suffix = expansion_suffix
        self.normalize_embeddings = normalize_embeddings
        self.trust_remote_code = trust_remote_code
        self.revision = revision
        self.local_files_only = local_files_only
        self.truncate_dim = truncate_dim
        self.model_kwargs = model_kwargs
        self.tokenizer_kwargs = tokenizer_kwargs
        self.config_kwargs = config_kwargs
        self.encode_kwargs = encode_kwargs
        self.backend = backend
        self.precision = precision
        self.quantization_ranges = quantization_ranges
        self._encoder = None

    def to_dict(self) -> dict[str, Any]:
        """Serialize to a dictionary (the token as its environment variable names; a plain token is refused)."""
        data = default_to_dict(
            self, model=self.model, query_weight=self.query_weight, device=self.device, batch_size=self.batch_size,
            progress_bar=self.progress_bar, **{name: getattr(self, name) for name in ENCODER_OPTIONS},
            prefix=self.prefix, suffix=self.suffix, expansion_prefix=self.expansion_prefix,
            expansion_suffix=self.expansion_suffix, normalize_embeddings=self.normalize_embeddings,
            encode_kwargs=self.encode_kwargs, precision=self.precision, quantization_ranges=self.quantization_ranges)
        return serialize_encoder_options(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExpandRQueryEmbedder:
        """Deserialize from a dictionary made by `to_dict` (the input is not modified); older dictionaries without
        the encoder options load with their defaults."""
        return default_from_dict(cls, deserialize_encoder_options(data))

    def loader_options(self) -> dict[str, Any]:
        """The keyword arguments this component passes to `expandr_haystack.models.load_encoder`."""
        return {name: getattr(self, name) for name in ENCODER_OPTIONS}

    def warm_up(self) -> None:
        """Load the encoder (shared with other components naming the same model and options); idempotent."""
        if self._encoder is None:
            self._encoder = load_encoder(self.model, resolve_device(self.device), **self.loader_options())

    def query_text(self, query: str) -> str:
        """The text embedded for a query: `prefix` + query + `suffix`."""
        return f"{self.prefix}{query}{self.suffix}"

    def expansion_text(self, expansion: str) -> str:
        """The text embedded for an expansion: `expansion_prefix` + expansion + `expansion_suffix` (None = the
        query's prefix/suffix)."""
        prefix = self.prefix if self.expansion_prefix is None else self.expansion_prefix
        suffix = self.suffix if self.expansion_suffix is None else self.expansion_suffix
        return f"{prefix}{expansion}{suffix}"

    @property
    def encoder(self):
        """The underlying `SentenceTransformer` (loaded on first use)."""
        self.warm_up()
        return self._encoder

    @property
    def dimension(self) -> int:
        """Embedding dimension of the encoder."""
        enc = self.encoder
        getter = getattr(enc, "get_embedding_dimension", None) or enc.get_sentence_embedding_dimension
        return int(getter())

    def encode(self, texts: Sequence[str], progress_bar: bool | None = None, *, prefix: str | None = None,
               suffix: str | None = None) -> np.ndarray:
        """
        L2-normalised float32 embeddings, shape (len(texts), dimension).

        :param prefix: Put before each text; None = the query `prefix`. Pass "" to embed texts exactly as given
            (e.g. texts already built with `query_text` / `expansion_text`).
        :param suffix: Put after each text; None = the query `suffix`.
        """
        if len(texts) == 0:
            return np.zeros((0, self.dimension), dtype=np.float32)
        prefix = self.prefix if prefix is None else prefix
        suffix = self.suffix if suffix is None else suffix
        texts = [f"{prefix}{t}{suffix}" for t in texts] if prefix or suffix else list(texts)
        emb = self.encoder.encode(texts, batch_size=self.batch_size, convert_to_numpy=True,
                                  normalize_embeddings=True,
                                  show_progress_bar=self.progress_bar if progress_bar is None else progress_bar,
                                  **(self.encode_kwargs or {}))
        return np.asarray(emb, dtype=np.float32)

    def embed_fused(self, queries: Sequence[str], expansions: Sequence[Sequence[str]] | None = None,
                    progress_bar: bool | None = None, query_weight: float | None = None) -> np.ndarray:
        """
        Fused vectors for many queries, with one `encode` call for all queries and expansions.

        :param queries: The queries.
        :param expansions: For each query its expansions (may be empty); None = no expansion anywhere.
        :param query_weight: Overrides `query_weight` for this call.
        :returns: float32 array (len(queries), dimension).
        """
        queries = [check_query(q, f"queries[{i}]") for i, q in enumerate(queries)]
        if expansions is None:
            expansions = [[] for _ in queries]
        if len(expansions) != len(queries):
            raise ValueError(f"`expansions` must have one list per query ({len(queries)}); got {len(expansions)}.")
        expansions = [[e for e in check_expansions(exps, f"expansions[{i}]") if e.strip()]
                      for i, exps in enumerate(expansions)]
        flat = [clean_text(e) for exps in expansions for e in exps]  # no control characters / lone surrogates
        texts = [self.query_text(q) for q in queries] + [self.expansion_text(e) for e in flat]
        emb = self.encode(texts, progress_bar=progress_bar, prefix="", suffix="")
        query_weight = self.query_weight if query_weight is None else check_number(query_weight, "query_weight", 0.0, 1.0)
        q_emb, e_emb = emb[: len(queries)], emb[len(queries) :]
        fused = np.empty_like(q_emb)
        pos = 0
        for i, exps in enumerate(expansions):
            k = len(exps)
            fused[i] = fuse(q_emb[i], e_emb[pos : pos + k], query_weight)
            pos += k
        return fused

    @component.output_types(embedding=list[float])
    def run(self, query: str, expansions: list[str] | None = None) -> dict[str, Any]:
        """
        Embed a query with its expansions.

        :param query: The query.
        :param expansions: Its LLM expansions (None or [] = plain query embedding).
        :returns: `embedding`, the fused query vector (unit length with `normalize_embeddings`, quantised to
            `precision`).
        """
        query = check_query(query)
        return {"embedding": self.output_vector(self.embed_fused([query], [expansions or []])[0])}

    def output_vector(self, fused: np.ndarray) -> list[float] | list[int]:
        """A fused vector as `run` returns it: normalised when `normalize_embeddings`, quantised to `precision`."""
        if self.normalize_embeddings:
            fused = unit(fused)
        if self.precision == "float32":
            return np.asarray(fused, dtype=np.float32).tolist()
        from sentence_transformers import quantize_embeddings

        ranges = None if self.quantization_ranges is None else np.asarray(self.quantization_ranges)
        return quantize_embeddings(np.asarray(fused, dtype=np.float32)[None, :], precision=self.precision,
                                   ranges=ranges)[0].tolist()

    # -- async (added for issue #13 part 1; kept apart from the encoder options above) ------------------------
    @component.output_types(embedding=list[float])
    async def run_async(self, query: str, expansions: list[str] | None = None) -> dict[str, Any]:
        """`run` for async pipelines: the (synchronous) encoder runs on a worker thread, off the event loop."""
        import asyncio

        return await asyncio.to_thread(self.run, query, expansions)
