"""ExpandRDocumentEmbedder: documents embedded as Haystack's SentenceTransformersDocumentEmbedder does, through the
package's encoder loader (so with any `EncoderOptions.backend`, "ctranslate2" included)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal

import numpy as np
from haystack import Document, component, default_from_dict, default_to_dict
from haystack.utils import ComponentDevice

from expandr_haystack.components.embedder import check_output_precision
from expandr_haystack.models import embedding_dimension, load_encoder, resolve_device, resolve_encoder_path
from expandr_haystack.options import EncoderOptions, fold_legacy


@component
class ExpandRDocumentEmbedder:
    """
    Embeds documents for an index, as Haystack's `SentenceTransformersDocumentEmbedder` does, with the package's
    encoder options, so indexing in a pipeline can run on any encoder backend (`EncoderOptions(backend=
    "ctranslate2")`: int8 on CPU, about 3x faster than torch float32 on the bundled MiniLM).

    Each document's text is built exactly as the stock embedder builds it: `prefix` + the non-None values of
    `meta_fields_to_embed` (as `str`) and the content (None = "") joined by `embedding_separator` + `suffix`; with
    `backend="torch"` (the default) its vectors are the stock embedder's for the same model and settings. Each
    document comes back as a new `Document` (`dataclasses.replace`) with its `embedding`; the inputs are not
    modified. How the encoder is loaded and run (`batch_size`, `progress_bar`, `token`, `truncate_dim`,
    `model_kwargs`, `encode_kwargs`, `backend`, ...) is one `EncoderOptions` group, `encoder=`, shared with
    `ExpandRQueryEmbedder`: a query embedder with the same model and options shares the loaded encoder. A dict saved
    from the stock embedder (flat `batch_size`, `token`, `backend`, ...) loads with `from_dict`, the flat keys folded
    into `encoder`.

    Usage:
    ```python
    from haystack import Document, Pipeline
    from haystack.components.writers import DocumentWriter
    from haystack.document_stores.in_memory import InMemoryDocumentStore
    from expandr_haystack import ExpandRDocumentEmbedder

    store = InMemoryDocumentStore(embedding_similarity_function="cosine")
    p = Pipeline()
    p.add_component("embedder", ExpandRDocumentEmbedder(meta_fields_to_embed=["title"], normalize_embeddings=True,
                                                        encoder={"backend": "ctranslate2", "batch_size": 64}))
    p.add_component("writer", DocumentWriter(document_store=store))
    p.connect("embedder.documents", "writer.documents")
    p.run({"embedder": {"documents": [Document(content="Flutter of swept wings.", meta={"title": "Flutter"})]}})
    ```
    Query with `ExpandRQueryEmbedder` / `ExpandRRetriever` over the same model (any backend: int8 CTranslate2 vectors
    keep a cosine above 0.98 to torch's).
    """

    def __init__(
        self,
        model: str | None = None,
        device: ComponentDevice | None = None,
        encoder: EncoderOptions | dict[str, Any] | None = None,
        *,
        prefix: str = "",
        suffix: str = "",
        normalize_embeddings: bool = False,
        meta_fields_to_embed: list[str] | None = None,
        embedding_separator: str = "\n",
        precision: Literal["float32", "int8", "uint8", "binary", "ubinary"] = "float32",
        quantization_ranges: list[list[float]] | None = None,
    ):
        """
        :param model: None for the bundled all-MiniLM-L6-v2, or a sentence-transformers model id or local directory.
        :param device: Device for the encoder (None = best available, resolved at `warm_up`).
        :param encoder: How the encoder is loaded and run: an `EncoderOptions` (batch size, progress bar, token,
            trust_remote_code, revision, local_files_only, truncate_dim, model/tokenizer/config/encode kwargs,
            backend), a dict of its fields (e.g. ``{"backend": "ctranslate2"}``), or None for the defaults. Kept as
            `encoder_options` (the `encoder` property is the loaded SentenceTransformer).
        :param prefix: Put before each document's text, e.g. "passage: " for E5.
        :param suffix: Put after each document's text.
        :param normalize_embeddings: L2-normalise the vectors (Haystack's meaning).
        :param meta_fields_to_embed: Meta fields embedded before the content (e.g. ``["title"]``), in this order;
            a field missing from a document or None there is left out.
        :param embedding_separator: Joins the meta values and the content.
        :param precision: "float32", or quantised "int8", "uint8", "binary", "ubinary" (Haystack's meaning).
        :param quantization_ranges: Calibration ranges for "int8"/"uint8" (shape (2, dimension)), required with them:
            ranges calibrated on each batch would differ from batch to batch.
        """
        resolve_encoder_path(model)  # a missing local path fails here, naming `model`
        if device is not None and not isinstance(device, ComponentDevice):
            raise TypeError(f"`device` must be a haystack ComponentDevice or None; got {type(device).__name__}.")
        encoder_options = EncoderOptions.coerce(encoder, "encoder")
        for name, value in (("prefix", prefix), ("suffix", suffix), ("embedding_separator", embedding_separator)):
            if not isinstance(value, str):
                raise TypeError(f"`{name}` must be a str; got {type(value).__name__}.")
        if not isinstance(normalize_embeddings, bool):
            raise TypeError(f"`normalize_embeddings` must be a bool; got {type(normalize_embeddings).__name__}.")
        if meta_fields_to_embed is not None and (
                isinstance(meta_fields_to_embed, str) or not isinstance(meta_fields_to_embed, (list, tuple))
                or not all(isinstance(k, str) for k in meta_fields_to_embed)):
            raise TypeError(f"`meta_fields_to_embed` must be a list of meta field names (str) or None; got "
                            f"{meta_fields_to_embed!r:.120}.")
        check_output_precision(precision, quantization_ranges)
        self.model = model
        self.device = device  # None = best available, resolved at warm_up (keeps YAML portable)
        self.encoder_options = encoder_options
        self.prefix = prefix
        self.suffix = suffix
        self.normalize_embeddings = normalize_embeddings
        self.meta_fields_to_embed = list(meta_fields_to_embed or [])
        self.embedding_separator = embedding_separator
        self.precision = precision
        self.quantization_ranges = quantization_ranges
        self._encoder = None

    def to_dict(self) -> dict[str, Any]:
        """Serialize to a dictionary; the encoder options as one nested `encoder` group (its token as the
        environment variable names: a plain token is refused)."""
        return default_to_dict(
            self, model=self.model, device=self.device, encoder=self.encoder_options, prefix=self.prefix,
            suffix=self.suffix, normalize_embeddings=self.normalize_embeddings,
            meta_fields_to_embed=self.meta_fields_to_embed, embedding_separator=self.embedding_separator,
            precision=self.precision, quantization_ranges=self.quantization_ranges)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExpandRDocumentEmbedder:
        """Deserialize from a dictionary made by `to_dict` (the input is not modified). Flat encoder keys
        (`batch_size`, `token`, `backend`, ..., as `SentenceTransformersDocumentEmbedder` writes them) are folded
        into `encoder`."""
        params = fold_legacy(dict(data.get("init_parameters", {})), "encoder", EncoderOptions, cls.__name__)
        return default_from_dict(cls, {**data, "init_parameters": params})

    def warm_up(self) -> None:
        """Load the encoder (shared with other components naming the same model and options); idempotent."""
        if self._encoder is None:
            self._encoder = load_encoder(self.model, resolve_device(self.device),
                                         **self.encoder_options.loader_kwargs())

    @property
    def encoder(self):
        """The underlying `SentenceTransformer` (loaded on first use); its options are `encoder_options`."""
        self.warm_up()
        return self._encoder

    @property
    def dimension(self) -> int:
        """Embedding dimension of the encoder."""
        return embedding_dimension(self.encoder)

    def document_text(self, document: Document) -> str:
        """The text embedded for a document, as `SentenceTransformersDocumentEmbedder` builds it: `prefix` + the
        non-None `meta_fields_to_embed` values and the content (None = "") joined by `embedding_separator` +
        `suffix`."""
        meta = document.meta or {}
        values = [str(meta[key]) for key in self.meta_fields_to_embed if meta.get(key) is not None]
        return self.prefix + self.embedding_separator.join([*values, document.content or ""]) + self.suffix

    def texts(self, documents: Any, argument: str = "documents") -> list[str]:
        """The texts of `documents` (checked: a list of `Document`s whose content is a str or None; errors name
        `argument` and the index)."""
        if not isinstance(documents, (list, tuple)):
            raise TypeError(f"`{argument}` must be a list of haystack Documents; got {type(documents).__name__} (to "
                            f"embed a string, use ExpandRQueryEmbedder).")
        out = []
        for i, doc in enumerate(documents):
            if not isinstance(doc, Document):
                raise TypeError(f"`{argument}[{i}]` must be a haystack Document; got {type(doc).__name__}.")
            if doc.content is not None and not isinstance(doc.content, str):
                raise TypeError(f"`{argument}[{i}].content` must be a str or None; got {type(doc.content).__name__}.")
            if doc.meta is not None and not isinstance(doc.meta, dict):
                raise TypeError(f"`{argument}[{i}].meta` must be a dict; got {type(doc.meta).__name__}.")
            out.append(self.document_text(doc))
        return out

    def embed(self, texts: list[str], progress_bar: bool | None = None) -> list[list[float]] | list[list[int]]:
        """Vectors of ready texts (`document_text`), as the stock embedder computes them: `encode` with the batch
        size, normalisation and precision (int8/uint8 quantised with `quantization_ranges` after a float32
        encode), as lists."""
        options = self.encoder_options
        kwargs = {"batch_size": options.batch_size, "normalize_embeddings": self.normalize_embeddings,
                  "show_progress_bar": options.progress_bar if progress_bar is None else progress_bar,
                  **(options.encode_kwargs or {})}
        if self.precision in ("int8", "uint8"):
            from sentence_transformers import quantize_embeddings

            vectors = self.encoder.encode(texts, precision="float32", **kwargs)
            return quantize_embeddings(vectors, precision=self.precision,
                                       ranges=np.asarray(self.quantization_ranges)).tolist()
        return self.encoder.encode(texts, precision=self.precision, **kwargs).tolist()

    @component.output_types(documents=list[Document])
    def run(self, documents: list[Document]) -> dict[str, list[Document]]:
        """
        Embed documents.

        :param documents: The documents (content None is embedded as "", as Haystack does).
        :returns: `documents`: new `Document`s, each with its `embedding` (the inputs are unchanged).
        """
        texts = self.texts(documents)
        if not texts:
            return {"documents": []}
        vectors = self.embed(texts)
        return {"documents": [replace(doc, embedding=vec) for doc, vec in zip(documents, vectors, strict=True)]}

    @component.output_types(documents=list[Document])
    async def run_async(self, documents: list[Document]) -> dict[str, list[Document]]:
        """`run` for async pipelines: the (synchronous) encoder runs on a worker thread, off the event loop."""
        import asyncio

        return await asyncio.to_thread(self.run, documents)


__all__ = ["ExpandRDocumentEmbedder"]
