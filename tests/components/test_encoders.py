"""
Encoders people use: the stock `SentenceTransformersTextEmbedder` options on `ExpandRQueryEmbedder` and
`RewardScorer`, checked against Haystack's own embedders with a second, differently shaped encoder (a tiny random
BERT with CLS pooling and 32 dimensions, built here from the bundled MiniLM tokenizer) and E5-style prefixes.
"""

from typing import ClassVar

import numpy as np
import pytest
from haystack import Document, Pipeline
from haystack.components.retrievers.in_memory import InMemoryEmbeddingRetriever
from haystack.document_stores.in_memory import InMemoryDocumentStore
from haystack.utils import ComponentDevice, Secret
from haystack_integrations.components.embedders.sentence_transformers import (
    SentenceTransformersDocumentEmbedder,
    SentenceTransformersTextEmbedder,
)

from expandr_haystack import ExpandRQueryEmbedder, RewardScorer
from expandr_haystack.core.fusion import fuse, unit

CPU = ComponentDevice.from_str("cpu")
DIM = 32
QUERY = "what similarity laws must be obeyed by aeroelastic models ?"
EXPANSIONS = ["Aeroelastic models must match the Mach number and the density ratio.",
              "Similarity of heated models needs the same temperature ratios."]
DOCS = [
    Document(id="a", content="similarity laws for aeroelastic models of heated high speed aircraft",
             meta={"title": "aeroelastic models"}),
    Document(id="b", content="buckling of thin cylindrical shells under axial compression", meta={"title": "shells"}),
    Document(id="c", content="flow separation in overexpanded rocket nozzles", meta={"title": "nozzles"}),
    Document(id="d", content="flutter of swept wings at transonic speeds", meta={"title": "flutter"}),
]


def _stock_text(model, **kwargs):
    embedder = SentenceTransformersTextEmbedder(model=model, device=CPU, progress_bar=False, **kwargs)
    embedder.warm_up()
    return embedder


def _vec(x):
    return np.asarray(x, dtype=np.float64)


def test_prefixed_query_equals_stock_embedder_and_matches_indexing(tiny_bert):
    store = InMemoryDocumentStore()
    indexing = SentenceTransformersDocumentEmbedder(model=tiny_bert, device=CPU, prefix="passage: ",
                                                    meta_fields_to_embed=["title"], normalize_embeddings=True,
                                                    progress_bar=False)
    indexing.warm_up()
    store.write_documents(indexing.run(documents=[Document(id=d.id, content=d.content, meta=d.meta)
                                                  for d in DOCS])["documents"])

    ours = ExpandRQueryEmbedder(model=tiny_bert, device=CPU, prefix="query: ", normalize_embeddings=True)
    stock = _stock_text(tiny_bert, prefix="query: ", normalize_embeddings=True)
    vector = ours.run(query=QUERY)["embedding"]
    assert ours.dimension == DIM and len(vector) == DIM
    np.testing.assert_allclose(vector, stock.run(text=QUERY)["embedding"], atol=1e-6)
    # the prefix is really applied: without it the vector is another one
    plain = ExpandRQueryEmbedder(model=tiny_bert, device=CPU).run(query=QUERY)["embedding"]
    assert not np.allclose(plain, vector, atol=1e-3)

    # indexing and querying agree: our encoder embeds a document exactly as the stock document embedder stored it
    stored = {d.id: d.embedding for d in store.filter_documents()}
    from expandr_haystack.core.text import document_text

    mine = ours.encode([document_text(d) for d in DOCS], prefix="passage: ", suffix="")
    np.testing.assert_allclose(mine, np.asarray([stored[d.id] for d in DOCS]), atol=1e-6)

    # the same hits with our vector and the stock one, through a stock retriever
    retriever = InMemoryEmbeddingRetriever(document_store=store, top_k=4)
    ours_hits = [d.id for d in retriever.run(query_embedding=vector)["documents"]]
    stock_hits = [d.id for d in retriever.run(query_embedding=stock.run(text=QUERY)["embedding"])["documents"]]
    assert ours_hits == stock_hits

    # with expansions: the fused vector of the stock embeddings of the prefixed texts (expansions: query's prefix)
    fused = ours.run(query=QUERY, expansions=EXPANSIONS)["embedding"]
    expected = unit(fuse(_vec(stock.run(text=QUERY)["embedding"]),
                         np.stack([_vec(stock.run(text=e)["embedding"]) for e in EXPANSIONS]), 0.5))
    np.testing.assert_allclose(fused, expected, atol=1e-6)
    assert np.linalg.norm(fused) == pytest.approx(1.0, abs=1e-6)


def test_expansion_prefix_embeds_expansions_as_pseudo_documents(tiny_bert):
    ours = ExpandRQueryEmbedder(model=tiny_bert, device=CPU, prefix="query: ", expansion_prefix="passage: ",
                                query_weight=0.7)
    query_side = _stock_text(tiny_bert, prefix="query: ", normalize_embeddings=True)
    doc_side = _stock_text(tiny_bert, prefix="passage: ", normalize_embeddings=True)
    expected = fuse(_vec(query_side.run(text=QUERY)["embedding"]),
                    np.stack([_vec(doc_side.run(text=e)["embedding"]) for e in EXPANSIONS]), 0.7)
    np.testing.assert_allclose(ours.run(query=QUERY, expansions=EXPANSIONS)["embedding"], expected, atol=1e-6)
    assert ours.expansion_text("x") == "passage: x" and ours.query_text("x") == "query: x"


def test_truncate_dim_and_binary_precision_match_stock(tiny_bert):
    ours = ExpandRQueryEmbedder(model=tiny_bert, device=CPU, truncate_dim=8, suffix=" ?", normalize_embeddings=True)
    stock = _stock_text(tiny_bert, truncate_dim=8, suffix=" ?", normalize_embeddings=True)
    assert ours.dimension == 8
    np.testing.assert_allclose(ours.run(query=QUERY)["embedding"], stock.run(text=QUERY)["embedding"], atol=1e-6)

    binary = ExpandRQueryEmbedder(model=tiny_bert, device=CPU, precision="binary").run(query=QUERY)["embedding"]
    assert binary == _stock_text(tiny_bert, precision="binary").run(text=QUERY)["embedding"]
    assert len(binary) == DIM // 8
    with pytest.raises(ValueError, match="quantization_ranges"):
        ExpandRQueryEmbedder(model=tiny_bert, precision="int8")


def test_encode_kwargs_reach_encode(tiny_bert):
    # sentence-transformers' `prompt` is a prefix too: the same vector as our `prefix`
    prompted = ExpandRQueryEmbedder(model=tiny_bert, device=CPU, encode_kwargs={"prompt": "query: "})
    prefixed = ExpandRQueryEmbedder(model=tiny_bert, device=CPU, prefix="query: ")
    np.testing.assert_allclose(prompted.run(query=QUERY)["embedding"], prefixed.run(query=QUERY)["embedding"],
                               atol=1e-6)
    with pytest.raises(ValueError, match=r"normalize_embeddings"):
        ExpandRQueryEmbedder(encode_kwargs={"normalize_embeddings": False})


class _Recorder:
    """Stands in for SentenceTransformer: records how the shared loader builds it."""

    calls: ClassVar[list] = []

    def __init__(self, path, **kwargs):
        self.path, self.kwargs, self.max_seq_length = path, kwargs, 512
        _Recorder.calls.append(self)


def test_loader_options_reach_sentence_transformer(tiny_bert, monkeypatch):
    import sentence_transformers

    from expandr_haystack import models

    monkeypatch.setattr(models, "_ENCODERS", {})
    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", _Recorder)
    _Recorder.calls = []
    options = {"token": Secret.from_token("hf_secret"), "trust_remote_code": True, "revision": "v1",
               "local_files_only": True, "truncate_dim": 16, "model_kwargs": {"attn_implementation": "eager"},
               "tokenizer_kwargs": {"model_max_length": 48}, "config_kwargs": {"hidden_dropout_prob": 0.0},
               "backend": "onnx"}
    embedder = ExpandRQueryEmbedder(model=tiny_bert, device=CPU, **options)
    embedder.warm_up()
    scorer = RewardScorer(model=tiny_bert, device=CPU, **options)
    scorer.warm_up()
    assert len(_Recorder.calls) == 1  # one shared instance for the same model and options
    loaded = _Recorder.calls[0]
    assert loaded.path == tiny_bert and loaded.max_seq_length == 48
    assert loaded.kwargs == {"device": "cpu", "token": "hf_secret", "trust_remote_code": True, "revision": "v1",
                             "local_files_only": True, "truncate_dim": 16,
                             "model_kwargs": {"attn_implementation": "eager"},
                             "processor_kwargs": {"model_max_length": 48},
                             "config_kwargs": {"hidden_dropout_prob": 0.0}, "backend": "onnx"}
    ExpandRQueryEmbedder(model=tiny_bert, device=CPU, backend="openvino").warm_up()
    assert len(_Recorder.calls) == 2 and _Recorder.calls[1].kwargs["backend"] == "openvino"
    with pytest.raises(ValueError, match="backend"):
        ExpandRQueryEmbedder(backend="tensorflow")


def test_reward_scorer_prefixes_match_the_indexing_and_query_sides(tiny_bert):
    doc = DOCS[0]
    scorer = RewardScorer(model=tiny_bert, device=CPU, prefix="query: ", document_prefix="passage: ", threshold=-2)
    out = scorer.run(query=QUERY, expansions=EXPANSIONS, document=doc, answer="Match Mach and density ratios.")
    indexing = SentenceTransformersDocumentEmbedder(model=tiny_bert, device=CPU, prefix="passage: ",
                                                    meta_fields_to_embed=["title"], normalize_embeddings=True,
                                                    progress_bar=False)
    indexing.warm_up()
    d = _vec(indexing.run(documents=[Document(content=doc.content, meta=doc.meta)])["documents"][0].embedding)
    query_side = _stock_text(tiny_bert, prefix="query: ", normalize_embeddings=True)
    answer = _vec(_stock_text(tiny_bert, prefix="passage: ", normalize_embeddings=True)
                  .run(text="Match Mach and density ratios.")["embedding"])
    for e, doc_sim, ans_sim in zip(EXPANSIONS, out["document_similarities"], out["answer_similarities"]):
        v = _vec(query_side.run(text=e)["embedding"])
        assert doc_sim == pytest.approx(float(v @ d), abs=1e-5)
        assert ans_sim == pytest.approx(float(v @ answer), abs=1e-5)


def test_serialization_round_trip_with_token_and_dtype(monkeypatch):
    import torch

    embedder = ExpandRQueryEmbedder(query_weight=0.7, prefix="query: ", expansion_prefix="passage: ",
                                    token=Secret.from_env_var("MY_HF_TOKEN"), trust_remote_code=True,
                                    model_kwargs={"torch_dtype": torch.float16}, tokenizer_kwargs={"model_max_length": 64},
                                    encode_kwargs={"prompt_name": None}, truncate_dim=128, normalize_embeddings=True)
    data = embedder.to_dict()
    params = data["init_parameters"]
    assert params["token"] == {"type": "env_var", "env_vars": ["MY_HF_TOKEN"], "strict": True}
    assert params["model_kwargs"] == {"torch_dtype": "torch.float16"}
    assert embedder.model_kwargs == {"torch_dtype": torch.float16}  # serialising leaves the component unchanged
    snapshot = repr(data)
    back = ExpandRQueryEmbedder.from_dict(data)
    assert repr(data) == snapshot  # the input is not modified
    assert isinstance(back.token, Secret) and back.token.to_dict() == params["token"]
    assert back.model_kwargs == {"torch_dtype": torch.float16}
    for name in ("query_weight", "prefix", "expansion_prefix", "trust_remote_code", "tokenizer_kwargs",
                 "encode_kwargs", "truncate_dim", "normalize_embeddings"):
        assert getattr(back, name) == getattr(embedder, name), name
    assert back.to_dict() == data
    with pytest.raises(ValueError):  # a plain token never lands in a YAML file (Haystack's Secret refuses)
        ExpandRQueryEmbedder(token=Secret.from_token("hf_x")).to_dict()

    scorer = RewardScorer(threshold=0.4, prefix="query: ", document_prefix="passage: ",
                          token=Secret.from_env_var("MY_HF_TOKEN"), backend="torch")
    again = RewardScorer.from_dict(scorer.to_dict())
    assert (again.prefix, again.document_prefix, again.threshold) == ("query: ", "passage: ", 0.4)
    assert again.to_dict() == scorer.to_dict()


def test_default_token_is_the_hf_environment_and_old_yaml_loads(monkeypatch):
    from pathlib import Path

    monkeypatch.delenv("HF_API_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    embedder = ExpandRQueryEmbedder()
    assert embedder.token.resolve_value() == "hf_from_env"
    assert embedder.to_dict()["init_parameters"]["token"] == {"type": "env_var", "env_vars": ["HF_API_TOKEN",
                                                                                            "HF_TOKEN"],
                                                              "strict": False}
    text = (Path(__file__).parents[1] / "data" / "pipeline_v0.1.0.yaml").read_text()
    pipeline = Pipeline.loads(text)
    old = pipeline.get_component("embedder")
    assert (old.query_weight, old.prefix, old.expansion_prefix, old.precision) == (0.6, "", None, "float32")
    assert old.token.to_dict()["env_vars"] == ["HF_API_TOKEN", "HF_TOKEN"]
    assert pipeline.get_component("scorer").document_prefix == ""
