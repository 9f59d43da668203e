"""Indexing: embed documents (title + text) and write them to a store; with Haystack's stock
SentenceTransformersDocumentEmbedder by default, or with `ExpandRDocumentEmbedder` for an `encoder` backend such as
CTranslate2."""

from __future__ import annotations

from typing import Any

from haystack import Document, Pipeline
from haystack.components.writers import DocumentWriter
from haystack.document_stores.in_memory import InMemoryDocumentStore
from haystack.document_stores.types import DocumentStore, DuplicatePolicy
from haystack.utils import ComponentDevice
from haystack_integrations.components.embedders.sentence_transformers import SentenceTransformersDocumentEmbedder

from expandr_haystack.models import resolve_encoder_path
from expandr_haystack.options import EncoderOptions


def indexing_pipeline(document_store: DocumentStore, model: str | None = None, device: ComponentDevice | None = None,
                      batch_size: int = 64, progress_bar: bool = True,
                      encoder: EncoderOptions | dict[str, Any] | None = None) -> Pipeline:
    """
    The indexing pipeline: "embedder" (title + text, the retriever's encoder, unit vectors) -> "writer"
    (`DocumentWriter`, overwriting). Run it with `{"embedder": {"documents": docs}}`.

    :param encoder: None (the default): the embedder is Haystack's stock `SentenceTransformersDocumentEmbedder`.
        Given (an `EncoderOptions` or a dict of its fields, e.g. ``{"backend": "ctranslate2"}``): it is
        `ExpandRDocumentEmbedder` with those options, the same texts and normalisation; `batch_size` and
        `progress_bar` override the options' own.
    """
    p = Pipeline()
    if encoder is None:
        embedder = SentenceTransformersDocumentEmbedder(
            model=resolve_encoder_path(model), device=device, batch_size=batch_size, progress_bar=progress_bar,
            meta_fields_to_embed=["title"], normalize_embeddings=True, local_files_only=True)
    else:
        from expandr_haystack.components.document_embedder import ExpandRDocumentEmbedder

        options = EncoderOptions.coerce(encoder, "encoder").replace(batch_size=batch_size, progress_bar=progress_bar)
        embedder = ExpandRDocumentEmbedder(model=model, device=device, encoder=options,
                                           meta_fields_to_embed=["title"], normalize_embeddings=True)
    p.add_component("embedder", embedder)
    p.add_component("writer", DocumentWriter(document_store=document_store, policy=DuplicatePolicy.OVERWRITE))
    p.connect("embedder.documents", "writer.documents")
    return p


def build_document_store(documents: list[Document], model: str | None = None, device: ComponentDevice | None = None,
                         batch_size: int = 64, progress_bar: bool = True,
                         encoder: EncoderOptions | dict[str, Any] | None = None) -> InMemoryDocumentStore:
    """An `InMemoryDocumentStore` holding `documents` embedded with `model` (cosine similarity); `encoder` as in
    `indexing_pipeline` (None = the stock embedder)."""
    store = InMemoryDocumentStore(embedding_similarity_function="cosine")
    indexing_pipeline(store, model, device, batch_size, progress_bar, encoder).run(
        {"embedder": {"documents": documents}})
    return store


#: Hub ids whose weights ship with the package (same files), so YAML pipelines can name the usual id offline.
BUNDLED_ENCODER_IDS = ("sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2")


def use_bundled_encoder(pipeline: Pipeline) -> Pipeline:
    """
    Point every stock SentenceTransformers embedder that names all-MiniLM-L6-v2 at the bundled copy of those weights.

    YAML files keep the portable hub id (`sentence-transformers/all-MiniLM-L6-v2`); call this after
    `Pipeline.loads` on a machine without Hugging Face hub access. Call it before `warm_up`.
    """
    for _, comp in pipeline.walk():
        if getattr(comp, "model", None) in BUNDLED_ENCODER_IDS and hasattr(comp, "local_files_only"):
            comp.model = resolve_encoder_path(None)
            comp.local_files_only = True
    return pipeline

__all__ = ["BUNDLED_ENCODER_IDS", "build_document_store", "indexing_pipeline", "use_bundled_encoder"]
