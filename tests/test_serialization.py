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
