import pytest
from haystack import Pipeline
from haystack.core.errors import DeserializationError
from haystack.document_stores.in_memory import InMemoryDocumentStore
from haystack.utils import ComponentDevice

from expandr_haystack import ExpandRQueryEmbedder, ExpandRRetriever, LLMQueryExpander


def _pipeline():
    store = InMemoryDocumentStore(embedding_similarity_function="cosine")
    p = Pipeline()
    p.add_component("expander", LLMQueryExpander(n_expansions=2, temperature=0.7, cache="x.sqlite",
                                                 device=ComponentDevice.from_str("cpu"), backend="transformers"))
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
    assert (exp.n_expansions, exp.temperature, exp.cache, exp.backend) == (2, 0.7, "x.sqlite", "transformers")
    assert exp.device == ComponentDevice.from_str("cpu")
    assert q.get_component("retriever").fusion == "rrf"
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
    for component in (LLMQueryExpander(device=ComponentDevice.from_str("cpu"), n_expansions=3),
                      ExpandRQueryEmbedder(device=ComponentDevice.from_str("cpu"), query_weight=0.7),
                      ExpandRRetriever(document_store=store, device=ComponentDevice.from_str("cpu"), query_weight=0.8),
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
    assert (expander.n_expansions, expander.temperature, expander.on_failure, expander.system_prompt) == (
        2, 0.7, "skip", "Be brief.")
    assert expander.device == ComponentDevice.from_str("cpu")
    retriever = p.get_component("retriever")
    assert (retriever.fusion, retriever.query_weight, retriever.top_k) == ("rrf", 0.7, 5)
    assert retriever.document_store.index == "legacy" and retriever.query_embedder is None
    assert p.get_component("embedder").query_weight == 0.6
    assert p.get_component("scorer").threshold == 0.5


def test_retriever_composed_with_an_embedder_round_trips():
    embedder = ExpandRQueryEmbedder(query_weight=0.7)
    retriever = ExpandRRetriever(document_store=InMemoryDocumentStore(), query_embedder=embedder, query_weight=0.7)
    assert retriever.embedder is embedder
    back = ExpandRRetriever.from_dict(retriever.to_dict())
    assert isinstance(back.query_embedder, ExpandRQueryEmbedder) and back.query_embedder.query_weight == 0.7
    with pytest.raises(ValueError, match="`model`"):
        ExpandRRetriever(document_store=InMemoryDocumentStore(), model="org/other", query_embedder=embedder)
