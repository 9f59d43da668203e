"""ExpandRQueryEmbedder: the ExpandR fused query vector."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from haystack import component, default_from_dict, default_to_dict
from haystack.utils import ComponentDevice

from expandr_haystack.checks import check_int, check_number
from expandr_haystack.core.fusion import fuse
from expandr_haystack.core.text import check_expansions, check_query, clean_text
from expandr_haystack.models import load_encoder, resolve_device, resolve_encoder_path


@component
class ExpandRQueryEmbedder:
    """
    Embeds a query together with its LLM expansions into one ExpandR query vector.

    The vector is `fuse(E(query), E(expansions))` with a sentence-transformers encoder (bundled all-MiniLM-L6-v2 by
    default; use the same encoder that embedded the documents). Feed it to any Haystack embedding retriever
    (InMemory, Qdrant, Elasticsearch, pgvector, ...) to serve an ExpandR query over a corpus at scale.

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
    ):
        """
        :param model: None for the bundled all-MiniLM-L6-v2, or a sentence-transformers model id or local directory.
        :param query_weight: Weight w of the query in the fused vector, in [0, 1] (0.5 = paper).
        :param device: Device for the encoder (None = best available).
        :param batch_size: Texts encoded together.
        :param progress_bar: Show a progress bar when encoding many texts.
        """
        check_number(query_weight, "query_weight", 0.0, 1.0)
        check_int(batch_size, "batch_size")
        resolve_encoder_path(model)  # a missing local path fails here, naming `model`
        self.model = model
        self.query_weight = float(query_weight)
        self.device = device  # None = best available, resolved at warm_up (keeps YAML portable)
        self.batch_size = batch_size
        self.progress_bar = progress_bar
        self._encoder = None

    def to_dict(self) -> dict[str, Any]:
        """Serialize to a dictionary."""
        return default_to_dict(self, model=self.model, query_weight=self.query_weight, device=self.device,
                               batch_size=self.batch_size, progress_bar=self.progress_bar)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExpandRQueryEmbedder:
        """Deserialize from a dictionary made by `to_dict` (the input is not modified)."""
        return default_from_dict(cls, data)

    def warm_up(self) -> None:
        """Load the encoder (shared with other components naming the same model); idempotent."""
        if self._encoder is None:
            self._encoder = load_encoder(self.model, resolve_device(self.device))

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

    def encode(self, texts: Sequence[str], progress_bar: bool | None = None) -> np.ndarray:
        """L2-normalised float32 embeddings, shape (len(texts), dimension)."""
        if len(texts) == 0:
            return np.zeros((0, self.dimension), dtype=np.float32)
        emb = self.encoder.encode(list(texts), batch_size=self.batch_size, convert_to_numpy=True,
                                  normalize_embeddings=True,
                                  show_progress_bar=self.progress_bar if progress_bar is None else progress_bar)
        return emb.astype(np.float32, copy=False)

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
        texts = queries + flat
        emb = self.encode(texts, progress_bar=progress_bar)
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
        :returns: `embedding`, the fused query vector.
        """
        query = check_query(query)
        return {"embedding": self.embed_fused([query], [expansions or []])[0].tolist()}
