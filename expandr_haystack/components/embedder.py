"""ExpandRQueryEmbedder: the ExpandR fused query vector."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from haystack import component, default_from_dict, default_to_dict
from haystack.utils import ComponentDevice

from expandr_haystack.checks import check_choice, check_number
from expandr_haystack.core.fusion import fuse, unit
from expandr_haystack.core.text import check_expansions, check_query, clean_text
from expandr_haystack.models import embedding_dimension, load_encoder, resolve_device, resolve_encoder_path
from expandr_haystack.options import EncoderOptions, fold_legacy

#: Output precisions (as Haystack's SentenceTransformersTextEmbedder).
PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")


def check_output_precision(precision: str, quantization_ranges: Any) -> None:
    """An embedder's output `precision` (`PRECISIONS`); "int8"/"uint8" need `quantization_ranges` (as Haystack's
    embedders take them): a ValueError naming what is missing otherwise."""
    check_choice(precision, "precision", PRECISIONS)
    if precision in ("int8", "uint8") and quantization_ranges is None:
        raise ValueError(f"Precision {precision!r} requires `quantization_ranges` computed from a representative "
                         f"sample of embeddings.")


def checked_expansions(expansions: Any, argument: str = "expansions") -> list[str]:
    """
    One query's expansions as the fusion takes them: a list of strings (else an error naming `argument`), control
    characters dropped and invalid unicode replaced (`clean_text`), blank ones left out. The one edge check of
    expansions on the retrieval side (`ExpandRQueryEmbedder.run`/`embed_fused`; the retriever may use it too).
    """
    return [text for text in (clean_text(e) for e in check_expansions(expansions, argument)) if text.strip()]


@component
class ExpandRQueryEmbedder:
    """
    Embeds a query together with its LLM expansions into one ExpandR query vector.

    The vector is `fuse(E(query), E(expansions))` with a sentence-transformers encoder (bundled all-MiniLM-L6-v2 by
    default; use the same encoder that embedded the documents). Feed it to any Haystack embedding retriever
    (InMemory, Qdrant, Elasticsearch, pgvector, ...) to serve an ExpandR query over a corpus at scale.

    How the encoder is loaded and run (`batch_size`, `token`, `trust_remote_code`, `model_kwargs`, `truncate_dim`,
    `backend`, `encode_kwargs`, ...) is one `EncoderOptions` group, `encoder=`, shared with `RewardScorer` and
    `ExpandRRetriever`; the text-side settings (`prefix`, `suffix`, `normalize_embeddings`, `precision`) are this
    component's, with the meanings of Haystack's `SentenceTransformersTextEmbedder`. Without expansions and with
    `normalize_embeddings=True` its vector is the stock embedder's for the same model and prefix. For an E5-style
    encoder, index with `SentenceTransformersDocumentEmbedder(model=m, prefix="passage: ")` and query with
    `ExpandRQueryEmbedder(model=m, prefix="query: ")`; expansions get the query's prefix unless `expansion_prefix`
    says otherwise.

    Inputs are checked once, at the edge (`run`, `run_async`, `embed_fused`); `fused_vectors` and `encode` trust
    theirs (the path for components that have checked them already, e.g. `ExpandRRetriever`).

    Usage:
    ```python
    from haystack import Pipeline
    from haystack.components.retrievers.in_memory import InMemoryEmbeddingRetriever
    from expandr_haystack import LLMQueryExpander, ExpandRQueryEmbedder
    from expandr_haystack.options import EncoderOptions

    p = Pipeline()
    p.add_component("expander", LLMQueryExpander())
    p.add_component("embedder", ExpandRQueryEmbedder(encoder=EncoderOptions(batch_size=64)))
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
        encoder: EncoderOptions | dict[str, Any] | None = None,
        *,
        prefix: str = "",
        suffix: str = "",
        expansion_prefix: str | None = None,
        expansion_suffix: str | None = None,
        normalize_embeddings: bool = False,
        precision: Literal["float32", "int8", "uint8", "binary", "ubinary"] = "float32",
        quantization_ranges: list[list[float]] | None = None,
    ):
        """
        :param model: None for the bundled all-MiniLM-L6-v2, or a sentence-transformers model id or local directory.
        :param query_weight: Weight w of the query in the fused vector, in [0, 1] (0.5 = paper).
        :param device: Device for the encoder (None = best available, resolved at `warm_up`).
        :param encoder: How the encoder is loaded and run: an `EncoderOptions` (batch size, progress bar, token,
            trust_remote_code, revision, local_files_only, truncate_dim, model/tokenizer/config/encode kwargs,
            backend), a dict of its fields, or None for the defaults. Kept as `encoder_options` (the `encoder`
            property is the loaded SentenceTransformer).
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
        :param precision: Precision of the output vector (Haystack's meaning): "float32", or a quantised "int8",
            "uint8", "binary", "ubinary" (as the documents were stored). The query and expansions are fused in
            float32 and the fused vector is quantised; `encode`/`embed_fused` always return float32.
        :param quantization_ranges: Calibration ranges for "int8"/"uint8" (shape (2, dimension)), as Haystack.
        """
        check_number(query_weight, "query_weight", 0.0, 1.0)
        resolve_encoder_path(model)  # a missing local path fails here, naming `model`
        if device is not None and not isinstance(device, ComponentDevice):
            raise TypeError(f"`device` must be a haystack ComponentDevice or None; got {type(device).__name__}.")
        encoder_options = EncoderOptions.coerce(encoder, "encoder")
        check_output_precision(precision, quantization_ranges)
        for name, value in (("prefix", prefix), ("suffix", suffix)):
            if not isinstance(value, str):
                raise TypeError(f"`{name}` must be a str; got {type(value).__name__}.")
        for name, value in (("expansion_prefix", expansion_prefix), ("expansion_suffix", expansion_suffix)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"`{name}` must be a str or None (= the query's); got {type(value).__name__}.")
        self.model = model
        self.query_weight = float(query_weight)
        self.device = device  # None = best available, resolved at warm_up (keeps YAML portable)
        self.encoder_options = encoder_options
        self.prefix = prefix
        self.suffix = suffix
        self.expansion_prefix = expansion_prefix
        self.expansion_suffix = expansion_suffix
        self.normalize_embeddings = normalize_embeddings
        self.precision = precision
        self.quantization_ranges = quantization_ranges
        self._encoder = None

    def to_dict(self) -> dict[str, Any]:
        """Serialize to a dictionary; the encoder options as one nested `encoder` group (its token as the
        environment variable names: a plain token is refused)."""
        return default_to_dict(
            self, model=self.model, query_weight=self.query_weight, device=self.device, encoder=self.encoder_options,
            prefix=self.prefix, suffix=self.suffix, expansion_prefix=self.expansion_prefix,
            expansion_suffix=self.expansion_suffix, normalize_embeddings=self.normalize_embeddings,
            precision=self.precision, quantization_ranges=self.quantization_ranges)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExpandRQueryEmbedder:
        """Deserialize from a dictionary made by `to_dict` (the input is not modified). Dictionaries saved by earlier
        versions, with the encoder options as flat keys (`batch_size`, `token`, `backend`, ...), load with the same
        settings: the flat keys are folded into `encoder`."""
        params = fold_legacy(dict(data.get("init_parameters", {})), "encoder", EncoderOptions, cls.__name__)
        return default_from_dict(cls, {**data, "init_parameters": params})

    def warm_up(self) -> None:
        """Load the encoder (shared with other components naming the same model and options); idempotent."""
        if self._encoder is None:
            self._encoder = load_encoder(self.model, resolve_device(self.device),
                                         **self.encoder_options.loader_kwargs())

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
        """The underlying `SentenceTransformer` (loaded on first use); its options are `encoder_options`."""
        self.warm_up()
        return self._encoder

    @property
    def dimension(self) -> int:
        """Embedding dimension of the encoder."""
        return embedding_dimension(self.encoder)

    def encode(self, texts: Sequence[str], progress_bar: bool | None = None, *, prefix: str | None = None,
               suffix: str | None = None) -> np.ndarray:
        """
        L2-normalised float32 embeddings, shape (len(texts), dimension). Inputs trusted: checked by the caller (a
        sequence of strings).

        :param progress_bar: None = `encoder_options.progress_bar`.
        :param prefix: Put before each text; None = the query `prefix`. Pass "" to embed texts exactly as given
            (e.g. texts already built with `query_text` / `expansion_text`).
        :param suffix: Put after each text; None = the query `suffix`.
        """
        if len(texts) == 0:
            return np.zeros((0, self.dimension), dtype=np.float32)
        prefix = self.prefix if prefix is None else prefix
        suffix = self.suffix if suffix is None else suffix
        texts = [f"{prefix}{t}{suffix}" for t in texts] if prefix or suffix else list(texts)
        options = self.encoder_options
        emb = self.encoder.encode(texts, batch_size=options.batch_size, convert_to_numpy=True,
                                  normalize_embeddings=True,
                                  show_progress_bar=options.progress_bar if progress_bar is None else progress_bar,
                                  **(options.encode_kwargs or {}))
        return np.asarray(emb, dtype=np.float32)

    def embed_fused(self, queries: Sequence[str], expansions: Sequence[Sequence[str]] | None = None,
                    progress_bar: bool | None = None, query_weight: float | None = None) -> np.ndarray:
        """
        Fused vectors for many queries, with one `encode` call for all queries and expansions. Checks its inputs
        (errors name `queries[i]` / `expansions[i]`), then `fused_vectors`.

        :param queries: The queries.
        :param expansions: For each query its expansions (may be empty); None = no expansion anywhere.
        :param query_weight: Overrides `query_weight` for this call.
        :returns: float32 array (len(queries), dimension).
        """
        if isinstance(queries, str) or not isinstance(queries, Sequence):
            raise TypeError(f"`queries` must be a list of strings; got {type(queries).__name__}.")
        queries = [check_query(q, f"queries[{i}]") for i, q in enumerate(queries)]
        if expansions is None:
            expansions = [[] for _ in queries]
        else:
            if isinstance(expansions, str) or not isinstance(expansions, Sequence):
                raise TypeError(f"`expansions` must be a list with one list of strings per query; got "
                                f"{type(expansions).__name__}.")
            if len(expansions) != len(queries):
                raise ValueError(f"`expansions` must have one list per query ({len(queries)}); got {len(expansions)}.")
            expansions = [checked_expansions(exps, f"expansions[{i}]") for i, exps in enumerate(expansions)]
        query_weight = self.query_weight if query_weight is None else check_number(query_weight, "query_weight",
                                                                                   0.0, 1.0)
        return self.fused_vectors(queries, expansions, query_weight, progress_bar=progress_bar)

    def fused_vectors(self, queries: Sequence[str], expansions: Sequence[Sequence[str]], query_weight: float,
                      progress_bar: bool | None = None) -> np.ndarray:
        """
        Fused vectors for many queries (one `encode` call). Inputs trusted: checked by the caller — `queries` as
        `check_query` returns them, `expansions` one list per query as `checked_expansions` returns it (strings,
        cleaned, none blank; may be empty), `query_weight` in [0, 1]. The path `run`, `embed_fused` and
        `ExpandRRetriever` share.

        :returns: float32 array (len(queries), dimension), not normalised nor quantised (see `output_vector`).
        """
        texts = [self.query_text(q) for q in queries] + [self.expansion_text(e) for exps in expansions for e in exps]
        emb = self.encode(texts, progress_bar=progress_bar, prefix="", suffix="")
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
        :param expansions: Its LLM expansions (None or [] = plain query embedding; blank ones are ignored).
        :returns: `embedding`, the fused query vector (unit length with `normalize_embeddings`, quantised to
            `precision`).
        """
        query = check_query(query)
        expansions = [] if expansions is None else checked_expansions(expansions)
        return {"embedding": self.output_vector(self.fused_vectors([query], [expansions], self.query_weight)[0])}

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

    @component.output_types(embedding=list[float])
    async def run_async(self, query: str, expansions: list[str] | None = None) -> dict[str, Any]:
        """`run` for async pipelines: the (synchronous) encoder runs on a worker thread, off the event loop."""
        import asyncio

        return await asyncio.to_thread(self.run, query, expansions)


__all__ = ["PRECISIONS", "ExpandRQueryEmbedder", "checked_expansions"]
