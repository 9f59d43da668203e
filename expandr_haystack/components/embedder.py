"""ExpandRQueryEmbedder: the ExpandR fused query vector."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from haystack import component, default_from_dict, default_to_dict
from haystack.utils import ComponentDevice

from expandr_haystack.components.expander import clean_text
from expandr_haystack.models import load_encoder, resolve_device, resolve_encoder_path


def fuse(query_embedding, expansion_embeddings, query_weight: float = 0.5):
    """
    The ExpandR fused query vector.

        q~ = w * q^ + (1 - w) * mean_i e^_i        (x^ = x / ||x||)

    With one expansion and w = 0.5 this is the paper's mean of the normalised query and expansion embeddings;
    with several expansions the query keeps weight w however many there are. With no expansion q~ = q^.
    Works on numpy arrays and torch tensors alike (training uses the same function with gradients).

    :param query_embedding: shape (d,) or (batch, d).
    :param expansion_embeddings: shape (n, d) or (batch, n, d); n may be 0.
    :param query_weight: w in [0, 1].
    """
    q = _unit(query_embedding)
    if expansion_embeddings is None or expansion_embeddings.shape[-2] == 0:
        return q
    e = _unit(expansion_embeddings).mean(-2)
    return query_weight * q + (1.0 - query_weight) * e


def _unit(x):
    if isinstance(x, np.ndarray):
        return x / np.clip(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12, None)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


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
        if not isinstance(query_weight, (int, float)) or not 0.0 <= query_weight <= 1.0:
            raise ValueError(f"`query_weight` must be a number in [0, 1]; got {query_weight!r}.")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be an integer >= 1; got {batch_size!r}.")
        resolve_encoder_path(model)  # a missing local path fails here, naming `model`
        self.model = model
        self.query_weight = float(query_weight)
        self.device = device  # None = best available, resolved at warm_up (keeps YAML portable)
        self.batch_size = batch_size
        self.progress_bar = progress_bar
        self._encoder = None

    def to_dict(self) -> dict[str, Any]:
        """Serialize to a dictionary."""
        return default_to_dict(self, model=self.model, query_weight=self.query_weight,
                               device=self.device.to_dict() if self.device else None, batch_size=self.batch_size,
                               progress_bar=self.progress_bar)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExpandRQueryEmbedder:
        """Deserialize from a dictionary made by `to_dict`."""
        params = data.get("init_parameters", {})
        if params.get("device") is not None:
            params["device"] = ComponentDevice.from_dict(params["device"])
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
                    progress_bar: bool | None = None) -> np.ndarray:
        """
        Fused vectors for many queries, with one `encode` call for all queries and expansions.

        :param queries: The queries.
        :param expansions: For each query its expansions (may be empty); None = no expansion anywhere.
        :returns: float32 array (len(queries), dimension).
        """
        for i, q in enumerate(queries):
            if not isinstance(q, str) or not q.strip():
                raise ValueError(f"`queries[{i}]` must be a non-empty string; got {q!r:.80}.")
        if expansions is None:
            expansions = [[] for _ in queries]
        if len(expansions) != len(queries):
            raise ValueError(f"`expansions` must have one list per query ({len(queries)}); got {len(expansions)}.")
        flat = []
        for i, exps in enumerate(expansions):
            if isinstance(exps, str) or not isinstance(exps, Sequence):
                raise TypeError(f"`expansions[{i}]` must be a list of strings; got {type(exps).__name__}.")
            for j, e in enumerate(exps):
                if not isinstance(e, str):
                    raise TypeError(f"`expansions[{i}][{j}]` must be a string; got {type(e).__name__}.")
            flat.extend(e for e in exps if e.strip())
        texts = [clean_text(t) for t in list(queries) + flat]  # no control characters / lone surrogates
        emb = self.encode(texts, progress_bar=progress_bar)
        q_emb, e_emb = emb[: len(queries)], emb[len(queries) :]
        fused = np.empty_like(q_emb)
        pos = 0
        for i, exps in enumerate(expansions):
            k = sum(1 for e in exps if e.strip())
            fused[i] = fuse(q_emb[i], e_emb[pos : pos + k], self.query_weight)
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
        if not isinstance(query, str) or not query.strip():
            raise ValueError(f"`query` must be a non-empty string; got {query!r:.80}.")
        return {"embedding": self.embed_fused([query], [expansions or []])[0].tolist()}
