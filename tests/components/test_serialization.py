from pathlib import Path

import pytest
from haystack import Pipeline
from haystack.core.errors import DeserializationError
from haystack.document_stores.in_memory import InMemoryDocumentStore
from haystack.utils import ComponentDevice

from expandr_haystack import ExpandRQueryEmbedder, ExpandRRetriever, LLMQueryExpander
from expandr_haystack.options import FusionSettings, GenerationSettings, SamplerOptions


def _pipeline():
    store = InMemoryDocumentStore(embedding_similarity_function="cosine")
    p = Pipeline()
    p.add_component("expander", LLMQueryExpander(n_expansions=2, generation=GenerationSettings(temperature=0.7),
                                                 cache="x.sqlite",
                                                 sampler=SamplerOptions(device=ComponentDevice.from_str("cpu"),
                                                                        engine="transformers")))
    p.add_component("embedder", ExpandRQueryEmbedder(query_weight=0.6))
    p.add_component("retriever", ExpandRRetriever(document_store=store, top_k=5, fusion="rrf"))
    p.connect("expander.query", "retriever.query")
    p.connect("expander.expansions", "retriever.expansions")
    return p


def test_yaml_round_trip_keeps_every_setting():
    p = _pipeline()
    text = p.dumps()
    assert "expandr_haystack.components.expander.LLMQueryExpander" in text
    q = Pipeline.loads(text)
    assert q.dumps() == text
    exp = q.get_component("expander")
    assert (exp.n_expansions, exp.generation.temperature, exp.cache, exp.sampler_options.engine) == (
        2, 0.7, "x.sqlite", "transformers")
    assert exp.sampler_options.device == ComponentDevice.from_str("cpu")
    assert q.get_component("retriever").fusion.method == "rrf"
    assert q.get_component("embedder").query_weight == 0.6


def test_unknown_module_is_still_refused():
    text = _pipeline().dumps().replace("expandr_haystack.components.embedder.ExpandRQueryEmbedder",
                                       "os.ExpandRQueryEmbedder")
    with pytest.raises(DeserializationError, match="allowlist"):
        Pipeline.loads(text)


def test_chat_generator_secret_is_not_serialized(monkeypatch):
    from haystack.components.generators.chat import OpenAIChatGenerator
    from haystack.utils import Secret

    monkeypatch.setenv("MY_KEY", "sk-secret-value")
    gen = OpenAIChatGenerator(api_key=Secret.from_env_var("MY_KEY"), model="gpt-4o-mini")
    exp = LLMQueryExpander(chat_generator=gen)
    d = exp.to_dict()
    assert "sk-secret-value" not in str(d)
    back = LLMQueryExpander.from_dict(d)
    assert type(back.chat_generator).__name__ == "OpenAIChatGenerator"
    assert back.chat_generator.api_key.resolve_value() == "sk-secret-value"


def test_from_dict_leaves_its_input_unchanged():
    import copy

    from expandr_haystack import RewardScorer

    store = InMemoryDocumentStore()
    for component in (LLMQueryExpander(sampler=SamplerOptions(device=ComponentDevice.from_str("cpu")), n_expansions=3),
                      ExpandRQueryEmbedder(device=ComponentDevice.from_str("cpu"), query_weight=0.7),
                      ExpandRRetriever(document_store=store, device=ComponentDevice.from_str("cpu"),
                                       fusion=FusionSettings(query_weight=0.8)),
                      RewardScorer(threshold=0.4, device=ComponentDevice.from_str("cpu"))):
        data = component.to_dict()
        frozen = copy.deepcopy(data)
        first = type(component).from_dict(data)
        assert data == frozen  # nothing replaced in place
        second = type(component).from_dict(data)  # so a second load sees the serialized form again
        assert first.to_dict() == second.to_dict() == frozen


def test_pipeline_yaml_written_by_0_1_0_still_loads():
    from pathlib import Path

    text = (Path(__file__).parents[1] / "data" / "pipeline_v0.1.0.yaml").read_text()
    p = Pipeline.loads(text)
    expander = p.get_component("expander")
    assert (expander.n_expansions, expander.generation.temperature, expander.on_failure, expander.system_prompt) == (
        2, 0.7, "skip", "Be brief.")
    assert expander.sampler_options.device == ComponentDevice.from_str("cpu")
    retriever = p.get_component("retriever")
    assert (retriever.fusion.method, retriever.fusion.query_weight, retriever.top_k) == ("rrf", 0.7, 5)
    assert retriever.document_store.index == "legacy" and retriever.query_embedder is None
    assert p.get_component("embedder").query_weight == 0.6
    assert p.get_component("scorer").threshold == 0.5


def test_retriever_composed_with_an_embedder_round_trips():
    embedder = ExpandRQueryEmbedder(query_weight=0.7)
    retriever = ExpandRRetriever(document_store=InMemoryDocumentStore(), query_embedder=embedder,
                                 fusion=FusionSettings(query_weight=0.7))
    assert retriever.embedder is embedder
    back = ExpandRRetriever.from_dict(retriever.to_dict())
    assert isinstance(back.query_embedder, ExpandRQueryEmbedder) and back.query_embedder.query_weight == 0.7
    with pytest.raises(ValueError, match="`model`"):
        ExpandRRetriever(document_store=InMemoryDocumentStore(), model="org/other", query_embedder=embedder)


SAVED = Path(__file__).parents[1] / "data" / "saved_2026-12-05"


def test_retriever_saved_with_backend_loads_as_search():
    """A retriever saved before issue 23 (`backend`, flat fusion keys) loads with the same settings."""
    import json

    data = json.loads((SAVED / "components.json").read_text())["retriever_store"]
    old = data["init_parameters"]
    with pytest.warns(DeprecationWarning, match="`backend` is now `search`"):
        retriever = ExpandRRetriever.from_dict(data)
    assert retriever.search_kind == "store" and type(retriever.searcher).__name__ == "StoreSearch"
    assert (retriever.filters, retriever.filter_policy.value, retriever.top_k, retriever.return_embedding) == (
        old["filters"], old["filter_policy"], old["top_k"], old["return_embedding"])
    assert retriever.fusion == FusionSettings(method=old["fusion"], query_weight=old["query_weight"])
    params = retriever.to_dict()["init_parameters"]
    assert params["search"] == "store" and "backend" not in params and "query_weight" not in params
    assert ExpandRRetriever.from_dict(retriever.to_dict()).to_dict() == retriever.to_dict()


@pytest.mark.integration
def test_pipeline_saved_on_2026_12_05_gives_the_same_documents():
    """tests/data/saved_2026-12-05/pipeline.yaml (saved by the version before issue 23): it loads, and over the same
    300 Cranfield documents its two retrievers return the documents and scores saved in results.json."""
    import json

    import numpy as np

    import expandr_haystack  # noqa: F401 (our module on Haystack's deserialization allow-list)
    from expandr_haystack.evaluation.data import bundled_path, load_collection
    from expandr_haystack.evaluation.indexing import indexing_pipeline

    expected = json.loads((SAVED / "results.json").read_text())
    p = Pipeline.loads((SAVED / "pipeline.yaml").read_text())
    mean, rrf = p.get_component("mean"), p.get_component("rrf")
    assert (mean.fusion.query_weight, mean.fusion.feedback_k, rrf.fusion.method, rrf.fusion.rrf_k) == (0.7, 2, "rrf", 30)
    assert rrf.embedder.encoder_options.batch_size == 16  # the old flat batch_size, now the embedder's
    store = mean.document_store
    assert rrf.document_store.storage is store.storage  # the YAML's shared index "saved-2026-12-05"
    store.delete_all_documents()
    documents = load_collection(bundled_path("cranfield"), split="test").documents()[:300]
    assert [d.id for d in documents] == expected["documents"]
    indexing_pipeline(store, progress_bar=False).run({"embedder": {"documents": documents}})
    for row in expected["results"]:
        out = p.run({"expander": {"query": row["query"]}})
        for name in ("mean", "rrf"):
            got = out[name]["documents"]
            assert [d.id for d in got] == [doc_id for doc_id, _ in row[name]], (row["query"], name)
            np.testing.assert_allclose([d.score for d in got], [s for _, s in row[name]], atol=1e-5)
    assert mean.refresh_index() is rrf.refresh_index()  # one FAISS index for both retrievers
