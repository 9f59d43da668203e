"""
ExpandRRetriever over any document store: a wrapped Haystack embedding retriever (Qdrant in local mode, InMemory)
against the FAISS path on the same documents, indexed once by the stock SentenceTransformersDocumentEmbedder +
DocumentWriter; Haystack's retriever conventions (filters + filter_policy, top_k, scale_score, return_embedding,
run_async); serialization of the wrapped retriever; examples/qdrant_search.yaml.
"""

import asyncio

import numpy as np
import pytest
from haystack import Document, Pipeline
from haystack.components.retrievers.in_memory import InMemoryEmbeddingRetriever
from haystack.components.writers import DocumentWriter
from haystack.core.errors import DeserializationError
from haystack.document_stores.in_memory import InMemoryDocumentStore
from haystack.document_stores.types import FilterPolicy
from haystack_integrations.components.embedders.sentence_transformers import SentenceTransformersDocumentEmbedder

from expandr_haystack import ExpandRQueryEmbedder, ExpandRRetriever
from expandr_haystack.models import resolve_encoder_path
from expandr_haystack.options import FusionSettings
from tests.conftest import QUERIES

qdrant = pytest.importorskip("haystack_integrations.document_stores.qdrant")
from haystack_integrations.components.retrievers.qdrant import QdrantEmbeddingRetriever

pytestmark = pytest.mark.integration

EXPANSIONS = [["Aeroelastic models of heated aircraft must obey similarity of thermal and elastic parameters."],
              ["Heat conduction in layered slabs has closed-form solutions for constant properties.",
               "Composite walls: transient temperature distributions by Laplace transforms."]]
N_DOCS = 30


def qdrant_store(index="expandr"):
    return qdrant.QdrantDocumentStore(":memory:", index=index, embedding_dim=384, similarity="cosine",
                                      recreate_index=True, progress_bar=False)


@pytest.fixture(scope="module")
def stores(cranfield_small):
    """The same 30 Cranfield documents (with `part` a/b and `n` metadata) written, from one run of the stock
    embedder, into Qdrant (local mode) and into an InMemoryDocumentStore."""
    docs = [Document(id=d.id, content=d.content, meta={**d.meta, "part": "ab"[i % 2], "n": i})
            for i, d in enumerate(cranfield_small[1][:N_DOCS])]
    in_qdrant, in_memory = qdrant_store(), InMemoryDocumentStore(embedding_similarity_function="cosine")
    p = Pipeline()
    p.add_component("embedder", SentenceTransformersDocumentEmbedder(
        model=resolve_encoder_path(None), meta_fields_to_embed=["title"], normalize_embeddings=True,
        local_files_only=True, progress_bar=False))
    p.add_component("to_qdrant", DocumentWriter(document_store=in_qdrant))
    p.add_component("to_memory", DocumentWriter(document_store=in_memory))
    p.connect("embedder.documents", "to_qdrant.documents")
    p.connect("embedder.documents", "to_memory.documents")
    p.run({"embedder": {"documents": docs}})
    assert in_qdrant.count_documents() == in_memory.count_documents() == N_DOCS
    return in_qdrant, in_memory


def three_ways(stores, **kwargs):
    """FAISS over the InMemory store, and the same settings wrapping Qdrant's and InMemory's embedding retrievers."""
    in_qdrant, in_memory = stores
    return (ExpandRRetriever(document_store=in_memory, **kwargs),
            ExpandRRetriever(retriever=QdrantEmbeddingRetriever(document_store=in_qdrant), **kwargs),
            ExpandRRetriever(retriever=InMemoryEmbeddingRetriever(document_store=in_memory), **kwargs))


@pytest.mark.parametrize("fusion", ["mean", "rrf"])
def test_qdrant_and_in_memory_retrievers_equal_the_faiss_path(stores, fusion):
    faiss_path, via_qdrant, via_memory = three_ways(stores, top_k=8, fusion=fusion)
    for expansions in (EXPANSIONS, None):
        expected = faiss_path.retrieve(QUERIES, expansions)
        fused = ExpandRQueryEmbedder().embed_fused(QUERIES, expansions)
        for wrapped in (via_qdrant, via_memory):
            got = wrapped.retrieve(QUERIES, expansions)
            for i, (want, have) in enumerate(zip(expected, got)):
                assert [d.id for d in have] == [d.id for d in want] and len(want) == 8
                scores, wanted = [d.score for d in have], np.asarray([d.score for d in want])
                if fusion == "mean":  # the stores' cosine: the FAISS inner product over the fused vector's norm
                    wanted = wanted / np.linalg.norm(fused[i])
                np.testing.assert_allclose(scores, wanted, rtol=1e-4, atol=1e-6)
    one = via_qdrant.run(query=QUERIES[1], expansions=EXPANSIONS[1])["documents"]
    assert [d.id for d in one] == [d.id for d in faiss_path.run(QUERIES[1], EXPANSIONS[1])["documents"]]


def test_pseudo_relevance_feedback_through_a_wrapped_retriever(stores):
    faiss_path, via_qdrant, via_memory = three_ways(stores, top_k=8, fusion=FusionSettings(feedback_k=3))
    expected = [[d.id for d in docs] for docs in faiss_path.retrieve(QUERIES, EXPANSIONS)]
    assert expected != [[d.id for d in docs] for docs in faiss_path.retrieve(QUERIES, EXPANSIONS, feedback_k=0)]
    for wrapped in (via_qdrant, via_memory):
        assert [[d.id for d in docs] for docs in wrapped.retrieve(QUERIES, EXPANSIONS)] == expected


@pytest.mark.parametrize("fusion", ["mean", "rrf"])
def test_filters_and_filter_policy(stores, fusion):
    part_a = {"field": "meta.part", "operator": "==", "value": "a"}
    late = {"field": "meta.n", "operator": ">=", "value": 10}
    merged = three_ways(stores, top_k=30, fusion=fusion, filters=part_a, filter_policy="merge")
    replaced = three_ways(stores, top_k=30, fusion=fusion, filters=part_a)  # FilterPolicy.REPLACE
    for retrievers, check in ((merged, lambda m: m["part"] == "a" and m["n"] >= 10), (replaced, lambda m: m["n"] >= 10)):
        results = [r.run(query=QUERIES[0], expansions=EXPANSIONS[0], filters=late)["documents"] for r in retrievers]
        assert all(check(d.meta) for d in results[0]) and results[0]
        assert {d.meta["part"] for d in results[0]} == ({"a"} if retrievers is merged else {"a", "b"})
        assert len(results[0]) == (10 if retrievers is merged else 20)
        for other in results[1:]:
            assert [d.id for d in other] == [d.id for d in results[0]]
    init_only = merged[0].run(query=QUERIES[0])["documents"]  # no run filters: the init ones
    assert {d.meta["part"] for d in init_only} == {"a"} and merged[0].filter_policy is FilterPolicy.MERGE


def test_embeddings_and_scaled_scores(stores):
    _, in_memory = stores
    fused = ExpandRQueryEmbedder().embed_fused([QUERIES[0]], [EXPANSIONS[0]])
    for r in three_ways(stores, top_k=5):
        docs = r.search(fused)[0]
        assert len(docs) == 5 and all(d.embedding is None for d in docs)  # as Haystack's retrievers by default
        kept = r.search(fused, return_embedding=True)[0]
        assert [d.id for d in kept] == [d.id for d in docs] and all(len(d.embedding) == 384 for d in kept)
    assert all(d.embedding is not None and d.score is None for d in in_memory.storage.values())  # store untouched

    faiss_path = ExpandRRetriever(document_store=in_memory, top_k=5, return_embedding=True)
    raw = faiss_path.run(query=QUERIES[0], expansions=EXPANSIONS[0])["documents"]
    scaled = faiss_path.run(query=QUERIES[0], expansions=EXPANSIONS[0], scale_score=True)["documents"]
    assert [d.id for d in scaled] == [d.id for d in raw] and all(d.embedding is not None for d in raw)
    np.testing.assert_allclose([d.score for d in scaled], [(d.score + 1) / 2 for d in raw], rtol=1e-6)
    for r in three_ways(stores, top_k=5, fusion=FusionSettings(method="rrf", rrf_k=60)):
        raw = r.run(query=QUERIES[1], expansions=EXPANSIONS[1])["documents"]
        scaled = r.run(query=QUERIES[1], expansions=EXPANSIONS[1], scale_score=True)["documents"]
        assert all(d.embedding is None for d in raw)
        np.testing.assert_allclose([d.score for d in scaled], [d.score * 61 / 3 for d in raw], rtol=1e-9)
        assert 0 < scaled[-1].score <= scaled[0].score <= 1


@pytest.mark.parametrize("fusion", ["mean", "rrf", FusionSettings(feedback_k=3)], ids=["mean", "rrf", "feedback"])
def test_run_async_equals_run(stores, fusion):
    _, in_memory = stores
    for r in (ExpandRRetriever(document_store=in_memory, top_k=6, fusion=fusion),
              ExpandRRetriever(document_store=in_memory, top_k=6, fusion=fusion, search="store"),
              ExpandRRetriever(retriever=InMemoryEmbeddingRetriever(document_store=in_memory), top_k=6,
                               fusion=fusion)):
        sync = r.run(query=QUERIES[1], expansions=EXPANSIONS[1])["documents"]
        done = asyncio.run(r.run_async(query=QUERIES[1], expansions=EXPANSIONS[1]))["documents"]
        assert [(d.id, round(d.score, 6)) for d in done] == [(d.id, round(d.score, 6)) for d in sync]


def test_wrapped_retriever_serializes_and_loads_from_yaml():
    import copy

    r = ExpandRRetriever(retriever=QdrantEmbeddingRetriever(document_store=qdrant_store("serialized"), top_k=7),
                         fusion="rrf", top_k=4, filters={"field": "meta.part", "operator": "==", "value": "a"},
                         filter_policy=FilterPolicy.MERGE, scale_score=True, return_embedding=True)
    data = r.to_dict()
    inner = data["init_parameters"]["retriever"]
    assert inner["type"] == "haystack_integrations.components.retrievers.qdrant.retriever.QdrantEmbeddingRetriever"
    assert data["init_parameters"]["document_store"] is None and data["init_parameters"]["filter_policy"] == "merge"
    frozen = copy.deepcopy(data)
    back = ExpandRRetriever.from_dict(data)
    assert data == frozen  # the nested retriever's from_dict did not replace entries of our input
    inner_back = back.retriever.to_dict()["init_parameters"]
    assert isinstance(back.retriever, QdrantEmbeddingRetriever) and back.document_store is None
    assert inner_back["top_k"] == 7 and inner_back["document_store"]["init_parameters"]["index"] == "serialized"
    assert (back.fusion.method, back.top_k, back.filter_policy, back.scale_score, back.return_embedding) == (
        "rrf", 4, FilterPolicy.MERGE, True, True)
    assert back.to_dict() == ExpandRRetriever.from_dict(data).to_dict() == frozen

    p = Pipeline()
    p.add_component("retriever", r)
    text = p.dumps()
    assert Pipeline.loads(text).dumps() == text  # default allow-list: haystack_integrations + expandr_haystack
    with pytest.raises(DeserializationError, match="allowlist"):
        Pipeline.loads(text.replace("haystack_integrations.components.retrievers.qdrant.retriever.",
                                    "os.path."))


def test_constructor_checks(stores):
    in_qdrant, in_memory = stores
    wrapped = QdrantEmbeddingRetriever(document_store=in_qdrant)
    with pytest.raises(ValueError, match="exactly one.*both"):
        ExpandRRetriever(document_store=in_memory, retriever=wrapped)
    with pytest.raises(ValueError, match="exactly one.*neither"):
        ExpandRRetriever()
    with pytest.raises(ValueError, match="search"):
        ExpandRRetriever(retriever=wrapped, search="store")
    with pytest.raises(TypeError, match="query_embedding"):
        from haystack.components.retrievers.in_memory import InMemoryBM25Retriever

        ExpandRRetriever(retriever=InMemoryBM25Retriever(document_store=in_memory))
    with pytest.raises(ValueError, match="filter_policy|merge|replace"):
        ExpandRRetriever(document_store=in_memory, filter_policy="sometimes")


def test_qdrant_yaml_example_equals_the_faiss_path(tmp_path, monkeypatch):
    """examples/qdrant_search.py: index 12 documents into Qdrant's local mode (a folder), load
    examples/qdrant_search.yaml with Haystack's loader, run it (8 generated tokens); the same expansion over the FAISS
    path on the same documents gives the same top 5."""
    import importlib.util
    from pathlib import Path

    from expandr_haystack.evaluation.indexing import build_document_store

    monkeypatch.chdir(tmp_path)  # the YAML's Qdrant folder and expansion cache are relative paths
    path = Path(__file__).parents[2] / "examples" / "qdrant_search.py"
    spec = importlib.util.spec_from_file_location("qdrant_search_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(["--docs", "12", "--max-new-tokens", "8"])
    assert (tmp_path / "qdrant_data").is_dir() and (tmp_path / "expansions.sqlite").exists()
    docs, expansions = out["retriever"]["documents"], out["expander"]["expansions"]
    assert len(docs) == 5 and expansions
    from expandr_haystack.evaluation.data import bundled_path, load_collection

    first = load_collection(bundled_path("cranfield"), "test").documents()[:12]
    faiss_path = ExpandRRetriever(document_store=build_document_store(first, progress_bar=False), top_k=5)
    expected = faiss_path.run(query=module.QUERY, expansions=expansions)["documents"]
    assert [d.id for d in docs] == [d.id for d in expected]
    text = path.with_suffix(".yaml").read_text()
    assert Pipeline.loads(Pipeline.loads(text).dumps()).dumps() == Pipeline.loads(text).dumps()
