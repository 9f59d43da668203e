"""
ExpandRRetriever over a real PostgreSQL + pgvector server (the `postgres` fixture: examples/servers/postgres.py),
through Haystack's own PgvectorEmbeddingRetriever, against the FAISS path on the same documents.

The first `N_DOCS` Cranfield test documents are embedded once by the stock SentenceTransformersDocumentEmbedder and
written by DocumentWriters into three stores: a pgvector table searched exactly (`exact_nearest_neighbor`), a pgvector
table with an HNSW index (`hnsw`, ef_search 100), and an InMemoryDocumentStore (the FAISS path's reference), so the
embeddings are identical. `N_QUERIES` Cranfield test queries get fixed stand-in expansions (the first 40 words of
Cranfield documents; one or two per query), so no LLM is needed except where one runs end to end.

PostgreSQL's planner scans a table of a few thousand rows rather than use its HNSW index (cheaper for it, and exact):
the HNSW table's connection string sets `enable_seqscan=off` (libpq `options`), so its searches do go through the
index (`test_hnsw_table_is_searched_through_its_index` checks the plan). It also sets `hnsw.ef_search=100` for every
session: pgvector-haystack sets the store's `hnsw_ef_search` on one of its two connections only
(`test_hnsw_ef_search_applies_to_the_async_connection`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from urllib.parse import quote

import numpy as np
import pytest
from haystack import Document, Pipeline
from haystack.components.writers import DocumentWriter
from haystack.document_stores.in_memory import InMemoryDocumentStore
from haystack.document_stores.types import FilterPolicy
from haystack.utils import Secret
from haystack_integrations.components.retrievers.pgvector import PgvectorEmbeddingRetriever
from haystack_integrations.document_stores.pgvector import PgvectorDocumentStore

import expandr_haystack  # noqa: F401 - adds `expandr_haystack` to Haystack's deserialization allow-list
from expandr_haystack import ExpandRQueryEmbedder, ExpandRRetriever, LLMQueryExpander
from expandr_haystack.evaluation.data import bundled_path, load_collection
from expandr_haystack.evaluation.indexing import build_document_store, indexing_pipeline

pytestmark = pytest.mark.integration

N_DOCS = 300  # the bundled MiniLM embeds ~35 Cranfield documents/s on 2 quiet cores (1,400: ~40 s), fewer when busy
N_QUERIES = 20
DIMENSION = 384
FUSIONS = ["mean", "rrf"]
WRAPPED = "the document store of the wrapped retriever \\(PgvectorEmbeddingRetriever\\)"


def pg_store(dsn: str, table: str, **kwargs) -> PgvectorDocumentStore:
    """A PgvectorDocumentStore on `table` (created afresh) for the encoder's vectors, with index names of its own
    (PostgreSQL index names are unique per schema)."""
    settings = {"embedding_dimension": DIMENSION, "vector_function": "cosine_similarity", "recreate_table": True,
                **kwargs}
    return PgvectorDocumentStore(connection_string=Secret.from_token(dsn), table_name=table,
                                 keyword_index_name=f"{table}_keyword_index", hnsw_index_name=f"{table}_hnsw_index",
                                 **settings)


def with_options(dsn: str, *settings: str) -> str:
    """`dsn` with PostgreSQL settings for every session it opens (libpq's `options`, e.g. "enable_seqscan=off")."""
    return f"{dsn}?options={quote(' '.join(f'-c {s}' for s in settings))}"


def ids(results: list[list[Document]]) -> list[list[str]]:
    return [[d.id for d in docs] for docs in results]


@dataclass
class Corpus:
    exact: PgvectorDocumentStore
    hnsw: PgvectorDocumentStore
    memory: InMemoryDocumentStore
    dsn: str
    hnsw_dsn: str
    queries: list[str]
    expansions: list[list[str]]


@pytest.fixture(scope="module")
def corpus(postgres) -> Corpus:
    """The first N_DOCS Cranfield test documents (with `part` a/b and `n` = the id's number in their meta), embedded
    once and written into two pgvector tables and an InMemoryDocumentStore; N_QUERIES queries with stand-in
    expansions."""
    collection = load_collection(bundled_path("cranfield"), "test")
    docs = [Document(id=d.id, content=d.content, meta={**d.meta, "part": "ab"[int(d.id) % 2], "n": int(d.id)})
            for d in collection.documents()[:N_DOCS]]
    hnsw_dsn = with_options(postgres.dsn, "enable_seqscan=off", "hnsw.ef_search=100")
    exact = pg_store(postgres.dsn, "cranfield_exact")
    hnsw = pg_store(hnsw_dsn, "cranfield_hnsw", search_strategy="hnsw", hnsw_ef_search=100)
    memory = InMemoryDocumentStore(embedding_similarity_function="cosine")
    indexing = indexing_pipeline(exact, progress_bar=False)  # stock embedder -> DocumentWriter(exact)
    for name, store in (("to_hnsw", hnsw), ("to_memory", memory)):
        indexing.add_component(name, DocumentWriter(document_store=store))
        indexing.connect("embedder.documents", f"{name}.documents")
    indexing.run({"embedder": {"documents": docs}})
    assert exact.count_documents() == hnsw.count_documents() == memory.count_documents() == N_DOCS

    words = [d.content.split() for d in docs]
    queries = list(collection.queries.values())[:N_QUERIES]
    expansions = [[" ".join(words[(7 * i + 3) % N_DOCS][:40])] +
                  ([" ".join(words[(11 * i + 5) % N_DOCS][:40])] if i % 2 else []) for i in range(N_QUERIES)]
    yield Corpus(exact, hnsw, memory, postgres.dsn, hnsw_dsn, queries, expansions)
    exact.close()
    hnsw.close()


def faiss_and_pgvector(corpus: Corpus, **kwargs):
    """The FAISS path over the InMemory store, and the same settings wrapping pgvector's embedding retriever (exact
    table)."""
    wrapped = PgvectorEmbeddingRetriever(document_store=corpus.exact)
    return (ExpandRRetriever(document_store=corpus.memory, **kwargs),
            ExpandRRetriever(retriever=wrapped, **kwargs))


class Runs:
    """`retrieve(queries, expansions)` of the corpus through the FAISS path ("faiss") or a pgvector table ("exact",
    "hnsw"), top 10, computed once per path and fusion (the encoder is the slow part on 2 shared cores)."""

    def __init__(self, corpus: Corpus):
        self.corpus = corpus
        self.done: dict[tuple[str, str], list[list[Document]]] = {}

    def retriever(self, path: str, fusion: str) -> ExpandRRetriever:
        if path == "faiss":
            return ExpandRRetriever(document_store=self.corpus.memory, top_k=10, fusion=fusion)
        store = self.corpus.exact if path == "exact" else self.corpus.hnsw
        return ExpandRRetriever(retriever=PgvectorEmbeddingRetriever(document_store=store), top_k=10, fusion=fusion)

    def __call__(self, path: str, fusion: str) -> list[list[Document]]:
        if (path, fusion) not in self.done:
            self.done[path, fusion] = self.retriever(path, fusion).retrieve(self.corpus.queries, self.corpus.expansions)
        return self.done[path, fusion]


@pytest.fixture(scope="module")
def runs(corpus) -> Runs:
    return Runs(corpus)


# -- exact search --------------------------------------------------------------------------------------------------
def assert_same_ranking(got: list[list[Document]], expected: list[list[Document]], norms: np.ndarray | None):
    """The same ids in the same order, 10 each; scores equal, or (`norms`) the expected ones over the norms."""
    assert ids(got) == ids(expected) and all(len(docs) == 10 for docs in got)
    wanted = np.asarray([[d.score for d in docs] for docs in expected])
    if norms is not None:
        wanted = wanted / norms[:, None]
    np.testing.assert_allclose([[d.score for d in docs] for docs in got], wanted, rtol=1e-5, atol=1e-6)
    assert all(d.embedding is None for docs in got for d in docs)  # pgvector returns them; dropped, as asked


@pytest.mark.parametrize("fusion", FUSIONS)
def test_exact_search_equals_the_faiss_path(corpus, runs, fusion):
    """Top 10 of 20 queries (mean: with and without expansions): the same ids in the same order. Scores: mean,
    pgvector's cosine with the fused vector = the FAISS inner product over the fused vector's norm; rrf, the same RRF
    scores (pgvector's 100 hits per search rank as FAISS's)."""
    embedder = ExpandRQueryEmbedder()
    norms = np.linalg.norm(embedder.embed_fused(corpus.queries, corpus.expansions), axis=1)
    assert_same_ranking(runs("exact", fusion), runs("faiss", fusion), norms if fusion == "mean" else None)
    faiss_path, via_pgvector = runs.retriever("faiss", fusion), runs.retriever("exact", fusion)
    if fusion == "mean":  # plain dense retrieval (rrf without expansions is the same single search)
        norms = np.linalg.norm(embedder.embed_fused(corpus.queries), axis=1)
        assert_same_ranking(via_pgvector.retrieve(corpus.queries), faiss_path.retrieve(corpus.queries), norms)
    one = via_pgvector.run(query=corpus.queries[3], expansions=corpus.expansions[3])["documents"]
    assert [d.id for d in one] == ids(runs("faiss", fusion))[3]


# -- HNSW ----------------------------------------------------------------------------------------------------------
def test_hnsw_table_is_searched_through_its_index(corpus):
    """The premise of the recall test: pgvector's query for this table runs as an index scan of its HNSW index, and
    one search returns the 100 hits rrf asks for (an HNSW scan returns at most `hnsw.ef_search` rows)."""
    import psycopg

    vector_list = ExpandRQueryEmbedder().embed_fused(corpus.queries[:1])[0].tolist()
    vector = "[" + ",".join(map(str, vector_list)) + "]"
    with psycopg.connect(corpus.hnsw_dsn) as connection:
        plan = connection.execute("EXPLAIN SELECT id FROM cranfield_hnsw ORDER BY embedding <=> %s::vector LIMIT 100",
                                  (vector,)).fetchall()
    assert "Index Scan using cranfield_hnsw_hnsw_index" in "\n".join(row[0] for row in plan)
    hits = PgvectorEmbeddingRetriever(document_store=corpus.hnsw).run(query_embedding=vector_list, top_k=100)
    assert len(hits["documents"]) == 100


@pytest.mark.parametrize("fusion", FUSIONS)
def test_hnsw_recall_of_the_exact_ids(runs, fusion):
    """Through the HNSW index (ef_search 100): recall@10 of the exact top 10, mean over the queries, >= 0.95."""
    want, got = ids(runs("exact", fusion)), ids(runs("hnsw", fusion))
    assert all(len(hits) == 10 for hits in got)
    recall = np.mean([len(set(g) & set(w)) / len(w) for g, w in zip(got, want)])
    assert recall >= 0.95, (recall, got, want)


# -- filters -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fusion", FUSIONS)
def test_filters_and_filter_policy_equal_the_faiss_path(corpus, fusion):
    """Init filters and run filters, combined by ExpandRRetriever's filter_policy (replace, merge), or by the wrapped
    PgvectorEmbeddingRetriever's own init filters and policy: the ids of the FAISS path with the same filters (SQL
    WHERE on the meta column in PostgreSQL, Haystack's filter logic in memory)."""
    part_a = {"field": "meta.part", "operator": "==", "value": "a"}
    late = {"field": "meta.n", "operator": ">=", "value": 200}
    queries, expansions = corpus.queries[:3], corpus.expansions[:3]
    cases = [("merge", lambda m: m["part"] == "a" and m["n"] >= 200), ("replace", lambda m: m["n"] >= 200)]
    for policy, check in cases:
        faiss_path, via_pgvector = faiss_and_pgvector(corpus, top_k=30, fusion=fusion, filters=part_a,
                                                      filter_policy=policy)
        expected = faiss_path.retrieve(queries, expansions, filters=late)
        assert all(len(docs) == 30 and all(check(d.meta) for d in docs) for docs in expected)
        assert {d.meta["part"] for docs in expected for d in docs} == ({"a"} if policy == "merge" else {"a", "b"})
        assert ids(via_pgvector.retrieve(queries, expansions, filters=late)) == ids(expected)
    init_only = via_pgvector.retrieve(queries, expansions)  # no run filters: the init ones
    assert {d.meta["part"] for docs in init_only for d in docs} == {"a"}
    assert ids(init_only) == ids(faiss_path.retrieve(queries, expansions))
    one = via_pgvector.run(query=queries[0], expansions=expansions[0], filters=late)["documents"]  # through `run`
    assert [d.id for d in one] == ids(faiss_path.retrieve(queries[:1], expansions[:1], filters=late))[0]

    inner = PgvectorEmbeddingRetriever(document_store=corpus.exact, filters=part_a, filter_policy=FilterPolicy.MERGE)
    wrapped = ExpandRRetriever(retriever=inner, top_k=30, fusion=fusion)
    both = {"operator": "AND", "conditions": [part_a, late]}
    expected = ExpandRRetriever(document_store=corpus.memory, top_k=30, fusion=fusion).retrieve(
        queries, expansions, filters=both)
    assert ids(wrapped.retrieve(queries, expansions, filters=late)) == ids(expected)


# -- the checks of the stored documents (StoreCheck) ----------------------------------------------------------------
def small_table(postgres, table: str, documents: list[Document], dimension: int = DIMENSION) -> ExpandRRetriever:
    store = pg_store(postgres.dsn, table, embedding_dimension=dimension)
    store.write_documents(documents)
    return ExpandRRetriever(retriever=PgvectorEmbeddingRetriever(document_store=store), top_k=3)


def random_documents(n: int, dimension: int, prefix: str = "d") -> list[Document]:
    rng = np.random.default_rng(0)
    return [Document(id=f"{prefix}{i}", content=f"text {i}", embedding=rng.normal(size=dimension).tolist())
            for i in range(n)]


def test_partly_embedded_table_is_named(postgres):
    """A document written without an embedding (NULL in the table; pgvector would rank it last, with score None):
    our error names it and the store; once it is deleted, the table is checked again and searched."""
    retriever = small_table(postgres, "check_partly", random_documents(4, DIMENSION) + [Document(id="plain",
                                                                                               content="none")])
    with pytest.raises(ValueError, match=rf"1 document\(s\) in {WRAPPED} have no embedding \(e\.g\. id 'plain'\); "
                                         "embed them first with SentenceTransformersDocumentEmbedder"):
        retriever.run(query="heat conduction in composite slabs")
    retriever.retriever.document_store.delete_documents(["plain"])
    assert len(retriever.run(query="heat conduction in composite slabs")["documents"]) == 3
    retriever.close()


def test_table_of_another_dimension_is_named(postgres):
    """A table of 768-dimension vectors searched with the 384-dimension encoder: our error (sync and async), not
    pgvector's "query_embedding dimension (384) does not match PgvectorDocumentStore embedding dimension (768)"."""
    retriever = small_table(postgres, "check_dimension", random_documents(5, 768), dimension=768)
    match = r"Document 'd\d' has an embedding of dimension 768 but the retriever's encoder produces 384"
    with pytest.raises(ValueError, match=match):
        retriever.run(query="heat conduction in composite slabs")

    async def run_async():
        try:
            await retriever.run_async(query="heat conduction in composite slabs", expansions=["composite walls"])
        finally:
            await retriever.close_async()

    with pytest.raises(ValueError, match=match):
        asyncio.run(run_async())
    retriever.close()


def test_large_table_of_another_dimension_is_named(postgres, monkeypatch):
    """A table too big to read is checked against the store's declared `embedding_dimension` (pgvector's name):
    our error, not pgvector's "query_embedding dimension (384) does not match ..."."""
    from expandr_haystack.components.search import StoreCheck

    monkeypatch.setattr(StoreCheck, "READ_LIMIT", 2)  # 5 documents: not read, as a table of > 1,000 rows
    retriever = small_table(postgres, "check_dimension_large", random_documents(5, 768), dimension=768)
    try:
        with pytest.raises(ValueError, match=r"dimension 768 but the retriever's encoder produces 384"):
            retriever.run(query="heat conduction in composite slabs")
    finally:
        retriever.close()


def test_table_without_embeddings_is_named(postgres):
    """pgvector returns unembedded rows (score None, after the others) instead of nothing: named, not returned."""
    retriever = small_table(postgres, "check_unembedded", [Document(id=f"d{i}", content=f"t {i}") for i in range(5)])
    try:
        with pytest.raises(ValueError, match=rf"5 document\(s\) in {WRAPPED} have no embedding"):
            retriever.run(query="heat conduction in composite slabs")
    finally:
        retriever.close()


# -- async ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("table", ["exact", "hnsw"])
def test_run_async_equals_run(corpus, runs, fusion, table):
    """`run_async` (PgvectorEmbeddingRetriever.run_async on the store's async connection; rrf: its searches
    concurrently), one query at a time and all queries at once: the ids and scores of the synchronous path
    (`retrieve`, the batched `run`)."""
    retriever = runs.retriever(table, fusion)
    pairs = list(zip(corpus.queries, corpus.expansions))
    sync = runs(table, fusion)

    async def both():
        try:
            one_by_one = [(await retriever.run_async(query=q, expansions=e))["documents"] for q, e in pairs]
            together = await asyncio.gather(*(retriever.run_async(query=q, expansions=e) for q, e in pairs))
            return one_by_one, [r["documents"] for r in together]
        finally:
            await retriever.close_async()

    for results in asyncio.run(both()):
        assert ids(results) == ids(sync)
        np.testing.assert_allclose([[d.score for d in r] for r in results], [[d.score for d in r] for r in sync],
                                   rtol=1e-5)


@pytest.mark.xfail(strict=True, reason="pgvector-haystack 8.1.2 sets `hnsw.ef_search` only on the connection that "
                                       "creates the table (sync or async), so the other one searches with "
                                       "PostgreSQL's default 40: at most 40 hits")
def test_hnsw_ef_search_applies_to_the_async_connection(corpus):
    """Upstream, not ours: a store with `hnsw_ef_search=100` searched synchronously, then asynchronously, for 100
    hits (rrf's depth). The fixture's HNSW store also sets `hnsw.ef_search` in its connection string (every session),
    which the other tests rely on."""
    store = PgvectorDocumentStore(
        connection_string=Secret.from_token(with_options(corpus.dsn, "enable_seqscan=off")), table_name="cranfield_hnsw",
        embedding_dimension=DIMENSION, vector_function="cosine_similarity", search_strategy="hnsw",
        hnsw_ef_search=100, keyword_index_name="cranfield_hnsw_keyword_index",
        hnsw_index_name="cranfield_hnsw_hnsw_index")
    retriever = PgvectorEmbeddingRetriever(document_store=store)
    vector = ExpandRQueryEmbedder().embed_fused(corpus.queries[:1])[0].tolist()

    async def search_async():
        try:
            return (await retriever.run_async(query_embedding=vector, top_k=100))["documents"]
        finally:
            await store.close_async()

    try:
        assert len(retriever.run(query_embedding=vector, top_k=100)["documents"]) == 100
        assert len(asyncio.run(search_async())) == 100
    finally:
        store.close()


# -- YAML, a real ExpandR pipeline, the example ------------------------------------------------------------------
def test_yaml_round_trip_with_the_connection_from_the_environment(corpus, runs, postgres, monkeypatch):
    """An ExpandR pipeline whose pgvector store reads PG_CONN_STR: dumped (the variable's name, not the DSN), loaded
    by Haystack's default loader (no unsafe mode), it equals the original and gives the same documents."""
    monkeypatch.setenv("PG_CONN_STR", postgres.dsn)
    store = PgvectorDocumentStore(table_name="cranfield_exact", embedding_dimension=DIMENSION,
                                  vector_function="cosine_similarity", keyword_index_name="cranfield_exact_keyword_index",
                                  hnsw_index_name="cranfield_exact_hnsw_index")  # connection: Secret.from_env_var
    original = Pipeline()
    original.add_component("retriever", ExpandRRetriever(retriever=PgvectorEmbeddingRetriever(document_store=store),
                                                         top_k=10, fusion="rrf"))
    text = original.dumps()
    assert postgres.dsn not in text and "PG_CONN_STR" in text
    loaded = Pipeline.loads(text)
    assert loaded.dumps() == text
    try:
        for pipeline in (original, loaded):
            got = [pipeline.run({"retriever": {"query": q, "expansions": e}})["retriever"]["documents"]
                   for q, e in zip(corpus.queries[:3], corpus.expansions[:3])]
            assert ids(got) == ids(runs("faiss", "rrf"))[:3]
    finally:
        original.close()
        loaded.close()


def test_expandr_pipeline_end_to_end(corpus, tmp_path):
    """LLMQueryExpander (bundled SmolLM2, 8 new tokens) -> ExpandRRetriever(retriever=PgvectorEmbeddingRetriever):
    the documents of the FAISS path for the same generated expansion."""
    p = Pipeline()
    p.add_component("expander", LLMQueryExpander(generation={"max_new_tokens": 8},
                                                 cache=str(tmp_path / "expansions.sqlite")))
    p.add_component("retriever", ExpandRRetriever(retriever=PgvectorEmbeddingRetriever(document_store=corpus.exact),
                                                  top_k=10))
    p.connect("expander.query", "retriever.query")
    p.connect("expander.expansions", "retriever.expansions")
    out = p.run({"expander": {"query": corpus.queries[1]}}, include_outputs_from={"expander"})
    expansions = out["expander"]["expansions"]
    assert len(expansions) == 1 and expansions[0].strip()
    expected = ExpandRRetriever(document_store=corpus.memory, top_k=10).run(corpus.queries[1], expansions)
    assert [d.id for d in out["retriever"]["documents"]] == [d.id for d in expected["documents"]]
    assert len(out["retriever"]["documents"]) == 10


def test_pgvector_example_against_the_server(postgres, tmp_path, monkeypatch, capsys):
    """examples/pgvector_search.py with --dsn: indexes 12 documents into the YAML's table (`cranfield`), loads
    examples/pgvector_search.yaml with Haystack's loader and runs it; the same expansion over the FAISS path on the
    same documents gives the same top 5. Run again with the DSN from PG_CONN_STR only: the table is kept, not
    indexed again, and the (cached) expansion finds the same documents."""
    import importlib.util
    from pathlib import Path

    monkeypatch.chdir(tmp_path)  # the YAML's expansion cache is a relative path
    monkeypatch.setenv("PG_CONN_STR", "postgresql://unused@127.0.0.1:1/none")  # restored after; main() sets it
    spec = importlib.util.spec_from_file_location(
        "pgvector_search_example", Path(__file__).parents[2] / "examples" / "pgvector_search.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(["--dsn", postgres.dsn, "--docs", "12", "--max-new-tokens", "8", "--reindex"])
    assert "indexed 12 documents into table 'cranfield'" in capsys.readouterr().out
    docs, expansions = out["retriever"]["documents"], out["expander"]["expansions"]
    assert len(docs) == 5 and expansions and (tmp_path / "expansions.sqlite").exists()
    first = load_collection(bundled_path("cranfield"), "test").documents()[:12]
    faiss_path = ExpandRRetriever(document_store=build_document_store(first, progress_bar=False), top_k=5)
    assert [d.id for d in docs] == [d.id for d in faiss_path.run(query=module.QUERY, expansions=expansions)["documents"]]

    monkeypatch.setenv("PG_CONN_STR", postgres.dsn)
    again = module.main(["--max-new-tokens", "8"])
    assert "table 'cranfield' holds 12 documents" in capsys.readouterr().out
    assert again["expander"]["expansions"] == expansions
    assert [d.id for d in again["retriever"]["documents"]] == [d.id for d in docs]
    text = (module.HERE / "pgvector_search.yaml").read_text()
    assert Pipeline.loads(Pipeline.loads(text).dumps()).dumps() == Pipeline.loads(text).dumps()
