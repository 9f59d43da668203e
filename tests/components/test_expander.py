"""LLMQueryExpander with the real bundled SmolLM2-135M-Instruct (short generations to stay fast)."""

import asyncio
from pathlib import Path

import pytest
from haystack import Pipeline

from expandr_haystack import ExpandRRetriever, LLMQueryExpander
from expandr_haystack.core.text import ANSWER_PROMPT, GROUNDED_PROMPT
from expandr_haystack.options import GenerationSettings, SamplerOptions

pytestmark = pytest.mark.integration
QUERIES = ["what is the lift of a wing in a propeller slipstream .",
           "what problems of heat conduction in composite slabs have been solved so far ."]


@pytest.fixture(scope="module")
def expander(tmp_path_factory):
    e = LLMQueryExpander(generation=GenerationSettings(max_new_tokens=12), n_expansions=2,
                         cache=str(tmp_path_factory.mktemp("c") / "e.sqlite"))
    e.warm_up()
    e.warm_up()  # idempotent
    return e


def test_expansions_are_nonempty_cleaned_text(expander):
    out = expander.expand(QUERIES)
    assert [len(x) for x in out] == [2, 2]
    for texts in out:
        for t in texts:
            assert isinstance(t, str) and t.strip() == t and t
            assert not t.lower().startswith(("sure", "here is", "passage:"))


def test_cache_hits_cost_no_generation_and_seed_is_batch_independent(expander, tmp_path):
    first = expander.expand(QUERIES)
    before = dict(expander.cache_stats)
    again = expander.expand(QUERIES)
    after = expander.cache_stats
    assert again == first
    assert after["hits"] - before["hits"] == 4 and after["misses"] == before["misses"]
    # a fresh expander with the same seed and no cache gives the same texts (the same batches)
    assert LLMQueryExpander(generation=GenerationSettings(max_new_tokens=12), n_expansions=2).expand(QUERIES) == first
    # in float32 also one query at a time (int8, the default where it runs, can change a row's text with its batch)
    exact = SamplerOptions(weight_precision="float32")
    batched = LLMQueryExpander(generation=GenerationSettings(max_new_tokens=12), n_expansions=2, sampler=exact)
    fresh = LLMQueryExpander(generation=GenerationSettings(max_new_tokens=12, batch_size=1), n_expansions=2,
                             sampler=exact)
    assert [fresh.expand([q])[0] for q in QUERIES] == batched.expand(QUERIES)
    other_seed = LLMQueryExpander(generation=GenerationSettings(max_new_tokens=12, seed=7), n_expansions=2)
    assert other_seed.expand(QUERIES) != first


def test_packed_and_transformers_backends_agree_on_the_bundled_model(expander):
    from expandr_haystack.cache import cache_key
    from expandr_haystack.generation.quantize import auto_precision

    # the CPU default for the bundled Llama model: the packed decoder at weight_precision "auto"; every engine name
    # carries "+eog": the bundled tokenizer has <|endoftext|> besides its EOS, and texts stop there since 2026-12-05
    assert expander.engine == {"int8": expander.engine.split("+")[0], "float32": "packed"}[auto_precision()[0]] + "+eog"
    exact = LLMQueryExpander(generation=GenerationSettings(max_new_tokens=12), n_expansions=2,
                             sampler=SamplerOptions(weight_precision="float32"))
    reference = LLMQueryExpander(generation=GenerationSettings(max_new_tokens=12), n_expansions=2,
                                 sampler=SamplerOptions(engine="transformers"))
    assert (exact.engine, reference.engine) == ("packed+eog", "transformers+eog")
    # same row seeds, cached apart: each engine's texts are keyed with its name
    packed_rows = exact._plan(QUERIES, None, None, None, None)
    plain_rows = reference._plan(QUERIES, None, None, None, None)
    assert [r.seed_key for r in packed_rows] == [r.seed_key for r in plain_rows]
    assert all(a.key != b.key for a, b in zip(packed_rows, plain_rows))
    assert all(r.key == cache_key(row=r.seed_key, engine="transformers+eog") for r in plain_rows)
    packed, plain = exact.expand(QUERIES), reference.expand(QUERIES)
    # same float32 math and seeds: the texts agree except where a draw falls within rounding of a nucleus edge
    same = sum(a == b for x, y in zip(packed, plain) for a, b in zip(x, y))
    assert same >= 3, (packed, plain)


def test_run_and_run_async(expander):
    out = expander.run(query=QUERIES[0])
    assert out["query"] == QUERIES[0] and len(out["expansions"]) == 2
    assert asyncio.run(expander.run_async(query=QUERIES[0])) == out


def test_answer_prompt_uses_the_document():
    answerer = LLMQueryExpander(prompt=ANSWER_PROMPT, generation=GenerationSettings(temperature=0.0, max_new_tokens=12))
    a = answerer.expand(QUERIES[:1], documents=["The lift increase due to slipstream is about 20 percent."])
    b = answerer.expand(QUERIES[:1], documents=["The lift increase due to slipstream is about 20 percent."])
    assert a == b and a[0][0]
    with pytest.raises(ValueError, match="documents"):
        answerer.expand(QUERIES[:1])


def test_long_query_is_truncated_with_a_warning(caplog):
    e = LLMQueryExpander(generation=GenerationSettings(max_new_tokens=4), sampler=SamplerOptions(max_prompt_tokens=64))
    out = e.run(query="wing lift " * 50_000)
    assert out["expansions"] and "truncated" in caplog.text


def test_pipeline_python_and_yaml(small_store, tmp_path):
    p = Pipeline()
    p.add_component("expander", LLMQueryExpander(generation=GenerationSettings(max_new_tokens=12),
                                                 cache=str(tmp_path / "p.sqlite")))
    p.add_component("retriever", ExpandRRetriever(document_store=small_store, top_k=3))
    p.connect("expander.query", "retriever.query")
    p.connect("expander.expansions", "retriever.expansions")
    res = p.run({"expander": {"query": QUERIES[1]}})
    docs = res["retriever"]["documents"]
    assert len(docs) == 3 and all(d.score is not None for d in docs)
    q = Pipeline.loads(p.dumps())
    assert q.dumps() == p.dumps()


def test_yaml_examples_load_and_run(tmp_path, monkeypatch, cranfield_small):
    import expandr_haystack  # noqa: F401 - adds our module to Haystack's allow-list
    from expandr_haystack.evaluation.indexing import use_bundled_encoder

    monkeypatch.chdir(tmp_path)  # the YAML's cache path is relative
    examples = Path(__file__).parents[2] / "examples"
    indexing = use_bundled_encoder(Pipeline.loads((examples / "indexing.yaml").read_text()))
    search = Pipeline.loads((examples / "search.yaml").read_text())
    search_expander = search.get_component("expander")
    search_expander.generation = search_expander.generation.replace(max_new_tokens=12)
    indexing.run({"embedder": {"documents": cranfield_small[1][:40]}})
    docs = search.run({"expander": {"query": QUERIES[0]}})["retriever"]["documents"]
    assert len(docs) == 5 and {d.id for d in docs} <= {d.id for d in cranfield_small[1][:40]}
    assert (tmp_path / "expansions.sqlite").exists()
    grounded = Pipeline.loads((examples / "grounded_search.yaml").read_text())
    expander = grounded.get_component("expander")
    assert expander.grounded and expander.prompt == GROUNDED_PROMPT
    expander.generation, expander.n_expansions = expander.generation.replace(max_new_tokens=12), 1
    out = grounded.run({"first_pass": {"query": QUERIES[0]}, "expander": {"query": QUERIES[0]}},
                       include_outputs_from={"expander"})
    assert len(out["retriever"]["documents"]) == 5 and out["expander"]["expansions"][0]
