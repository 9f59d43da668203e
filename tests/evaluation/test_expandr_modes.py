"""Grounded expansion, Rocchio feedback, validation-chosen fusion settings, seeds and paired tests (issue #12)."""

from __future__ import annotations

from typing import Any

import pytest
from haystack import Document, Pipeline, component, default_to_dict
from haystack.dataclasses import ChatMessage

from expandr_haystack import GROUNDED_PROMPT, ExpandRRetriever, LLMQueryExpander
from expandr_haystack.core.text import format_passages
from expandr_haystack.evaluation.data import load_collection
from expandr_haystack.evaluation.protocol import evaluate_seeds, select_settings
from expandr_haystack.evaluation.stats import mean_sd, paired_randomization_test, paired_t_test
from expandr_haystack.options import FusionSettings, SamplerOptions

QUERIES = [(str(i), q) for i, q in enumerate([
    "heat conduction in slabs", "laws for models of heated aircraft", "shells under compression",
    "separation in nozzles", "flutter of wings", "transition of boundary layers"], start=1)]
QRELS = "query-id\tcorpus-id\tscore\n" + "".join(f"{i}\td{i}\t1\n" for i, _ in QUERIES)


@component
class EchoGenerator:
    """A stand-in chat model: writes the first passage it was shown (grounded), or a fixed text, per sample."""

    def __init__(self, fixed: str = "An unrelated passage about cooking pasta.", fail_on: str | None = None):
        self.fixed = fixed
        self.fail_on = fail_on
        self.prompts: list[str] = []

    def to_dict(self) -> dict[str, Any]:
        return default_to_dict(self, fixed=self.fixed, fail_on=self.fail_on)

    @component.output_types(replies=list[ChatMessage])
    def run(self, messages: list[ChatMessage], generation_kwargs: dict[str, Any] | None = None):
        text = messages[-1].text
        self.prompts.append(text)
        if self.fail_on and self.fail_on in text:
            raise ConnectionError("HTTP 500")
        if "[1] " in text:
            return {"replies": [ChatMessage.from_assistant(text.split("[1] ", 1)[1].split("\n", 1)[0])]}
        return {"replies": [ChatMessage.from_assistant(self.fixed)]}


@pytest.fixture()
def beir(write_beir):
    return write_beir(QUERIES, QRELS, splits=("test", "train"))


# -- pure pieces ------------------------------------------------------------------------------------------------
def test_format_passages_keeps_k_documents_and_words():
    docs = [Document(content="one two three four five", meta={"title": "Title A ."}), "plain text passage",
            Document(content="never shown")]
    block = format_passages(docs, k=2, words=4)
    assert block == "[1] Title A. one two\n[2] plain text passage"


def test_split_validation_is_disjoint_seeded_and_complete(beir):
    train = load_collection(beir, "train")
    rest, validation = train.split_validation(size=2, seed=0)
    assert len(validation.queries) == 2 and len(rest.queries) == 4
    assert set(rest.queries) | set(validation.queries) == set(train.queries)
    assert not set(rest.queries) & set(validation.queries)
    assert set(validation.qrels) == set(validation.queries)
    assert train.split_validation(size=2, seed=0)[1].queries == validation.queries
    assert train.split_validation(size=0.5, seed=0)[1].queries.keys().__len__() == 3
    with pytest.raises(ValueError, match="`size`"):
        train.split_validation(size=6)


def test_paired_tests_tell_noise_from_a_shift():
    same = {str(q): 0.1 * (q % 7) for q in range(40)}
    assert paired_randomization_test(same, same) == 1.0 and paired_t_test(same, same) == 1.0
    shifted = {q: v + 0.05 + 0.01 * (int(q) % 3) for q, v in same.items()}
    assert paired_randomization_test(shifted, same) < 0.001 and paired_t_test(shifted, same) < 0.001
    noisy = {q: v + (0.05 if int(q) % 2 else -0.05) for q, v in same.items()}  # mean shift 0
    assert paired_randomization_test(noisy, same) > 0.5
    assert mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0) and mean_sd([4.0]) == (4.0, 0.0)
    with pytest.raises(ValueError, match="no query id"):
        paired_randomization_test({"a": 1.0}, {"b": 1.0})


# -- the expander ------------------------------------------------------------------------------------------------
def test_grounded_expander_reads_the_passages_and_caches_by_them(tmp_path):
    gen = EchoGenerator()
    expander = LLMQueryExpander(chat_generator=gen, prompt=GROUNDED_PROMPT, passages_k=2, passage_words=6,
                                cache=str(tmp_path / "c.sqlite"))
    hits = [Document(content="Similarity laws for aeroelastic models", meta={"title": "Aeroelastic"}),
            Document(content="Flutter of swept wings", meta={"title": "Flutter"}), Document(content="third")]
    out = expander.run(query="aeroelastic model laws", documents=hits)
    assert out["expansions"] == ["Aeroelastic. Similarity laws for aeroelastic models"]
    assert "[2] Flutter. Flutter of swept wings" in gen.prompts[0] and "third" not in gen.prompts[0]
    assert "Question: aeroelastic model laws" in gen.prompts[0]
    expander.run(query="aeroelastic model laws", documents=hits)  # cache hit
    assert len(gen.prompts) == 1
    expander.run(query="aeroelastic model laws", documents=hits[1:])  # other passages: another cache row
    assert len(gen.prompts) == 2
    with pytest.raises(ValueError, match="passages"):
        expander.run(query="aeroelastic model laws")
    with pytest.raises(ValueError, match="not both"):
        LLMQueryExpander(prompt="{document} {passages} {query}")


def test_one_failing_row_never_costs_the_batch(caplog):
    gen = EchoGenerator(fail_on="nozzles")
    expander = LLMQueryExpander(chat_generator=gen, n_expansions=2,
                                sampler=SamplerOptions(max_retries=1, retry_backoff=0.0))
    queries = ["heat conduction in slabs", "separation in nozzles", "flutter of wings"]
    out = expander.expand(queries)
    assert [len(x) for x in out] == [2, 0, 2]
    assert expander.last_failures == {1: 2}
    assert "skipped (on_failure='skip')" in caplog.text
    strict = LLMQueryExpander(chat_generator=EchoGenerator(fail_on="nozzles"), sampler=SamplerOptions(max_retries=0),
                              on_failure="raise")
    with pytest.raises(RuntimeError, match="nozzles"):
        strict.expand(queries)


# -- retrieval with the bundled encoder ---------------------------------------------------------------------------
@pytest.mark.integration
def test_grounded_pipeline_and_rocchio_feedback(beir):
    from expandr_haystack.evaluation.indexing import build_document_store

    collection = load_collection(beir, "test")
    store = build_document_store(collection.documents(), progress_bar=False)
    p = Pipeline()
    p.add_component("first_pass", ExpandRRetriever(document_store=store, top_k=2))
    p.add_component("expander", LLMQueryExpander(chat_generator=EchoGenerator(), prompt=GROUNDED_PROMPT))
    p.add_component("retriever", ExpandRRetriever(document_store=store, top_k=3, fusion=FusionSettings(query_weight=0.7)))
    p.connect("first_pass.documents", "expander.documents")
    p.connect("expander.query", "retriever.query")
    p.connect("expander.expansions", "retriever.expansions")
    query = "laws for models of heated aircraft"
    out = p.run({"first_pass": {"query": query}, "expander": {"query": query}})
    assert out["retriever"]["documents"][0].id == "d2"
    # the YAML round trip keeps the grounded prompt and the wiring
    loaded = Pipeline.loads(p.dumps(), allowed_modules=[__name__])
    assert loaded.get_component("expander").prompt == GROUNDED_PROMPT

    retriever = ExpandRRetriever(document_store=store, top_k=6)
    plain = retriever.retrieve([query])[0]
    feedback = retriever.retrieve([query], feedback_k=2, feedback_weight=0.5)[0]
    assert {d.id for d in feedback} == {d.id for d in plain}
    assert [d.score for d in feedback] != [d.score for d in plain]  # the query vector moved towards its top hits
    same = retriever.retrieve([query], feedback_k=2, feedback_weight=1.0)[0]
    assert [d.id for d in same] == [d.id for d in plain]  # f = 1: the query alone
    with pytest.raises(ValueError, match="`feedback_weight`"):
        retriever.retrieve([query], feedback_k=2, feedback_weight=2.0)


@pytest.mark.integration
def test_select_settings_switches_off_a_useless_expansion_and_keeps_a_useful_one(beir):
    validation = load_collection(beir, "train")
    useless = LLMQueryExpander(chat_generator=EchoGenerator())  # always "cooking pasta"
    grounded = LLMQueryExpander(chat_generator=EchoGenerator(), prompt=GROUNDED_PROMPT, passages_k=1)
    settings = select_settings(validation, ["prf", "expand", "grounded"], expander=useless,
                               grounded_expander=grounded, weight_grid=(0.0, 0.5, 1.0),
                               feedback_grid=((1, 0.5), (2, 0.9)))
    assert settings.query_weight["expand"] == 1.0  # pasta only hurts: w = 1 (the query alone)
    grounded_scores = settings.validation["grounded"]
    assert set(grounded_scores) == {"w=0", "w=0.5", "w=1"}
    assert grounded_scores[f"w={settings.query_weight['grounded']:g}"] == max(grounded_scores.values())
    assert (settings.feedback_k, settings.feedback_weight) in ((1, 0.5), (2, 0.9))
    assert set(settings.validation) == {"prf", "expand", "grounded"} and settings.queries == 6

    report = evaluate_seeds(load_collection(beir, "test"), ["dense", "prf", "expand"], seeds=(1, 2),
                            expander=useless, progress_bar=False, **settings.evaluate_kwargs())
    assert report.rows["dense"]["seeds"] == 0 and report.rows["expand"]["seeds"] == 2
    assert report.rows["expand"]["ndcg@10_sd"] == 0.0  # a deterministic "LLM": no spread between seeds
    row = report.compare("expand", "dense")
    assert row["delta_ndcg@10"] == 0.0 and row["p_randomization"] == 1.0  # w = 1 is the dense run
    assert "expand vs dense" in report.table()
