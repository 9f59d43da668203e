"""DPO pair construction: format, resume, statistics, CLI arguments (fast, stub models); then the real flow + DPO."""

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
from haystack import Pipeline

import expandr_haystack  # noqa: F401 - allow-list for the YAML test
from expandr_haystack import ANSWER_PROMPT, EXPANSION_PROMPT, GROUNDED_PROMPT, LLMQueryExpander, RewardScorer
from expandr_haystack.core.text import chat_messages, format_passages
from expandr_haystack.evaluation.data import bundled_path, load_collection
from expandr_haystack.training.cli import add_pairs_parser, pair_config
from expandr_haystack.training.pairs import PairConfig, build_pairs, sidecar_paths
from tests.conftest import HashEmbedder

ROOT = Path(__file__).resolve().parents[2]


class FakeExpander(LLMQueryExpander):
    """An LLMQueryExpander whose `expand` returns canned texts and records which queries it was asked for."""

    def __init__(self, prompt=EXPANSION_PROMPT, duplicate=False):
        super().__init__(prompt=prompt)
        self.asked: list[str] = []
        self.duplicate = duplicate

    def warm_up(self):  # no model: a sampler that only plans prompts (a prompt budget large enough for any query)
        from types import SimpleNamespace

        self._sampler = SimpleNamespace(truncate=lambda text, argument: text, engine="fake", identity="fake")

    def expand(self, queries, n=None, documents=None, temperatures=None):
        if "{document}" in self.prompt:
            assert documents is not None and len(documents) == len(queries) and all("\n" in d for d in documents)
        self.asked.extend(queries)
        n = n or 1
        if self.duplicate:
            return [["the same text"] * n for _ in queries]
        return [[f"{q} :: candidate {i} at {temperatures[i % len(temperatures)] if temperatures else 0}"
                 for i in range(n)] for q in queries]


@pytest.fixture(scope="module")
def train_collection():
    return load_collection(bundled_path("cranfield"), split="train")


def _parts(threshold=-10.0, duplicate=False):
    scorer = RewardScorer(threshold=threshold)
    scorer._embedder = HashEmbedder()
    return FakeExpander(duplicate=duplicate), FakeExpander(prompt=ANSWER_PROMPT), scorer


def _read(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def test_pair_file_format_and_stats(tmp_path, train_collection):
    expander, answerer, scorer = _parts()
    out = tmp_path / "pairs.jsonl"
    ids = list(train_collection.queries)[:3]
    stats = build_pairs(train_collection, out, expander, answerer, scorer, PairConfig(n_candidates=4, chunk_size=2),
                        query_ids=ids, progress_bar=False)
    rows = _read(out)
    assert [r["query_id"] for r in rows] == ids and stats.kept == 3 and stats.kept_fraction == 1.0
    r = rows[0]
    query = train_collection.queries[ids[0]]
    assert r["prompt"] == [{"role": "user", "content": EXPANSION_PROMPT.replace("{query}", query)}]
    assert r["chosen"][0]["role"] == r["rejected"][0]["role"] == "assistant"
    assert r["chosen"][0]["content"] != r["rejected"][0]["content"]
    assert r["document_id"] == train_collection.relevant(ids[0])[0]
    assert r["rewards"]["chosen"] >= r["rewards"]["rejected"]
    assert r["rewards"]["margin"] == pytest.approx(r["rewards"]["chosen"] - r["rewards"]["rejected"])
    side = sidecar_paths(out)
    saved = json.loads(side["stats"].read_text())
    assert saved["queries_seen"] == 3 and saved["kept"] == 3 and sum(saved["margin_histogram"]["counts"]) == 3
    assert saved["config"]["n_candidates"] == 4 and side["plot"].stat().st_size > 1000
    assert len(_read(side["seen"])) == 3

    from datasets import load_dataset
    from trl.data_utils import is_conversational

    ds = load_dataset("json", data_files=str(out), split="train")
    assert {"prompt", "chosen", "rejected", "query_id", "rewards"} <= set(ds.column_names)
    assert is_conversational(ds[0])


def test_resume_appends_only_missing_queries(tmp_path, train_collection):
    out = tmp_path / "pairs.jsonl"
    ids = list(train_collection.queries)[:6]
    config = PairConfig(n_candidates=3, chunk_size=3)
    expander, answerer, scorer = _parts()
    build_pairs(train_collection, out, expander, answerer, scorer, config, query_ids=ids[:2], progress_bar=False)
    assert len(expander.asked) == 2

    expander, answerer, scorer = _parts()
    stats = build_pairs(train_collection, out, expander, answerer, scorer, config, query_ids=ids[:4],
                        progress_bar=False)
    assert expander.asked == [train_collection.queries[q] for q in ids[2:4]]
    assert [r["query_id"] for r in _read(out)] == ids[:4]
    assert (stats.queries_new, stats.queries_seen, stats.kept) == (2, 4, 4)

    # a kill mid-write leaves a partial last line: it is cut off and that query is redone
    with out.open("a") as f:
        f.write('{"prompt": [{"role": "user", "content": "trunc')
    expander, answerer, scorer = _parts()
    stats = build_pairs(train_collection, out, expander, answerer, scorer, config, query_ids=ids[:5],
                        progress_bar=False)
    assert expander.asked == [train_collection.queries[ids[4]]]
    assert [r["query_id"] for r in _read(out)] == ids[:5]
    assert out.read_text().endswith("}\n")

    # a pair written without its `seen` record (killed between the two writes) is not redone
    seen = sidecar_paths(out)["seen"]
    seen.write_text("".join(line + "\n" for line in seen.read_text().splitlines()[:-1]))
    expander, answerer, scorer = _parts()
    stats = build_pairs(train_collection, out, expander, answerer, scorer, config, query_ids=ids[:5],
                        progress_bar=False)
    assert expander.asked == [] and stats.queries_seen == 5 and stats.kept == 5

    # overwrite starts afresh
    expander, answerer, scorer = _parts()
    build_pairs(train_collection, out, expander, answerer, scorer, config, query_ids=ids[:1], progress_bar=False,
                overwrite=True)
    assert [r["query_id"] for r in _read(out)] == ids[:1]


def test_dropped_queries_are_recorded_and_skipped(tmp_path, train_collection):
    out = tmp_path / "pairs.jsonl"
    ids = list(train_collection.queries)[:3]
    expander, answerer, scorer = _parts()  # build_pairs takes the threshold of the config
    stats = build_pairs(train_collection, out, expander, answerer, scorer, PairConfig(n_candidates=3, threshold=2.0),
                        query_ids=ids, progress_bar=False)
    assert out.read_text() == "" and stats.kept == 0 and stats.dropped["below_threshold"] == 3
    assert stats.kept_fraction == 0.0 and stats.margin_mean is None
    expander, answerer, scorer = _parts()
    build_pairs(train_collection, out, expander, answerer, scorer, PairConfig(n_candidates=3, threshold=2.0),
                query_ids=ids, progress_bar=False)
    assert expander.asked == []

    out2 = tmp_path / "dups.jsonl"
    expander, answerer, scorer = _parts(duplicate=True)
    stats = build_pairs(train_collection, out2, expander, answerer, scorer, PairConfig(n_candidates=3),
                        query_ids=ids[:2], progress_bar=False)
    assert stats.dropped["fewer_than_two_distinct"] == 2 and stats.kept == 0


def test_document_only_ablation_needs_no_answerer(tmp_path, train_collection):
    expander, _, scorer = _parts()
    stats = build_pairs(train_collection, tmp_path / "p.jsonl", expander, None, scorer,
                        PairConfig(n_candidates=3, use_answer=False), query_ids=list(train_collection.queries)[:2],
                        progress_bar=False)
    row = _read(tmp_path / "p.jsonl")[0]
    assert stats.kept == 2 and row["rewards"]["chosen_answer_similarity"] is None
    assert row["rewards"]["chosen"] == 1.0  # document term only


class GroundedFake(FakeExpander):
    """A grounded candidate expander (GROUNDED_PROMPT) that records the passages it was given."""

    def __init__(self):
        super().__init__(prompt=GROUNDED_PROMPT)
        self.passages_k, self.passage_words = 2, 6
        self.seen_passages: list = []

    def expand(self, queries, n=None, documents=None, temperatures=None, passages=None):
        assert passages is not None and len(passages) == len(queries)
        self.seen_passages.extend(passages)
        return super().expand(queries, n=n, documents=documents, temperatures=temperatures)


def test_grounded_pairs_prompt_holds_the_passages(tmp_path, train_collection):
    _, answerer, scorer = _parts()
    expander = GroundedFake()
    ids = list(train_collection.queries)[:3]
    corpus_ids = list(train_collection.corpus)
    passages = {q: [train_collection.document(d) for d in corpus_ids[3 * i: 3 * i + 3]] for i, q in enumerate(ids)}
    out = tmp_path / "grounded.jsonl"
    stats = build_pairs(train_collection, out, expander, answerer, scorer, PairConfig(n_candidates=3, chunk_size=2),
                        query_ids=ids, progress_bar=False, passages=passages)
    assert stats.kept == 3 and expander.seen_passages == [passages[q] for q in ids]
    for row in _read(out):
        query, docs = train_collection.queries[row["query_id"]], passages[row["query_id"]]
        block = format_passages(docs, 2, 6)
        # exactly the messages the grounded expander samples from: its prompt, the query, its first 2 passages
        assert row["prompt"] == chat_messages(GROUNDED_PROMPT, query, None, passages=block)
        content = row["prompt"][0]["content"]
        assert block in content and f"Question: {query}" in content and "[1] " in content and "[3] " not in content
        first_words = " ".join(f"{docs[0].meta['title'].rstrip('.')}. {docs[0].content}".split()[:6])
        assert f"[1] {first_words}" in content


def test_grounded_pairs_need_their_passages(tmp_path, train_collection):
    expander, answerer, scorer = _parts()
    ids = list(train_collection.queries)[:2]
    docs = {q: [train_collection.document(next(iter(train_collection.corpus)))] for q in ids}
    with pytest.raises(ValueError, match=r"`passages` is required"):
        build_pairs(train_collection, tmp_path / "a.jsonl", GroundedFake(), answerer, scorer, PairConfig(),
                    query_ids=ids)
    with pytest.raises(ValueError, match=r"`passages` was given"):
        build_pairs(train_collection, tmp_path / "b.jsonl", expander, answerer, scorer, PairConfig(), query_ids=ids,
                    passages=docs)
    with pytest.raises(ValueError, match=rf"`passages`: no first-pass documents .*{ids[1]!r}"):
        build_pairs(train_collection, tmp_path / "c.jsonl", GroundedFake(), answerer, scorer, PairConfig(),
                    query_ids=ids, passages={ids[0]: docs[ids[0]]})


def test_make_components_grounded_prompt():
    from expandr_haystack.training.pairs import make_components

    expander, answerer, _ = make_components(PairConfig(n_candidates=4), prompt=GROUNDED_PROMPT, passages_k=5,
                                            passage_words=20)
    assert expander.grounded and (expander.passages_k, expander.passage_words) == (5, 20)
    assert expander.n_expansions == 4 and answerer.prompt == ANSWER_PROMPT and not answerer.grounded


def test_bad_arguments(tmp_path, train_collection):
    expander, answerer, scorer = _parts()
    with pytest.raises(TypeError, match="answer_expander"):
        build_pairs(train_collection, tmp_path / "p.jsonl", expander, None, scorer, PairConfig())
    with pytest.raises(ValueError, match="document"):
        build_pairs(train_collection, tmp_path / "p.jsonl", expander, FakeExpander(), scorer, PairConfig())
    with pytest.raises(ValueError, match="expander.prompt"):
        build_pairs(train_collection, tmp_path / "p.jsonl", FakeExpander(prompt=ANSWER_PROMPT), answerer, scorer,
                    PairConfig())
    with pytest.raises(ValueError, match="query_ids"):
        build_pairs(train_collection, tmp_path / "p.jsonl", expander, answerer, scorer, PairConfig(),
                    query_ids=["no-such-query"])
    with pytest.raises(TypeError, match="scorer"):
        build_pairs(train_collection, tmp_path / "p.jsonl", expander, answerer, object(), PairConfig())
    (tmp_path / "bad.jsonl").write_text('{"query_id": "1"}\nnot json\n{"query_id": "2"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        build_pairs(train_collection, tmp_path / "bad.jsonl", expander, answerer, scorer, PairConfig())
    for kwargs, match in [({"n_candidates": 1}, "n_candidates"), ({"temperatures": ()}, "temperatures"),
                          ({"temperatures": (0.8, -1)}, "temperatures"), ({"chunk_size": 0}, "chunk_size"),
                          ({"max_new_tokens": 0}, "max_new_tokens"), ({"threshold": float("inf")}, "threshold")]:
        with pytest.raises(ValueError, match=match):
            PairConfig(**kwargs)


def _parse(argv):
    """`expandr pairs ARGV` parsed by the parser `add_pairs_parser` registers."""
    parser = argparse.ArgumentParser(prog="expandr")
    add_pairs_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["pairs", *argv])


def _pairs_main(argv):
    args = _parse(argv)
    return args.func(args)


@pytest.mark.parametrize("argv,match", [
    (["--data", "cranfield", "--out", "x.jsonl", "--n-candidates", "1"], "n-candidates"),
    (["--data", "cranfield", "--out", "x.jsonl", "--n-candidates", "zero"], "n-candidates"),
    (["--data", "cranfield", "--out", "x.jsonl", "--temperatures", "hot,cold"], "temperatures"),
    (["--data", "cranfield", "--out", "x.jsonl", "--temperatures", "0.8,-1"], "temperatures"),
    (["--data", "/no/such/folder", "--out", "x.jsonl"], "--data"),
    (["--data", "cranfield", "--out", "x.jsonl", "--llm", "/no/such/llm"], "--llm"),
    (["--data", "cranfield", "--out", "x.jsonl", "--encoder", "org/sub/no-such-model"], "--encoder"),
    (["--data", "cranfield", "--out", "x.jsonl", "--adapter", "/tmp"], "--adapter"),
    (["--data", "cranfield", "--out", "x.jsonl", "--backend", "magic"], "--backend"),
    (["--data", "cranfield", "--out", "/tmp"], "--out"),
    (["--data", "cranfield"], "--out"),
])
def test_cli_argument_errors(argv, match, capsys):
    with pytest.raises(SystemExit) as exc:
        _parse(argv)
    assert exc.value.code == 2
    assert match in capsys.readouterr().err


def test_cli_defaults_are_pair_config_defaults():
    args = _parse(["--data", "cranfield", "--out", "x.jsonl"])
    assert pair_config(args) == PairConfig()
    assert args.cache is None and args.engine == "auto" and args.func is not None
    args = _parse(["--data", "cranfield", "--out", "x.jsonl", "--n-candidates", "4", "--temperatures", "0.7,1.2",
                   "--no-answer", "--seed", "7"])
    assert pair_config(args) == PairConfig(n_candidates=4, temperatures=(0.7, 1.2), use_answer=False, seed=7)


def test_cli_engine_choices_are_the_generation_engines():
    from expandr_haystack.options import ENGINES

    for engine in ENGINES:
        assert _parse(["--data", "cranfield", "--out", "x.jsonl", "--engine", engine]).engine == engine
        assert _parse(["--data", "cranfield", "--out", "x.jsonl", "--backend", engine]).engine == engine  # old name


def test_cli_unknown_split(tmp_path, capsys):
    assert _pairs_main(["--data", "cranfield", "--split", "dev", "--out", str(tmp_path / "p.jsonl")]) == 2
    assert "dev" in capsys.readouterr().err


def test_expandr_pairs_is_the_same_command(capsys):
    from expandr_haystack.cli import main

    assert main(["pairs", "--data", "cranfield", "--out", "x.jsonl", "--n-candidates", "1"]) == 2
    assert "--n-candidates: must be an integer >= 2; got 1." in capsys.readouterr().err


def test_root_script_is_a_shim_of_expandr_pairs():
    text = (ROOT / "training" / "pairs.py").read_text()
    assert 'main(["pairs", *sys.argv[1:]])' in text and "HAYSTACK_TELEMETRY_ENABLED" not in text
    assert len(text.splitlines()) < 20


def test_pairs_pipeline_yaml_loads():
    p = Pipeline.loads((ROOT / "examples" / "pairs_pipeline.yaml").read_text())
    assert isinstance(p.get_component("scorer"), RewardScorer)
    assert p.get_component("answerer").prompt == ANSWER_PROMPT
    assert p.get_component("answerer").generation.temperature == 0.0
    edges = set(p.graph.edges())
    assert {("expander", "scorer"), ("expander", "answerer"), ("answerer", "scorer")} <= edges
    spec = importlib.util.spec_from_file_location("pairs_example", ROOT / "examples" / "pairs_pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    built, loaded = module.build_pipeline().to_dict(), p.to_dict()  # the YAML is what the script builds
    assert built["components"] == loaded["components"]
    key = lambda c: (c["sender"], c["receiver"])
    assert sorted(built["connections"], key=key) == sorted(loaded["connections"], key=key)


# -- real models ------------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_cli_pairs_feed_one_dpo_step(tmp_path, capsys):
    """`expandr pairs` on 3 Cranfield train queries -> a file DPOTrainer (LoRA, bundled SmolLM2) trains on."""
    out = tmp_path / "pairs.jsonl"
    argv = ["--data", "cranfield", "--split", "train", "--out", str(out), "--n-candidates", "4", "--max-queries",
            "3", "--max-new-tokens", "16", "--answer-max-new-tokens", "16", "--threshold", "0.0", "--cache",
            str(tmp_path / "cache.sqlite"), "--device", "cpu", "--no-progress"]
    assert _pairs_main(argv) == 0
    printed = capsys.readouterr().out
    assert "kept" in printed and "reward margin histogram" in printed
    rows = _read(out)
    assert len(rows) == 3 and len({r["query_id"] for r in rows}) == 3
    assert Path(str(out) + ".margins.png").exists()
    # resume: nothing left to do, and the cache answers everything
    assert _pairs_main(argv) == 0
    assert len(_read(out)) == 3

    from expandr_haystack.training.dpo import DPOSettings, train_dpo

    settings = DPOSettings(max_steps=1, per_device_train_batch_size=1, max_length=128, device="cpu",
                           logging_steps=1)
    adapter = train_dpo(None, out, tmp_path / "dpo", settings)
    from expandr_haystack.training.dpo import LOG_HISTORY, final_dpo_metrics

    logged = final_dpo_metrics(json.loads((tmp_path / "dpo" / LOG_HISTORY).read_text()))
    assert logged["steps"] == 1 and {"rewards/margins", "rewards/accuracies"} <= set(logged)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (8, 32, 0.1)
    assert set(config["target_modules"]) == {"q_proj", "v_proj"}
    assert (adapter / "adapter_model.safetensors").exists()
    LLMQueryExpander(adapter=str(adapter))  # the expander accepts it as an adapter directory
    # the next round continues the same adapter
    again = train_dpo(None, out, tmp_path / "dpo2", settings, adapter=str(adapter))
    assert (again / "adapter_model.safetensors").exists()


@pytest.mark.integration
def test_cli_grounded_pairs_show_the_first_pass_hits(tmp_path, write_beir, capsys):
    """`expandr pairs --grounded`: each pair's prompt holds the query's top first-pass hits, cut to the words asked
    (a six-document BEIR folder: the first pass encodes its corpus, Cranfield's would take most of a minute)."""
    out = tmp_path / "pairs.jsonl"
    data = write_beir([("q1", "flutter of swept wings"), ("q2", "heat conduction in slabs")],
                      "query-id\tcorpus-id\tscore\nq1\td6\t1\nq2\td1\t1\n", splits=("train",))
    argv = ["--data", str(data), "--split", "train", "--out", str(out), "--n-candidates", "2", "--max-queries",
            "2", "--max-new-tokens", "8", "--answer-max-new-tokens", "8", "--threshold", "0.0", "--cache", "none",
            "--device", "cpu", "--no-progress", "--grounded", "--passages-k", "2", "--passage-words", "5"]
    assert _pairs_main(argv) == 0
    rows = _read(out)
    assert len(rows) == 2
    for row in rows:
        user = row["prompt"][-1]["content"]
        assert "[1] " in user and "[2] " in user and "[3] " not in user
        first = user.split("[1] ", 1)[1].split("\n", 1)[0]
        assert 1 <= len(first.split()) <= 5  # title + text cut to --passage-words


def test_every_pair_config_field_is_an_option_checked_by_its_own_rule(capsys):
    """The options are generated from PairConfig: a field added there is an option at once (top_p was missing)."""
    import dataclasses

    args = _parse(["--data", "cranfield", "--out", "x.jsonl", "--top-p", "0.5", "--chunk-size", "3"])
    assert pair_config(args) == PairConfig(top_p=0.5, chunk_size=3)
    assert all(hasattr(args, f.name) for f in dataclasses.fields(PairConfig))
    with pytest.raises(SystemExit):
        _parse(["--data", "cranfield", "--out", "x.jsonl", "--top-p", "0"])
    assert "argument --top-p: must be a number in (0, 1]; got 0.0." in capsys.readouterr().err
