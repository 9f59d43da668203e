"""ExpandRRetriever against a raw sentence-transformers + numpy brute-force search (real bundled MiniLM)."""

import asyncio

import numpy as np
import pytest
from haystack import Document
from haystack.document_stores.in_memory import InMemoryDocumentStore
from haystack.document_stores.types import DuplicatePolicy

from expandr_haystack import ExpandRQueryEmbedder, ExpandRRetriever
from expandr_haystack.models import load_encoder, resolve_encoder_path
from expandr_haystack.options import FusionSettings

pytestmark = pytest.mark.integration

EXPANSIONS = [["Aeroelastic models of heated aircraft must obey similarity of thermal and elastic parameters.",
               "Scaled models reproduce flutter when Mach and Reynolds numbers match."],
              ["Heat conduction in layered slabs has closed-form solutions for constant properties."]]


def _raw(cranfield_small, queries, expansions, k=10):
    _, docs = cranfield_small
    st = load_encoder(None, "cpu")
    d = st.encode([f"{x.meta['title']}\n{x.content}" for x in docs], normalize_embeddings=True)
    q = st.encode(queries, normalize_embeddings=True)
    out = []
    for i, exps in enumerate(expansions):
        vec = q[i] if not exps else 0.5 * q[i] + 0.5 * st.encode(exps, normalize_embeddings=True).mean(0)
        scores = d @ vec
        top = np.argsort(-scores, kind="stable")[:k]
        out.append(([docs[j].id for j in top], scores[top]))
    return out


@pytest.mark.parametrize("with_expansions", [False, True])
def test_matches_raw_brute_force(cranfield_small, small_store, with_expansions):
    from tests.conftest import QUERIES

    exps = EXPANSIONS if with_expansions else [[], []]
    retriever = ExpandRRetriever(small_store, top_k=10)
    got = retriever.retrieve(QUERIES, exps)
    for (ids, scores), docs in zip(_raw(cranfield_small, QUERIES, exps), got):
        assert [d.id for d in docs] == ids
        np.testing.assert_allclose([d.score for d in docs], scores, rtol=1e-4, atol=1e-5)
    one = retriever.run(query=QUERIES[0], expansions=exps[0])["documents"]
    assert [d.id for d in one] == [d.id for d in got[0]]


def test_embedder_run_matches_retriever_fusion(small_store):
    from tests.conftest import QUERIES

    emb = ExpandRQueryEmbedder().run(query=QUERIES[0], expansions=EXPANSIONS[0])["embedding"]
    via_store = small_store.embedding_retrieval(query_embedding=emb, top_k=5)
    via_retriever = ExpandRRetriever(small_store, top_k=5).run(query=QUERIES[0], expansions=EXPANSIONS[0])
    assert [d.id for d in via_store] == [d.id for d in via_retriever["documents"]]
    store_backend = ExpandRRetriever(small_store, top_k=5, search="store").run(QUERIES[0], EXPANSIONS[0])
    assert [d.id for d in store_backend["documents"]] == [d.id for d in via_store]


def test_rrf_fuses_reciprocal_ranks(small_store):
    from tests.conftest import QUERIES

    r = ExpandRRetriever(small_store, top_k=5, fusion=FusionSettings(method="rrf", rrf_k=60))
    docs = r.run(query=QUERIES[0], expansions=EXPANSIONS[0])["documents"]
    single = ExpandRRetriever(small_store, top_k=100)
    lists = [single.run(query=t)["documents"] for t in [QUERIES[0]] + EXPANSIONS[0]]
    expected = {}
    for lst in lists:
        for rank, d in enumerate(lst, 1):
            expected[d.id] = expected.get(d.id, 0.0) + 1 / (60 + rank)
    best = sorted(expected.items(), key=lambda x: (-x[1], x[0]))[:5]
    assert [(d.id, round(d.score, 9)) for d in docs] == [(i, round(s, 9)) for i, s in best]


def test_filters_restrict_the_search(small_store):
    from tests.conftest import QUERIES

    allowed = {"5", "6", "7"}
    r = ExpandRRetriever(small_store, top_k=10)
    docs = r.run(query=QUERIES[1], filters={"field": "id", "operator": "in", "value": sorted(allowed)})["documents"]
    assert {d.id for d in docs} == allowed


def test_index_is_rebuilt_when_the_store_changes():
    st = load_encoder(None, "cpu")
    store = InMemoryDocumentStore()
    texts = ["wings generate lift", "heat flows through slabs"]
    store.write_documents([Document(id=str(i), content=t, embedding=st.encode(t).tolist())
                           for i, t in enumerate(texts)])
    r = ExpandRRetriever(store, top_k=1)
    assert r.run(query="conduction of heat")["documents"][0].id == "1"
    store.write_documents([Document(id="2", content="x", embedding=st.encode("thermal conduction in slabs").tolist())])
    assert r.run(query="thermal conduction in slabs")["documents"][0].id == "2"


def test_documents_without_embeddings_or_wrong_dimension():
    store = InMemoryDocumentStore()
    store.write_documents([Document(id="a", content="no embedding")])
    with pytest.raises(ValueError, match="no embedding"):
        ExpandRRetriever(store).run(query="lift")
    store2 = InMemoryDocumentStore()
    store2.write_documents([Document(id="a", content="x", embedding=[0.1] * 7)])
    with pytest.raises(ValueError, match="dimension 7.*384"):
        ExpandRRetriever(store2).run(query="lift")
    with pytest.raises(ValueError, match="empty"):
        ExpandRRetriever(InMemoryDocumentStore()).run(query="lift")


def test_encoder_accepts_a_local_path():
    path = resolve_encoder_path(None)
    assert ExpandRQueryEmbedder(model=path).dimension == 384


def embedded(texts: dict[str, str]) -> list[Document]:
    vectors = ExpandRQueryEmbedder().encode(list(texts.values()))
    return [Document(id=i, content=t, embedding=v.tolist()) for (i, t), v in zip(texts.items(), vectors)]


@pytest.mark.parametrize("shared", [True, False])
def test_faiss_index_notices_documents_replaced_in_place(shared):
    store = InMemoryDocumentStore(index=f"in-place-{shared}", shared=shared, embedding_similarity_function="cosine")
    store.write_documents(embedded({"0": "thermal conductivity of composite slabs",
                                    "1": "boundary layer transition on flat plates",
                                    "2": "wings generate lift at low speed"}))
    r = ExpandRRetriever(document_store=store, top_k=1)
    query = "supersonic flutter of aircraft panels"
    before = r.run(query=query)["documents"][0]
    assert before.id != "0"
    index = r.refresh_index()
    assert r.run(query=query)["documents"][0].id == before.id and r.refresh_index() is index  # nothing rebuilt
    assert type(store.storage) is dict  # the store is not patched: the index checks the stored objects themselves
    # replace document "0" (not the last one written) in place: same id, same count
    writer = InMemoryDocumentStore(index=store.index) if shared else store  # shared: write through another instance
    writer.write_documents(embedded({"0": "panel flutter of supersonic aircraft"}), policy=DuplicatePolicy.OVERWRITE)
    assert store.count_documents() == 3
    after = r.run(query=query)["documents"][0]
    assert (after.id, after.content) == ("0", "panel flutter of supersonic aircraft") and r.refresh_index() is not index
    store.delete_all_documents()
    with pytest.raises(ValueError, match="empty"):
        r.run(query=query)


def test_embedder_run_async_equals_run():
    from tests.conftest import QUERIES

    embedder = ExpandRQueryEmbedder()
    sync = embedder.run(query=QUERIES[0], expansions=EXPANSIONS[0])["embedding"]
    done = asyncio.run(embedder.run_async(query=QUERIES[0], expansions=EXPANSIONS[0]))["embedding"]
    # the same vector; float32 rounding may differ on the worker thread (its BLAS threads: ~1e-7 apart seen once
    # CTranslate2's MKL was loaded in the same process)
    np.testing.assert_allclose(done, sync, rtol=0, atol=1e-6)


def test_retrievers_over_one_store_share_one_index(monkeypatch):
    """Every retriever over a store (or over store instances sharing its storage) searches one FAISS index, built
    once, and rebuilt once after a write."""
    from expandr_haystack.components import document_index

    builds = []

    class Counted(document_index.DocumentIndex):
        def __init__(self, *args, **kwargs):
            builds.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(document_index, "DocumentIndex", Counted)
    store = InMemoryDocumentStore(index="shared-index-test", embedding_similarity_function="cosine")
    store.write_documents(embedded({"0": "thermal conductivity of composite slabs",
                                    "1": "boundary layer transition on flat plates"}))
    first = ExpandRRetriever(document_store=store, top_k=1)
    second = ExpandRRetriever(document_store=store, top_k=2, fusion="rrf")
    other_instance = ExpandRRetriever(document_store=InMemoryDocumentStore(index="shared-index-test"))
    assert first.run(query="heat conduction")["documents"][0].id == "0"
    assert [d.id for d in second.run(query="heat conduction")["documents"]] == ["0", "1"]
    index = first.refresh_index()
    assert second.refresh_index() is index and other_instance.refresh_index() is index and len(builds) == 1
    store.write_documents(embedded({"2": "wings generate lift at low speed"}))
    assert other_instance.run(query="lift of wings")["documents"][0].id == "2"
    assert first.refresh_index() is second.refresh_index() is not index and len(builds) == 2
