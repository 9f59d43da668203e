"""Issue 23, typed option groups: files saved before them keep loading (and re-save grouped), every component's
constructor stays small, and a DPO pair's prompt is the prompt its candidates were generated from."""

import copy
import dataclasses
import inspect
import json
import warnings
from pathlib import Path

import pytest

from expandr_haystack import ExpandRQueryEmbedder, ExpandRRetriever, LLMQueryExpander, RewardScorer
from expandr_haystack.components.expander import LEGACY_NAMES
from expandr_haystack.options import GenerationSettings, SamplerOptions
from tests.conftest import HashEmbedder

SAVED = Path(__file__).parents[1] / "data" / "saved_2026-12-05" / "components.json"
GENERATION_FIELDS = {f.name for f in dataclasses.fields(GenerationSettings)}
SAMPLER_FIELDS = {f.name for f in dataclasses.fields(SamplerOptions)}

#: What each expander was saved with, read back from the groups (the file's values, written out).
EXPECTED = {
    "expander_transformers": {
        "sampler": {"engine": "transformers", "weight_precision": "float32", "max_prompt_tokens": 512,
                    "max_retries": 1, "dtype": "auto", "device": None, "retry_backoff": 1.0, "max_concurrency": 8,
                    "model_kwargs": None},
        "generation": {"top_p": 0.95, "batch_size": 16, "temperature": 1.0, "max_new_tokens": 96, "seed": 42,
                       "progress_bar": False, "generation_kwargs": None},
        "component": {"passages_k": 2, "passage_words": 20, "on_failure": "raise", "n_expansions": 1, "model": None,
                      "adapter": None, "cache": None, "system_prompt": None},
    },
    "expander_int8": {
        "sampler": {"engine": "auto", "weight_precision": "int8", "max_prompt_tokens": 1024, "max_retries": 2,
                    "dtype": "auto", "device": None, "retry_backoff": 1.0, "max_concurrency": 8,
                    "model_kwargs": None},
        "generation": {"top_p": 0.9, "batch_size": 8, "temperature": 1.0, "max_new_tokens": 96, "seed": 42,
                       "progress_bar": False, "generation_kwargs": None},
        "component": {"passages_k": 3, "passage_words": 50, "on_failure": "skip", "n_expansions": 1, "model": None,
                      "adapter": None, "cache": None, "system_prompt": None},
    },
}


def _saved(name):
    return json.loads(SAVED.read_text())[name]


# -- (1) dicts saved before the option groups -----------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_expanders_saved_2026_12_05_load_with_the_same_settings_and_resave_grouped(name):
    saved = _saved(name)
    frozen = copy.deepcopy(saved)
    with pytest.warns(DeprecationWarning) as caught:
        expander = LLMQueryExpander.from_dict(saved)
    deprecations = " ".join(str(w.message) for w in caught if issubclass(w.category, DeprecationWarning))
    assert "`backend` is now `sampler.engine`" in deprecations
    assert "`precision` is now `sampler.weight_precision`" in deprecations
    assert saved == frozen  # the input is not modified
    expected = EXPECTED[name]
    for group, values in (("sampler", expander.sampler_options), ("generation", expander.generation)):
        assert {k: getattr(values, k) for k in expected[group]} == expected[group], group
    assert {k: getattr(expander, k) for k in expected["component"]} == expected["component"]
    flat = saved["init_parameters"]
    assert expander.prompt == flat["prompt"] and expander.chat_generator is None
    assert expander.sampler_options.token.to_dict() == flat["token"]

    # re-saved in the new layout: no flat keys left, every setting where its group keeps it, as it was written
    data = expander.to_dict()
    params = data["init_parameters"]
    assert params["generation"]["type"] == "expandr_haystack.options.GenerationSettings"
    assert params["sampler"]["type"] == "expandr_haystack.options.SamplerOptions"
    assert not (GENERATION_FIELDS | SAMPLER_FIELDS | set(LEGACY_NAMES)) & set(params)
    for key, value in flat.items():
        field = LEGACY_NAMES.get(key, key)
        group = "generation" if field in GENERATION_FIELDS else "sampler" if field in SAMPLER_FIELDS else None
        assert (params[group]["init_parameters"] if group else params)[field] == value, key
    assert len(params) <= 12
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the new layout loads without a deprecation
        again = LLMQueryExpander.from_dict(data)
    assert again.to_dict() == data
    assert (again.generation, again.sampler_options) == (expander.generation, expander.sampler_options)


def test_saved_expanders_also_load_inside_a_pipeline():
    from haystack import Pipeline

    import expandr_haystack  # noqa: F401 - allow-list

    p = Pipeline()
    with pytest.warns(DeprecationWarning, match="`backend`"):
        p.add_component("expander", LLMQueryExpander.from_dict(_saved("expander_transformers")))
    text = p.dumps()
    assert "backend:" not in text and "engine: transformers" in text
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        loaded = Pipeline.loads(text).get_component("expander")
    assert loaded.sampler_options.engine == "transformers" and loaded.generation.top_p == 0.95


# -- (2) small constructors --------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [LLMQueryExpander, ExpandRQueryEmbedder, ExpandRRetriever, RewardScorer],
                         ids=lambda c: c.__name__)
def test_component_constructors_take_at_most_12_parameters(cls):
    params = [p for name, p in inspect.signature(cls.__init__).parameters.items() if name != "self"]
    assert len(params) <= 12, f"{cls.__name__}({', '.join(p.name for p in params)})"


# -- (3) the DPO prompt is the generation prompt, also for a truncated query ------------------------------------
@pytest.mark.integration
def test_dpo_prompt_equals_the_generation_prompt_of_a_truncated_query(tmp_path):
    from expandr_haystack.evaluation.data import bundled_path, load_collection
    from expandr_haystack.training.config import PairConfig
    from expandr_haystack.training.pairs import build_pairs

    collection = load_collection(bundled_path("cranfield"), split="train")
    query_id = max(collection.queries, key=lambda q: len(collection.queries[q]))
    long_query = collection.queries[query_id]
    expander = LLMQueryExpander(n_expansions=3, generation=GenerationSettings(max_new_tokens=6),
                                sampler=SamplerOptions(max_prompt_tokens=8))
    messages = expander.prompt_messages([long_query])[0]
    rows = expander._plan([long_query], None, None, None, None)
    assert len(rows) == 3 and all(r.messages == messages for r in rows)  # what the engine samples from
    assert rows[0].query != long_query and rows[0].query in messages[-1]["content"]  # really truncated
    assert long_query not in messages[-1]["content"]

    scorer = RewardScorer(threshold=-10.0)
    scorer._embedder = HashEmbedder()
    out = tmp_path / "pairs.jsonl"
    stats = build_pairs(collection, out, expander, None, scorer,
                        PairConfig(n_candidates=3, use_answer=False, threshold=-10.0), query_ids=[query_id],
                        progress_bar=False)
    assert stats.kept == 1, stats
    (row,) = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    assert row["query_id"] == query_id
    assert row["prompt"] == messages == rows[0].messages  # the policy DPO trains is the one that sampled
