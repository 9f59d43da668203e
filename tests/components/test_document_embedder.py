"""
ExpandRDocumentEmbedder: Haystack's SentenceTransformersDocumentEmbedder through the package's encoder loader. With
backend="torch" its vectors are the stock embedder's; with backend="ctranslate2" close to them, and
`build_document_store(..., encoder=...)` indexes with it for `ExpandRRetriever`.
"""

import asyncio
import copy
import importlib.util

import numpy as np
import pytest
from haystack import Document, Pipeline
from haystack.components.writers import DocumentWriter
from haystack.document_stores.in_memory import InMemoryDocumentStore
from haystack.utils import ComponentDevice, Secret
from haystack_integrations.components.embedders.sentence_transformers import SentenceTransformersDocumentEmbedder

from expandr_haystack import ExpandRDocumentEmbedder, ExpandRQueryEmbedder, ExpandRRetriever
from expandr_haystack.evaluation.indexing import build_document_store, indexing_pipeline
from expandr_haystack.models import resolve_encoder_path
from expandr_haystack.options import EncoderOptions
from tests.conftest import TINY_DOCS

CPU = ComponentDevice.from_str("cpu")
HAS_CT2 = importlib.util.find_spec("ctranslate2") is not None
#: One thread for CTranslate2 (the tests share a small machine).
CT2 = {"backend": "ctranslate2", "model_kwargs": {"intra_threads": 1}}
DOCS = [
    Document(id="a", content="Flutter of swept wings at transonic speeds.", meta={"title": "Wing flutter", "year": 1957}),
    Document(id="b", content="Buckling of thin cylindrical shells.", meta={"title": None, "year": 1960}),
    Document(id="c", content=None, meta={"title": "A title only"}),
    Document(id="d", content="Heat conduction in composite slabs."),
    Document(id="e", content=""),
]


def tiny_docs():
    return [Document(id=i, content=text, meta={"title": title}) for i, title, text in TINY_DOCS]


@pytest.fixture(scope="module")
def ct2_home(tmp_path_factory):
    """One conversion folder for the module (the bundled MiniLM is converted once)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EXPANDR_HOME", str(tmp_path_factory.mktemp("home")))
        yield


@pytest.mark.parametrize("settings", [
    {"prefix": "passage: ", "suffix": " .", "normalize_embeddings": True, "meta_fields_to_embed": ["title", "year"]},
    {"normalize_embeddings": False, "meta_fields_to_embed": ["title"], "embedding_separator": " | ",
     "precision": "binary"},
])
def test_torch_vectors_equal_the_stock_embedder(settings):
    frozen = copy.deepcopy(DOCS)
    stock = SentenceTransformersDocumentEmbedder(model=resolve_encoder_path(None), device=CPU, batch_size=2,
                                                 progress_bar=False, local_files_only=True, **settings)
    ours = ExpandRDocumentEmbedder(device=CPU, encoder={"batch_size": 2}, **settings)
    expected = stock.run(DOCS)["documents"]
    got = ours.run(DOCS)["documents"]
    assert DOCS == frozen  # inputs not modified
    assert [d.id for d in got] == [d.id for d in DOCS]
    assert all(g is not d for g, d in zip(got, DOCS, strict=True))
    assert [(g.content, g.meta) for g in got] == [(d.content, d.meta) for d in DOCS]
    np.testing.assert_allclose([d.embedding for d in got], [d.embedding for d in expected], atol=1e-5)
    assert ours.document_text(DOCS[2]) == settings.get("prefix", "") + "A title only" + \
        settings.get("embedding_separator", "\n") + settings.get("suffix", "")  # content None -> ""


def test_async_and_empty_input():
    embedder = ExpandRDocumentEmbedder(device=CPU)
    assert embedder.run([])["documents"] == []
    got = asyncio.run(embedder.run_async(DOCS[:2]))["documents"]
    np.testing.assert_allclose([d.embedding for d in got], [d.embedding for d in embedder.run(DOCS[:2])["documents"]],
                               atol=1e-6)
    encoder = embedder.encoder
    embedder.warm_up()
    assert embedder.encoder is encoder and embedder.dimension == 384  # warm_up is idempotent


@pytest.mark.skipif(not HAS_CT2, reason="backend='ctranslate2' needs the ctranslate2 package")
def test_ctranslate2_vectors_are_close_to_torch(ct2_home):
    torch_docs = ExpandRDocumentEmbedder(device=CPU, normalize_embeddings=True,
                                         meta_fields_to_embed=["title"]).run(DOCS)["documents"]
    ct2 = ExpandRDocumentEmbedder(device=CPU, normalize_embeddings=True, meta_fields_to_embed=["title"], encoder=CT2)
    got = ct2.run(DOCS)["documents"]
    assert type(ct2.encoder[0].model).__name__ == "CTranslate2Transformer"
    cosine = (np.asarray([d.embedding for d in got]) * np.asarray([d.embedding for d in torch_docs])).sum(1)
    assert cosine[:4].min() > 0.99, cosine  # documents with text
    assert cosine[4] > 0.95, cosine  # DOCS[4] is "": [CLS] [SEP] alone, int8 rounding weighs more (0.98 measured)


@pytest.mark.skipif(not HAS_CT2, reason="backend='ctranslate2' needs the ctranslate2 package")
def test_build_document_store_with_ctranslate2_retrieves(ct2_home):
    store = build_document_store(tiny_docs(), encoder=CT2, progress_bar=False, batch_size=4)
    stored = store.filter_documents()
    assert len(stored) == len(TINY_DOCS)
    np.testing.assert_allclose([np.linalg.norm(d.embedding) for d in stored], 1.0, atol=1e-5)
    retriever = ExpandRRetriever(document_store=store, top_k=3, device=CPU,
                                 query_embedder=ExpandRQueryEmbedder(device=CPU, encoder=CT2))
    assert retriever.run(query="flutter of swept wings in a wind tunnel")["documents"][0].id == "d6"
    assert retriever.run(query="buckling of cylindrical shells")["documents"][0].id == "d4"


def test_indexing_pipeline_picks_the_embedder():
    store = InMemoryDocumentStore()
    stock = indexing_pipeline(store, progress_bar=False).get_component("embedder")
    assert isinstance(stock, SentenceTransformersDocumentEmbedder)  # the default is unchanged
    ours = indexing_pipeline(store, batch_size=8, progress_bar=False,
                             encoder=EncoderOptions(backend="torch", batch_size=99)).get_component("embedder")
    assert isinstance(ours, ExpandRDocumentEmbedder)
    assert (ours.encoder_options.batch_size, ours.encoder_options.progress_bar) == (8, False)
    assert (ours.meta_fields_to_embed, ours.normalize_embeddings) == (["title"], True)
    with pytest.raises(ValueError, match="`encoder`"):
        indexing_pipeline(store, encoder={"bakend": "ctranslate2"})


def test_serialisation_round_trip(monkeypatch):
    monkeypatch.setenv("MY_HF", "hf_secret_value")
    embedder = ExpandRDocumentEmbedder(
        model=resolve_encoder_path(None), device=CPU, prefix="passage: ", normalize_embeddings=True,
        meta_fields_to_embed=["title"], embedding_separator=" - ", precision="ubinary",
        encoder=EncoderOptions(batch_size=7, token=Secret.from_env_var("MY_HF"), backend="torch"))
    data = embedder.to_dict()
    assert "hf_secret_value" not in str(data)
    assert data["type"] == "expandr_haystack.components.document_embedder.ExpandRDocumentEmbedder"
    frozen = copy.deepcopy(data)
    back = ExpandRDocumentEmbedder.from_dict(data)
    assert data == frozen and back.to_dict() == data
    assert (back.device, back.encoder_options.batch_size, back.embedding_separator, back.precision) == (
        CPU, 7, " - ", "ubinary")
    assert back.encoder_options.token.resolve_value() == "hf_secret_value"
    with pytest.raises(ValueError, match="plain|token|Secret"):
        ExpandRDocumentEmbedder(encoder={"token": Secret.from_token("x")}).to_dict()


def test_a_stock_embedders_dict_loads_with_its_settings():
    stock = SentenceTransformersDocumentEmbedder(model=resolve_encoder_path(None), device=CPU, batch_size=5,
                                                 progress_bar=False, meta_fields_to_embed=["title"], prefix="p: ",
                                                 normalize_embeddings=True, local_files_only=True)
    data = stock.to_dict()
    data["type"] = "expandr_haystack.components.document_embedder.ExpandRDocumentEmbedder"
    ours = ExpandRDocumentEmbedder.from_dict(data)
    assert (ours.prefix, ours.meta_fields_to_embed, ours.normalize_embeddings, ours.device) == (
        "p: ", ["title"], True, CPU)
    options = ours.encoder_options
    assert (options.batch_size, options.progress_bar, options.local_files_only, options.backend) == (
        5, False, True, "torch")


def test_yaml_loads_without_unsafe_mode():
    store = InMemoryDocumentStore(embedding_similarity_function="cosine")
    p = Pipeline()
    p.add_component("embedder", ExpandRDocumentEmbedder(meta_fields_to_embed=["title"], normalize_embeddings=True,
                                                        encoder={"batch_size": 16, **CT2}))
    p.add_component("writer", DocumentWriter(document_store=store))
    p.connect("embedder.documents", "writer.documents")
    text = p.dumps()
    assert "expandr_haystack.components.document_embedder.ExpandRDocumentEmbedder" in text
    q = Pipeline.loads(text)
    assert q.dumps() == text
    embedder = q.get_component("embedder")
    assert (embedder.encoder_options.backend, embedder.encoder_options.batch_size,
            embedder.encoder_options.model_kwargs) == ("ctranslate2", 16, {"intra_threads": 1})
    assert embedder._encoder is None  # nothing loaded by loading the YAML


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"meta_fields_to_embed": "title"}, TypeError, "meta_fields_to_embed"),
    ({"meta_fields_to_embed": ["title", 3]}, TypeError, "meta_fields_to_embed"),
    ({"prefix": None}, TypeError, "prefix"),
    ({"embedding_separator": 1}, TypeError, "embedding_separator"),
    ({"normalize_embeddings": "yes"}, TypeError, "normalize_embeddings"),
    ({"precision": "int4"}, ValueError, "precision"),
    ({"precision": "int8"}, ValueError, "quantization_ranges"),
    ({"encoder": {"batch_size": 0}}, ValueError, "batch_size"),
    ({"encoder": {"bogus": 1}}, ValueError, "`encoder`"),
    ({"encoder": "ctranslate2"}, TypeError, "`encoder`"),
    ({"device": "cpu"}, TypeError, "`device`"),
    ({"model": "./no/such/encoder"}, FileNotFoundError, "`model`"),
])
def test_bad_settings_are_named(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ExpandRDocumentEmbedder(**kwargs)


@pytest.mark.parametrize("documents,exc,match", [
    ("some text", TypeError, r"`documents` must be a list"),
    (Document(content="x"), TypeError, r"`documents` must be a list"),
    (None, TypeError, r"`documents` must be a list"),
    ([Document(content="x"), "y"], TypeError, r"`documents\[1\]` must be a haystack Document; got str"),
    ([{"content": "x"}], TypeError, r"`documents\[0\]`"),
    ([Document(content="x"), Document(content="y"), "content=7"], TypeError, r"`documents\[2\]\.content`"),
])
def test_bad_documents_are_named(documents, exc, match):
    if isinstance(documents, list) and documents[-1] == "content=7":
        documents[-1] = Document(content="z")
        object.__setattr__(documents[-1], "content", 7)  # Haystack checks the content when a Document is made, not later
    embedder = ExpandRDocumentEmbedder(device=CPU)
    with pytest.raises(exc, match=match):
        embedder.run(documents)
    assert embedder._encoder is None  # refused before loading anything


EVAL_QUERIES = [("1", "what problems of heat conduction in composite slabs have been solved"),
                ("2", "flutter of swept wings in a wind tunnel")]
EVAL_QRELS = "query-id\tcorpus-id\tscore\n1\td1\t1\n2\td6\t1\n"


@pytest.mark.skipif(not HAS_CT2, reason="backend='ctranslate2' needs the ctranslate2 package")
def test_expandr_eval_encoder_backend(write_beir, tmp_path, ct2_home, capsys, monkeypatch):
    """`expandr eval --encoder-backend ctranslate2`: documents and queries through CTranslate2, named in --json."""
    import json

    from expandr_haystack.cli import main
    from expandr_haystack.evaluation import evaluate, indexing
    from expandr_haystack.evaluation.data import load_collection

    backends = []
    build = indexing.build_document_store
    monkeypatch.setattr(indexing, "build_document_store",
                        lambda *a, encoder=None, **k: (backends.append(encoder), build(*a, encoder=encoder, **k))[1])
    embed = ExpandRQueryEmbedder.warm_up
    monkeypatch.setattr(ExpandRQueryEmbedder, "warm_up",
                        lambda self: (backends.append(self.encoder_options.backend), embed(self))[1])

    beir = write_beir(EVAL_QUERIES, EVAL_QRELS)
    out = tmp_path / "res.json"
    assert main(["eval", str(beir), "--methods", "dense,prf", "--encoder-backend", "ctranslate2", "--no-progress",
                 "--json", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["provenance"]["encoder"]["backend"] == "ctranslate2"
    assert backends[0] == {"backend": "ctranslate2"} and set(backends[1:]) == {"ctranslate2"}, backends  # index, query
    assert written["methods"]["dense"]["ndcg@10"] == pytest.approx(1.0)
    assert main(["eval", str(beir), "--methods", "dense,haystack_multiquery", "--encoder-backend", "ctranslate2",
                 "--no-progress"]) == 1
    assert "haystack_multiquery" in capsys.readouterr().err
    collection = load_collection(beir, "test")
    result = evaluate(collection, "dense", encoder_options=CT2, progress_bar=False)
    assert result["dense"]["ndcg@10"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="haystack_multiquery"):
        evaluate(collection, "haystack_multiquery", encoder_options=CT2, progress_bar=False)
