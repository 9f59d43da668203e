"""`haystack_multiquery`: Haystack's QueryExpander + MultiQueryEmbeddingRetriever with our LLM, encoder and store."""

import argparse
import json
import sqlite3

import pytest
from haystack.document_stores.in_memory import InMemoryDocumentStore

from expandr_haystack.cli import main
from expandr_haystack.evaluation import METHODS, evaluate, parse_methods
from expandr_haystack.evaluation.data import load_collection
from expandr_haystack.evaluation.multiquery import (
    JSON_PREFILL,
    MULTIQUERY_BATCH_SIZE,
    MULTIQUERY_REPLY_PREFIX,
    MULTIQUERY_REPLY_STOP,
    MultiQueryStats,
    chat_generator_like,
    json_parsed,
    multiquery_pipeline,
    stats_line,
)
from expandr_haystack.evaluation.runner import EXPANSION_METHODS, MULTIQUERY

QUERIES = [
    ("1", "what problems of heat conduction in composite slabs have been solved"),
    ("2", "similarity laws for aeroelastic models of heated aircraft"),
    ("3", "buckling of cylindrical shells under axial compression"),
]
QRELS = "query-id\tcorpus-id\tscore\n1\td1\t2\n2\td2\t1\n2\td6\t1\n3\td4\t1\n"
#: The reply that takes QueryExpander's parse-success path (the 135M model's own JSON is often broken): the cache
#: stores the continuation of the prefill (`PLANTED_CONTINUATION`, run-on text included); the reply is prefix +
#: continuation cut after the stop.
PLANTED = '{"queries": ["flutter of swept wings in a wind tunnel"]}'
PLANTED_CONTINUATION = 'flutter of swept wings in a wind tunnel"]}\n\nExample 2: {"queries": ['


@pytest.fixture()
def beir(write_beir):
    return write_beir(QUERIES, QRELS, splits=("test",))


# -- no model loading --------------------------------------------------------------------------------------------
def test_method_is_known_and_counts_as_an_expansion_method():
    assert MULTIQUERY == "haystack_multiquery" and METHODS[-1] == MULTIQUERY
    assert parse_methods("dense, haystack_multiquery") == ["dense", "haystack_multiquery"]
    assert EXPANSION_METHODS[MULTIQUERY] == "multiquery"  # run per seed, tested against dense and PRF


def test_cli_lists_it_and_refuses_a_near_miss(beir, capsys):
    assert main(["eval", str(beir), "--methods", "dense,haystack-multiquery"]) == 1
    err = capsys.readouterr().err
    assert "unknown method(s) ['haystack-multiquery']" in err and "haystack_multiquery" in err
    assert main(["eval", "--help"]) == 0
    assert "haystack_multiquery" in capsys.readouterr().out


def test_json_prefill_opens_the_object_query_expanders_own_prompt_asks_for():
    from haystack.components.query.query_expander import DEFAULT_PROMPT_TEMPLATE

    assert MULTIQUERY_REPLY_PREFIX == '{"queries": ["' and MULTIQUERY_REPLY_PREFIX in DEFAULT_PROMPT_TEMPLATE
    assert MULTIQUERY_REPLY_STOP == "]}" and JSON_PREFILL == {"reply_prefix": '{"queries": ["', "reply_stop": "]}"}
    assert json_parsed(MULTIQUERY_REPLY_PREFIX + 'a", "b"' + MULTIQUERY_REPLY_STOP)


def test_the_methods_chat_generator_has_the_prefill_unless_turned_off(beir, capsys):
    from expandr_haystack import LLMQueryExpander
    from expandr_haystack.evaluation.cli import add_eval_parser

    expander = LLMQueryExpander(generation={"temperature": 0.3, "seed": 7}, cache="c.sqlite")
    on, off = chat_generator_like(expander), chat_generator_like(expander, prefill=False)
    assert (on.reply_prefix, on.reply_stop) == (MULTIQUERY_REPLY_PREFIX, MULTIQUERY_REPLY_STOP)
    assert (off.reply_prefix, off.reply_stop) == (None, None)  # the free replies of before the option
    # the expander's sampling settings, at most MULTIQUERY_BATCH_SIZE rows a batch (QueryExpander's long prompts)
    assert on.generation == off.generation == expander.generation.replace(batch_size=MULTIQUERY_BATCH_SIZE)
    assert on.cache == off.cache == "c.sqlite"
    assert on._sampler is None  # nothing loaded
    parser = add_eval_parser(argparse.ArgumentParser().add_subparsers())
    assert parser.parse_args(["cranfield"]).multiquery_prefill is True
    assert parser.parse_args(["cranfield", "--no-multiquery-prefill"]).multiquery_prefill is False
    c = load_collection(beir, "test")
    with pytest.raises(TypeError, match="`multiquery_prefill` must be a bool; got str"):
        evaluate(c, ["dense", MULTIQUERY], expander=expander, multiquery_prefill="no", progress_bar=False)


def test_json_parsed_is_what_query_expander_reads():
    assert json_parsed('  {"queries": ["a", "b"]} \n')
    assert not json_parsed('```json\n{"queries": ["a"]}\n```')  # a code fence: json.loads fails
    assert not json_parsed('Sure! {"queries": ["a"]}')
    assert not json_parsed('{"query": ["a"]}') and not json_parsed('{"queries": "a"}')
    assert not json_parsed('{"queries": ["", 3]}') and not json_parsed('["a"]') and not json_parsed("")


def test_stats_count_fallbacks_and_say_them_in_words():
    s = MultiQueryStats()
    s.add("Heat flow", ["heat flow"], "not json")  # the original alone (any case): a fallback
    s.add("heat flow", ["conduction of heat", "heat flow"], PLANTED)
    assert s.to_dict() == {"queries": 2, "json_parsed": 1, "fallback": 1, "searched": 3}
    line = stats_line([s.to_dict(), s.to_dict()])
    assert line == ("haystack_multiquery: QueryExpander read the LLM's JSON in 2 of 4 replies (50.0%); 2 of 4 "
                    "queries (50.0%) fell back to the original query alone over 2 seeds; 1.50 queries searched per "
                    "query")
    s.add("q", ["q"], None)  # a reply not seen (remote generator): no parse count
    assert MultiQueryStats.total([s.to_dict()]).json_parsed is None
    assert "read the LLM's JSON" not in stats_line([s.to_dict()])


def test_pipeline_needs_an_in_memory_store():
    with pytest.raises(TypeError, match="`store` must be an InMemoryDocumentStore"):
        multiquery_pipeline(object(), chat_generator=None)
    with pytest.raises(ValueError, match="`n_expansions` must be an integer >= 1"):
        multiquery_pipeline(InMemoryDocumentStore(), chat_generator=None, n_expansions=0)


# -- real bundled models -----------------------------------------------------------------------------------------
@pytest.mark.integration
def test_same_llm_encoder_and_store_as_dense_only_the_method_differs(beir, tmp_path):
    from expandr_haystack import ExpandRRetriever, LLMQueryExpander
    from expandr_haystack.evaluation.indexing import build_document_store

    c = load_collection(beir, "test")
    store = build_document_store(c.documents(), progress_bar=False)
    cache = tmp_path / "cache.sqlite"
    expander = LLMQueryExpander(generation={"max_new_tokens": 12}, n_expansions=2, cache=str(cache))
    first = evaluate(c, ["dense", MULTIQUERY], expander=expander, store=store, progress_bar=False)
    info = first.multiquery
    assert set(info) == {"stats", "queries", "replies"} and set(info["replies"]) == {"1", "2", "3"}
    assert info["stats"]["queries"] == 3 and info["stats"]["json_parsed"] == sum(map(json_parsed,
                                                                                    info["replies"].values()))
    for reply in info["replies"].values():  # prefilled: each reply starts with the prefix, ends at the first stop
        assert reply.startswith(MULTIQUERY_REPLY_PREFIX)
        rest = reply[len(MULTIQUERY_REPLY_PREFIX):]
        assert MULTIQUERY_REPLY_STOP not in rest or rest.index(MULTIQUERY_REPLY_STOP) == len(rest) - 2
    assert first.settings[MULTIQUERY] == {"merge": "max", "n_expansions": 2, **JSON_PREFILL}
    assert first.timings["expansion-multiquery"] > 0 and first.timings[MULTIQUERY] > 0  # generation timed apart
    for qid, query in QUERIES:
        assert query in info["queries"][qid]  # include_original_query=True
        if info["queries"][qid] == [query]:  # fell back: searched exactly as dense searches it
            assert [d for d, _ in first.runs[MULTIQUERY][qid]] == [d for d, _ in first.runs["dense"][qid]]
            assert [s for _, s in first.runs[MULTIQUERY][qid]] == pytest.approx(
                [s for _, s in first.runs["dense"][qid]], abs=1e-5)

    # the parse-success path: plant a continuation in the cache (a hit returns the stored text, prefixed and cut)
    with sqlite3.connect(cache) as db:
        assert db.execute("SELECT count(*) FROM expansions").fetchone()[0] == 3  # one reply per query, cached
        db.execute("UPDATE expansions SET text = ?", (PLANTED_CONTINUATION,))
    second = evaluate(c, ["dense", MULTIQUERY], expander=expander, store=store, progress_bar=False)
    assert set(second.multiquery["replies"].values()) == {PLANTED}  # QueryExpander parsed the prefilled reply
    assert second.multiquery["stats"] == {"queries": 3, "json_parsed": 3, "fallback": 0, "searched": 6}
    alternative = json.loads(PLANTED)["queries"][0]
    dense = ExpandRRetriever(document_store=store, top_k=100)
    for qid, query in QUERIES:
        assert second.multiquery["queries"][qid] == [alternative, query]
        # merged as MultiQueryEmbeddingRetriever merges: each document's best score over both searches, sorted
        best = {}
        for hits in dense.retrieve([query, alternative], None):
            for d in hits:
                best[d.id] = max(best.get(d.id, -1.0), d.score)
        merged = second.runs[MULTIQUERY][qid]
        assert [s for _, s in merged] == pytest.approx(sorted(best.values(), reverse=True), abs=1e-5)
        assert {d: s for d, s in merged} == pytest.approx(best, abs=1e-5)


@pytest.mark.integration
def test_cli_seeds_paired_tests_run_files_and_parse_rate(beir, tmp_path, capsys):
    out, run = tmp_path / "res.json", tmp_path / "run.trec"
    rc = main(["eval", str(beir), "--methods", "dense,haystack_multiquery", "--seeds", "1,2", "--max-new-tokens", "8",
               "--cache", str(tmp_path / "c.sqlite"), "--json", str(out), "--run-file", str(run), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    stdout = capsys.readouterr().out
    assert "haystack_multiquery vs dense:" in stdout and "QueryExpander read the LLM's JSON in" in stdout
    written = json.loads(out.read_text())
    assert written["methods"]["haystack_multiquery"]["seeds"] == 2
    assert written["settings"]["multiquery_prefill"] is True  # the default
    assert len(written["per_seed"]["haystack_multiquery"]["ndcg@10"]) == 2
    assert [c["baseline"] for c in written["comparisons"] if c["method"] == MULTIQUERY] == ["dense"]
    mq = written["haystack_multiquery"]
    assert len(mq["per_seed"]) == 2 and mq["total"]["queries"] == 6 and 0 <= mq["total"]["json_parsed"] <= 6
    assert sorted(p.name for p in tmp_path.glob("run.*.trec")) == [
        "run.dense.trec", "run.haystack_multiquery.seed1.trec", "run.haystack_multiquery.seed2.trec"]
    with sqlite3.connect(tmp_path / "c.sqlite") as db:  # one reply per query and seed: the seeds sample apart
        assert db.execute("SELECT count(*) FROM expansions").fetchone()[0] == 6


@pytest.mark.integration
def test_without_the_prefill_the_replies_are_the_free_ones_of_before(beir, tmp_path):
    from haystack.components.query import QueryExpander

    from expandr_haystack import LLMQueryExpander, LocalChatGenerator
    from expandr_haystack.evaluation.multiquery import expander_messages

    c = load_collection(beir, "test")
    cache = tmp_path / "cache.sqlite"
    expander = LLMQueryExpander(generation={"max_new_tokens": 12}, n_expansions=2, cache=str(cache))
    free = evaluate(c, [MULTIQUERY], expander=expander, multiquery_prefill=False, progress_bar=False)
    assert free.settings[MULTIQUERY] == {"merge": "max", "n_expansions": 2, "reply_prefix": None, "reply_stop": None}
    # the same replies as a plain LocalChatGenerator's (no prefix, no stop), served by its keys
    plain = LocalChatGenerator(generation=expander.generation, cache=str(cache))
    replies = plain.generate(expander_messages(QueryExpander(chat_generator=plain, n_expansions=2),
                                               [q for _, q in QUERIES]))
    assert [r.text for r in replies] == [free.multiquery["replies"][qid] for qid, _ in QUERIES]
    assert all(r.meta["cached"] for r in replies)
    prefilled = evaluate(c, [MULTIQUERY], expander=expander, progress_bar=False)  # keyed apart: generated anew
    assert all(r.startswith(MULTIQUERY_REPLY_PREFIX) for r in prefilled.multiquery["replies"].values())
    with sqlite3.connect(cache) as db:
        assert db.execute("SELECT count(*) FROM expansions").fetchone()[0] == 6
