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
from expandr_haystack.options import EncoderOptions

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
    ours = ExpandRQueryEmbedder(model=tiny_bert, device=CPU, encoder=EncoderOptions(truncate_dim=8), suffix=" ?",
                                normalize_embeddings=True)
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
    prompted = ExpandRQueryEmbedder(model=tiny_bert, device=CPU,
                                    encoder=EncoderOptions(encode_kwargs={"prompt": "query: "}))
    prefixed = ExpandRQueryEmbedder(model=tiny_bert, device=CPU, prefix="query: ")
    np.testing.assert_allclose(prompted.run(query=QUERY)["embedding"], prefixed.run(query=QUERY)["embedding"],
                               atol=1e-6)
    with pytest.raises(ValueError, match=r"normalize_embeddings"):
        ExpandRQueryEmbedder(encoder={"encode_kwargs": {"normalize_embeddings": False}})


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
    embedder = ExpandRQueryEmbedder(model=tiny_bert, device=CPU, encoder=EncoderOptions(**options))
    embedder.warm_up()
    scorer = RewardScorer(model=tiny_bert, device=CPU, encoder=EncoderOptions(**options))
    scorer.warm_up()
    assert len(_Recorder.calls) == 1  # one shared instance for the same model and options
    loaded = _Recorder.calls[0]
    assert loaded.path == tiny_bert and loaded.max_seq_length == 48
    assert loaded.kwargs == {"device": "cpu", "token": "hf_secret", "trust_remote_code": True, "revision": "v1",
                             "local_files_only": True, "truncate_dim": 16,
                             "model_kwargs": {"attn_implementation": "eager"},
                             "processor_kwargs": {"model_max_length": 48},
                             "config_kwargs": {"hidden_dropout_prob": 0.0}, "backend": "onnx"}
    ExpandRQueryEmbedder(model=tiny_bert, device=CPU, encoder=EncoderOptions(backend="openvino")).warm_up()
    assert len(_Recorder.calls) == 2 and _Recorder.calls[1].kwargs["backend"] == "openvino"
    with pytest.raises(ValueError, match="backend"):
        ExpandRQueryEmbedder(encoder={"backend": "tensorflow"})


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
                                    encoder=EncoderOptions(token=Secret.from_env_var("MY_HF_TOKEN"),
                                                           trust_remote_code=True,
                                                           model_kwargs={"torch_dtype": torch.float16},
                                                           tokenizer_kwargs={"model_max_length": 64},
                                                           encode_kwargs={"prompt_name": None}, truncate_dim=128),
                                    normalize_embeddings=True)
    data = embedder.to_dict()
    params = data["init_parameters"]["encoder"]["init_parameters"]
    assert params["token"] == {"type": "env_var", "env_vars": ["MY_HF_TOKEN"], "strict": True}
    assert params["model_kwargs"] == {"torch_dtype": "torch.float16"}
    # serialising leaves the component unchanged
    assert embedder.encoder_options.model_kwargs == {"torch_dtype": torch.float16}
    snapshot = repr(data)
    back = ExpandRQueryEmbedder.from_dict(data)
    assert repr(data) == snapshot  # the input is not modified
    assert isinstance(back.encoder_options.token, Secret) and back.encoder_options.token.to_dict() == params["token"]
    assert back.encoder_options.model_kwargs == {"torch_dtype": torch.float16}
    for name in ("query_weight", "prefix", "expansion_prefix", "normalize_embeddings"):
        assert getattr(back, name) == getattr(embedder, name), name
    for name in ("trust_remote_code", "tokenizer_kwargs", "encode_kwargs", "truncate_dim"):
        assert getattr(back.encoder_options, name) == getattr(embedder.encoder_options, name), name
    assert back.to_dict() == data
    with pytest.raises(ValueError):  # a plain token never lands in a YAML file (Haystack's Secret refuses)
        ExpandRQueryEmbedder(encoder=EncoderOptions(token=Secret.from_token("hf_x"))).to_dict()

    scorer = RewardScorer(threshold=0.4, prefix="query: ", document_prefix="passage: ",
                          encoder=EncoderOptions(token=Secret.from_env_var("MY_HF_TOKEN"), backend="torch"))
    again = RewardScorer.from_dict(scorer.to_dict())
    assert (again.prefix, again.document_prefix, again.threshold) == ("query: ", "passage: ", 0.4)
    assert again.to_dict() == scorer.to_dict()


def test_default_token_is_the_hf_environment_and_old_yaml_loads(monkeypatch):
    from pathlib import Path

    monkeypatch.delenv("HF_API_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    embedder = ExpandRQueryEmbedder()
    assert embedder.encoder_options.token.resolve_value() == "hf_from_env"
    assert embedder.to_dict()["init_parameters"]["encoder"]["init_parameters"]["token"] == {
        "type": "env_var", "env_vars": ["HF_API_TOKEN", "HF_TOKEN"], "strict": False}
    text = (Path(__file__).parents[1] / "data" / "pipeline_v0.1.0.yaml").read_text()
    pipeline = Pipeline.loads(text)
    old = pipeline.get_component("embedder")
    assert (old.query_weight, old.prefix, old.expansion_prefix, old.precision) == (0.6, "", None, "float32")
    assert old.encoder_options.token.to_dict()["env_vars"] == ["HF_API_TOKEN", "HF_TOKEN"]
    assert pipeline.get_component("scorer").document_prefix == ""


# -- issue 23: the encoder options as one `EncoderOptions` group ---------------------------------------------------
def _saved_2026_12_05(name):
    import json
    from pathlib import Path

    return json.loads((Path(__file__).parents[1] / "data" / "saved_2026-12-05" / "components.json").read_text())[name]


@pytest.mark.parametrize("name,cls", [("embedder", ExpandRQueryEmbedder), ("scorer", RewardScorer)])
def test_dicts_saved_2026_12_05_load_with_the_same_settings_and_resave_grouped(name, cls):
    import copy
    import dataclasses
    import warnings

    saved = _saved_2026_12_05(name)
    frozen = copy.deepcopy(saved)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the flat keys keep their meaning: folded without a deprecation warning
        component = cls.from_dict(saved)
    assert saved == frozen  # the input is not modified
    flat = saved["init_parameters"]
    options = component.encoder_options
    assert (options.batch_size, options.truncate_dim, options.backend, options.progress_bar) == (
        8, 128 if name == "embedder" else None, "torch", False)
    assert options.token.to_dict() == flat["token"]
    assert component.device == ComponentDevice.from_str("cpu") and component.model is None
    if name == "embedder":
        assert (component.query_weight, component.prefix, component.expansion_prefix, component.normalize_embeddings,
                component.precision) == (0.6, "q: ", "", True, "float32")
    else:
        assert (component.threshold, component.prefix, component.document_prefix) == (0.5, "", "p: ")
        assert component.embedder is None  # it built its own embedder, with the saved options
        assert component._embedder.encoder_options == options and component._embedder.device == component.device

    # re-saved in the new layout: the encoder options nested under `encoder`, every setting as it was written
    data = component.to_dict()
    params = data["init_parameters"]
    group = params["encoder"]
    assert group["type"] == "expandr_haystack.options.EncoderOptions"
    fields = {f.name for f in dataclasses.fields(EncoderOptions)}
    assert not fields & set(params)
    for key, value in flat.items():
        assert (group["init_parameters"] if key in fields else params)[key] == value, key
    assert len(params) <= 12
    again = cls.from_dict(data)
    assert again.to_dict() == data and again.encoder_options == options


def test_scorer_shares_a_passed_embedder(tiny_bert, monkeypatch):
    from expandr_haystack import models
    from expandr_haystack.components import embedder as embedder_module

    loads = []

    def counting_load_encoder(*args, **kwargs):
        loads.append(args)
        return models.load_encoder(*args, **kwargs)

    monkeypatch.setattr(models, "_ENCODERS", {})
    monkeypatch.setattr(embedder_module, "load_encoder", counting_load_encoder)
    # the shared embedder's own (query) prefix is not put on the scorer's texts: the scorer puts each side's prefix
    shared = ExpandRQueryEmbedder(model=tiny_bert, device=CPU, prefix="query: ",
                                  encoder=EncoderOptions(batch_size=4))
    scorer = RewardScorer(embedder=shared, prefix="query: ", document_prefix="passage: ", threshold=-2)
    assert scorer._embedder is shared and scorer.embedder is shared
    assert (scorer.model, scorer.device, scorer.encoder_options) == (tiny_bert, CPU, shared.encoder_options)
    shared.warm_up()
    scorer.warm_up()
    out = scorer.run(query=QUERY, expansions=EXPANSIONS, document=DOCS[0], answer="Match Mach and density ratios.")
    assert len(loads) == 1  # one load, no private second embedder
    own = RewardScorer(model=tiny_bert, device=CPU, encoder=EncoderOptions(batch_size=4), prefix="query: ",
                       document_prefix="passage: ", threshold=-2)
    expected = own.run(query=QUERY, expansions=EXPANSIONS, document=DOCS[0], answer="Match Mach and density ratios.")
    np.testing.assert_allclose(out["document_similarities"], expected["document_similarities"], atol=1e-6)
    np.testing.assert_allclose(out["answer_similarities"], expected["answer_similarities"], atol=1e-6)

    # serialised nested (as Haystack's wrappers nest components), and loaded back as a shared embedder
    data = scorer.to_dict()
    params = data["init_parameters"]
    assert (params["model"], params["device"], params["encoder"]) == (None, None, None)
    assert params["embedder"] == shared.to_dict()
    back = RewardScorer.from_dict(data)
    assert isinstance(back.embedder, ExpandRQueryEmbedder) and back._embedder is back.embedder
    assert back.embedder.prefix == "query: " and back.encoder_options.batch_size == 4
    assert back.to_dict() == data

    for kwargs, named in (({"model": tiny_bert}, "`model`"), ({"device": CPU}, "`device`"),
                          ({"encoder": {"batch_size": 8}}, "`encoder`")):
        with pytest.raises(ValueError, match=rf"`embedder`.*{named}"):
            RewardScorer(embedder=shared, **kwargs)
    with pytest.raises(TypeError, match="`embedder`"):
        RewardScorer(embedder="all-MiniLM-L6-v2")


def test_inputs_are_checked_once_at_the_edge(tiny_bert, monkeypatch):
    from expandr_haystack.components import embedder as embedder_module
    from expandr_haystack.core.text import check_query

    embedder = ExpandRQueryEmbedder(model=tiny_bert, device=CPU, query_weight=0.6)
    calls = []

    def counting_check_query(*args, **kwargs):
        calls.append(args)
        return check_query(*args, **kwargs)

    monkeypatch.setattr(embedder_module, "check_query", counting_check_query)
    dirty = embedder.run(query="lift\x00 of wings", expansions=["thin\x07 wings lift", "  ", "\x00"])["embedding"]
    assert len(calls) == 1
    clean = embedder.run(query="lift of wings", expansions=["thin wings lift"])["embedding"]
    np.testing.assert_allclose(dirty, clean, atol=1e-6)
    # the trusted path of components that checked already (the retriever): the same vectors, no check
    calls.clear()
    trusted = embedder.fused_vectors(["lift of wings"], [["thin wings lift"]], 0.6)
    assert not calls
    np.testing.assert_allclose(trusted[0], clean, atol=1e-6)
    np.testing.assert_allclose(embedder.embed_fused(["lift of wings"], [["thin wings lift", " "]]), trusted,
                               atol=1e-6)
    with pytest.raises(TypeError, match="`queries`"):
        embedder.embed_fused("lift of wings")
    with pytest.raises(ValueError, match="one list per query"):
        embedder.embed_fused(["lift", "drag"], [["ok"]])
