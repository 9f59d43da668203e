"""Indexing: embed documents with Haystack's stock SentenceTransformersDocumentEmbedder and write them to a store."""

from __future__ import annotations

from haystack import Document, Pipeline
from haystack.components.writers import DocumentWriter
from haystack.document_stores.in_memory import InMemoryDocumentStore
from haystack.document_stores.types import DocumentStore, DuplicatePolicy
from haystack.utils import ComponentDevice
from haystack_integrations.components.embedders.sentence_transformers import SentenceTransformersDocumentEmbedder

from expandr_haystack.models import resolve_encoder_path


def indexing_pipeline(document_store: DocumentStore, model: str | None = None, device: ComponentDevice | None = None,
                      batch_size: int = 64, progress_bar: bool = True) -> Pipeline:
    """
    The indexing pipeline: `SentenceTransformersDocumentEmbedder` (title + text, the retriever's encoder) ->
    `DocumentWriter`. Run it with `{"embedder": {"documents": docs}}`.
    """
    p = Pipeline()
    p.add_component("embedder", SentenceTransformersDocumentEmbedder(
        model=resolve_encoder_path(model), device=device, batch_size=batch_size, progress_bar=progress_bar,
        meta_fields_to_embed=["title"], normalize_embeddings=True, local_files_only=True))
    p.add_component("writer", DocumentWriter(document_store=document_store, policy=DuplicatePolicy.OVERWRITE))
    p.connect("embedder.documents", "writer.documents")
    return p


def build_document_store(documents: list[Document], model: str | None = None, device: ComponentDevice | None = None,
                         batch_size: int = 64, progress_bar: bool = True) -> InMemoryDocumentStore:
    """An `InMemoryDocumentStore` holding `documents` embedded with `model` (cosine similarity)."""
    store = InMemoryDocumentStore(embedding_similarity_function="cosine")
    indexing_pipeline(store, model, device, batch_size, progress_bar).run({"embedder": {"documents": documents}})
    return store
