"""Bad input: each a clear error naming the argument (no model is loaded here)."""

import pytest
from haystack.document_stores.in_memory import InMemoryDocumentStore

from expandr_haystack import ExpandRQueryEmbedder, ExpandRRetriever, LLMQueryExpander
from expandr_haystack.core.text import check_query as _check_query


@pytest.mark.parametrize("kwargs,match", [
    ({"n_expansions": 0}, "n_expansions"),
    ({"n_expansions": -2}, "n_expansions"),
    ({"generation": {"temperature": -0.1}}, "temperature"),
    ({"generation": {"top_p": 0}}, "top_p"),
    ({"prompt": "no placeholder"}, r"\{query\}"),
    ({"generation": {"max_new_tokens": 0}}, "max_new_tokens"),
    ({"on_failure": "ignore"}, "on_failure"),
    ({"sampler": {"engine": "onnx"}}, "engine"),
])
def test_expander_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LLMQueryExpander(**kwargs)


def test_expander_missing_paths():
    with pytest.raises(FileNotFoundError, match="`model`"):
        LLMQueryExpander(model="./no/such/model")
    with pytest.raises(FileNotFoundError, match="`adapter`"):
        LLMQueryExpander(adapter="/no/such/adapter")


@pytest.mark.parametrize("query,exc,match", [
    ("", ValueError, "non-empty"),
    ("   \n\t", ValueError, "non-empty"),
    (None, TypeError, "must be a str"),
    (42, TypeError, "must be a str"),
    ("\x00\x01\x02", ValueError, "control characters"),
])
def test_query_checks(query, exc, match):
    with pytest.raises(exc, match=match):
        _check_query(query)


def test_query_control_chars_and_lone_surrogates_are_cleaned():
    assert _check_query("lift\x00 of\x07 wings") == "lift of wings"
    assert _check_query("bad \ud800 unicode") == "bad ? unicode"


def test_retriever_settings():
    store = InMemoryDocumentStore()
    with pytest.raises(ValueError, match="fusion"):
        ExpandRRetriever(store, fusion="max")
    with pytest.raises(ValueError, match="top_k"):
        ExpandRRetriever(store, top_k=0)
    with pytest.raises(ValueError, match="search"):
        ExpandRRetriever(store, search="bm25")
    with pytest.raises(TypeError, match="document_store"):
        ExpandRRetriever(document_store="not a store")
    with pytest.raises(FileNotFoundError, match="`model`"):
        ExpandRRetriever(store, model="/no/such/encoder")


def test_embedder_settings():
    with pytest.raises(ValueError, match="query_weight"):
        ExpandRQueryEmbedder(query_weight=1.5)


def test_options_that_would_be_ignored_or_fail_late_are_refused_at_construction():
    """Settings accepted before and then silently ignored (feedback with rrf), impossible (a threshold no summed
    cosine reaches), or failing only at run time (a `cache` that is not a path, e.g. `cache: 42` in a YAML)."""
    from haystack import Pipeline
    from haystack.core.errors import DeserializationError

    from expandr_haystack import RewardScorer
    from expandr_haystack.options import FusionSettings

    rrf_feedback = r"`feedback_k`=3 \(pseudo-relevance feedback\) applies to `{0}`='mean' only; with `{0}`='rrf'"
    with pytest.raises(ValueError, match=rrf_feedback.format("method")):
        FusionSettings(method="rrf", feedback_k=3)
    with pytest.raises(ValueError, match=rrf_feedback.format("method")):
        ExpandRRetriever(InMemoryDocumentStore(), fusion={"method": "rrf", "feedback_k": 3})
    with pytest.raises(ValueError, match=rrf_feedback.format("method")):
        FusionSettings(feedback_k=3).replace(method="rrf")
    retriever = ExpandRRetriever(InMemoryDocumentStore(), fusion=FusionSettings(feedback_k=3))
    with pytest.raises(ValueError, match=rrf_feedback.format("fusion")):  # per call, before any model loads
        retriever.retrieve(["what is lift"], fusion="rrf", feedback_k=3)
    assert retriever._plan(["q"], [[]], None, None, fusion="rrf").feedback_k == 0  # the init feedback: mean only

    for threshold in (5, 2.01, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"`threshold` must be a number <= 2; got"):
            RewardScorer(threshold=threshold)
    assert RewardScorer(threshold=2).threshold == 2.0 and RewardScorer(threshold=-10).threshold == -10.0  # keep all

    for cache in (42, "", "  ", ["a.sqlite"]):
        with pytest.raises(ValueError, match=r"`cache` must be a file path \(str or Path\) or None"):
            LLMQueryExpander(cache=cache)
    yaml = Pipeline()
    yaml.add_component("expander", LLMQueryExpander(cache="x.sqlite"))
    with pytest.raises(DeserializationError, match=r"`cache` must be a file path"):  # when it loads, not runs
        Pipeline.loads(yaml.dumps().replace("cache: x.sqlite", "cache: 42"))
