"""
ExpandRRetriever over a real Chroma server (the `chroma` fixture: `chroma run`), through Haystack's own
ChromaEmbeddingRetriever, against the FAISS path on the same documents.

The first `N_DOCS` Cranfield test documents are embedded once by the stock SentenceTransformersDocumentEmbedder and
written into a Chroma collection (cosine) and an InMemoryDocumentStore (the FAISS path's reference). Chroma searches
an HNSW index (approximate), so the check is recall@10 of the FAISS top 10; its `score` is the cosine distance
(lower is better), which reciprocal-rank fusion does not read.
"""

from __future__ import annotations

import numpy as np
import pytest
from haystack import Document
from haystack.components.writers import DocumentWriter
from haystack.document_stores.in_memory import InMemoryDocumentStore
from haystack_integrations.components.retrievers.chroma import ChromaEmbeddingRetriever
from haystack_integrations.document_stores import chroma as chroma_stores

from expandr_haystack import ExpandRQueryEmbedder, ExpandRRetriever
from expandr_haystack.evaluation.data import bundled_path, load_collection
from expandr_haystack.evaluation.indexing import indexing_pipeline

pytestmark = pytest.mark.integration

N_DOCS = 200
N_QUERIES = 15


@pytest.fixture(scope="module")
def stores(chroma):
    """The first N_DOCS Cranfield test documents (with `part` a/b in their meta), embedded once and written into a
    Chroma collection and an InMemoryDocumentStore; N_QUERIES queries with stand-in expansions."""
    host, port = chroma
    collection = load_collection(bundled_path("cranfield"), "test")
    docs = [Document(id=d.id, content=d.content, meta={**d.meta, "part": "ab"[int(d.id) % 2]})
            for d in collection.documents()[:N_DOCS]]
    in_chroma = chroma_stores.ChromaDocumentStore(collection_name="cranfield", host=host, port=port,
                                                  distance_function="cosine")
    memory = InMemoryDocumentStore(embedding_similarity_function="cosine")
    indexing = indexing_pipeline(memory, progress_bar=False)
    indexing.add_component("to_chroma", DocumentWriter(document_store=in_chroma))
    indexing.connect("embedder.documents", "to_chroma.documents")
    indexing.run({"embedder": {"documents": docs}})
    assert in_chroma.count_documents() == memory.count_documents() == N_DOCS
    words = [d.content.split() for d in docs]
    queries = list(collection.queries.values())[:N_QUERIES]
    expansions = [[" ".join(words[(7 * i + 3) % N_DOCS][:40])] for i in range(N_QUERIES)]
    return in_chroma, memory, queries, expansions


@pytest.mark.parametrize("fusion", ["mean", "rrf"])
def test_chroma_retriever_recalls_the_faiss_top_10(stores, fusion):
    """Recall@10 of the FAISS path's top 10 >= 0.95 (mean over queries), with expansions and without, and with a
    filter (`meta.part`); mean fusion: where the ids agree, Chroma's cosine distance is 1 - the FAISS score over the
    fused vector's norm."""
    in_chroma, memory, queries, expansions = stores
    faiss_path = ExpandRRetriever(document_store=memory, top_k=10, fusion=fusion)
    via_chroma = ExpandRRetriever(retriever=ChromaEmbeddingRetriever(document_store=in_chroma), top_k=10,
                                  fusion=fusion)
    part_a = {"field": "meta.part", "operator": "==", "value": "a"}
    for exp, filters in ((expansions, None), (None, None), (expansions, part_a)):
        expected = faiss_path.retrieve(queries, exp, filters=filters)
        got = via_chroma.retrieve(queries, exp, filters=filters)
        assert all(len(hits) == 10 for hits in got)
        if filters:
            assert all(d.meta["part"] == "a" for hits in got for d in hits)
        recall = np.mean([len({d.id for d in g} & {d.id for d in w}) / 10 for g, w in zip(got, expected)])
        assert recall >= 0.95, (recall, fusion, filters)
        if fusion == "mean" and exp is not None and filters is None:
            norms = np.linalg.norm(ExpandRQueryEmbedder().embed_fused(queries, exp), axis=1)
            for g, w, norm in zip(got, expected, norms):
                faiss_scores = {d.id: d.score for d in w}
                pairs = [(d.score, 1 - faiss_scores[d.id] / norm) for d in g if d.id in faiss_scores]
                np.testing.assert_allclose(*zip(*pairs), atol=1e-5)
