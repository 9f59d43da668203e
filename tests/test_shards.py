"""Sharded expansion: shard parsing, block partition, merge checks (no model), and `expandr expand --shard` +
`expandr merge-shards` with the bundled model, whose merged file must be byte-identical to a one-process run."""

import json

import pytest

from expandr_haystack.cli import main
from expandr_haystack.expand_cli import read_queries_file
from expandr_haystack.shards import (
    FORMAT,
    Shard,
    ShardError,
    blocks,
    merge_shards,
    meta_path,
    queries_digest,
    shard_blocks,
)


# -- pure: parsing and partition --------------------------------------------------------------------------------------
def test_parse_shard():
    assert Shard.parse("1/4") == Shard(1, 4)
    assert Shard.parse(" 0/1 ") == Shard()
    assert str(Shard(3, 8)) == "3/8"
    for bad in ("2/2", "-1/2", "0/0", "1", "a/b", "1/2/3", ""):
        with pytest.raises(ValueError, match=r"`--shard` must be I/N with 0 <= I < N"):
            Shard.parse(bad, "--shard")


def test_shard_paths():
    assert Shard(1, 4).path("runs/exp.jsonl").as_posix() == "runs/exp.shard-1-of-4.jsonl"
    assert Shard(0, 2).path("exp").as_posix() == "exp.shard-0-of-2"
    assert Shard().path("exp.jsonl").as_posix() == "exp.jsonl"
    assert meta_path("runs/exp.jsonl").as_posix() == "runs/exp.jsonl.meta.json"


@pytest.mark.parametrize("total", [0, 1, 7, 10, 64])
@pytest.mark.parametrize("block_size", [1, 3, 10])
@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_shards_partition_the_rows(total, block_size, count):
    rows = [[i for b in shard_blocks(total, block_size, Shard(s, count)) for i in b] for s in range(count)]
    assert sorted(i for r in rows for i in r) == list(range(total))  # every row once
    assert all(r == sorted(r) for r in rows)  # in input order within a shard
    assert [len(b) for b in blocks(total, block_size)][:-1] == [block_size] * (len(blocks(total, block_size)) - 1)
    assert shard_blocks(10, 2, Shard(1, 4)) == [range(2, 4)]  # strided blocks: 1 (and 5, which does not exist)


def test_read_queries_file(tmp_path):
    tsv = tmp_path / "q.tsv"
    tsv.write_text("q1\twhat is lift ?\n\nq2\tflutter of wings\n", encoding="utf-8")
    assert read_queries_file(tsv) == [("q1", "what is lift ?"), ("q2", "flutter of wings")]
    jsonl = tmp_path / "queries.jsonl"
    jsonl.write_text('{"_id": 7, "text": "heat transfer"}\n{"_id": "8", "text": "buckling"}\n', encoding="utf-8")
    assert read_queries_file(jsonl) == [("7", "heat transfer"), ("8", "buckling")]
    tsv.write_text("q1\ta\nq1\tb\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"q\.tsv:2: query id 'q1' again \(first on line 1\)"):
        read_queries_file(tsv)
    tsv.write_text("no tab here\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"q\.tsv:1: expected 'query-id<TAB>text'"):
        read_queries_file(tsv)


# -- pure: merging synthetic shard files --------------------------------------------------------------------------
QUERIES = [(f"q{i}", f"query number {i} é") for i in range(7)]


def write_shards(folder, count, block_size=2, settings=None, queries=QUERIES):
    """Shard files of `queries` as `expandr expand --shard` writes them (fake expansions); the one-process bytes."""
    settings = {"block_size": block_size, "temperature": 1.0, **(settings or {})}
    meta = {"format": FORMAT, "queries": {"total": len(queries), "sha256": queries_digest(queries)},
            "settings": settings}

    def line(i):
        return json.dumps({"query_id": queries[i][0], "query": queries[i][1], "expansions": [f"text {i}"]},
                          ensure_ascii=False) + "\n"

    for s in range(count):
        shard = Shard(s, count)
        rows = [i for b in shard_blocks(len(queries), block_size, shard) for i in b]
        path = shard.path(folder / "exp.jsonl")
        path.write_text("".join(line(i) for i in rows), encoding="utf-8")
        meta_path(path).write_text(json.dumps({**meta, "shard": str(shard), "rows": len(rows)}))
    return "".join(line(i) for i in range(len(queries))).encode("utf-8")


@pytest.mark.parametrize("count", [2, 3, 5])
def test_merge_restores_query_order(tmp_path, count):
    expected = write_shards(tmp_path, count)
    meta = merge_shards(tmp_path / "exp.jsonl")  # finds exp.shard-*-of-N.jsonl itself
    assert (tmp_path / "exp.jsonl").read_bytes() == expected
    assert meta["shard"] is None and meta["rows"] == len(QUERIES)
    assert [m["file"] for m in meta["merged_from"]] == [f"exp.shard-{i}-of-{count}.jsonl" for i in range(count)]
    with pytest.raises(ShardError, match=r"exp\.jsonl: not a shard"):  # the merged file is a whole job
        merge_shards(tmp_path / "again.jsonl", [tmp_path / "exp.jsonl"])


def test_merge_names_a_missing_shard(tmp_path):
    write_shards(tmp_path, 3)
    (tmp_path / "exp.shard-1-of-3.jsonl").unlink()
    with pytest.raises(ShardError, match=r"1 of 3 shards missing: 1/3 \(exp\.shard-1-of-3\.jsonl\)"):
        merge_shards(tmp_path / "exp.jsonl")
    with pytest.raises(ShardError, match="no shard files exp.shard-I-of-N.jsonl"):
        merge_shards(tmp_path / "other" / "exp.jsonl")


def test_merge_refuses_incomplete_or_padded_shards(tmp_path):
    write_shards(tmp_path, 2)
    shard0 = tmp_path / "exp.shard-0-of-2.jsonl"
    full = shard0.read_bytes()
    shard0.write_bytes(full[: full.index(b"\n") + 1])  # one row of four
    with pytest.raises(ShardError, match=r"exp\.shard-0-of-2\.jsonl: 1 of its 4 rows \(incomplete\); rerun .*--shard 0/2"):
        merge_shards(tmp_path / "exp.jsonl")
    shard0.write_bytes(full[:-5])  # a kill mid-line
    with pytest.raises(ShardError, match=r"exp\.shard-0-of-2\.jsonl:4: a partial last line"):
        merge_shards(tmp_path / "exp.jsonl")
    shard0.write_bytes(full + full.splitlines(keepends=True)[0])
    with pytest.raises(ShardError, match=r"5 rows, but shard 0/2 has 4"):
        merge_shards(tmp_path / "exp.jsonl")
    assert not (tmp_path / "exp.jsonl").exists()  # nothing written by a failed merge


def test_merge_refuses_shards_of_other_jobs(tmp_path):
    write_shards(tmp_path, 2)
    other = tmp_path / "other"
    other.mkdir()
    write_shards(other, 2, settings={"temperature": 0.7})
    with pytest.raises(ShardError, match=r"made with other settings .*settings\.temperature: 1\.0 vs 0\.7"):
        merge_shards(tmp_path / "exp.jsonl", [tmp_path / "exp.shard-0-of-2.jsonl", other / "exp.shard-1-of-2.jsonl"])
    write_shards(other, 3)
    with pytest.raises(ShardError, match=r"shard 1/3, but .* is shard 0/2"):
        merge_shards(tmp_path / "exp.jsonl", [tmp_path / "exp.shard-0-of-2.jsonl", other / "exp.shard-1-of-3.jsonl"])
    write_shards(other, 2)
    with pytest.raises(ShardError, match=r"are both shard 0/2"):
        merge_shards(tmp_path / "exp.jsonl", [tmp_path / "exp.shard-0-of-2.jsonl", other / "exp.shard-0-of-2.jsonl"])
    meta_path(tmp_path / "exp.shard-1-of-2.jsonl").unlink()
    with pytest.raises(ShardError, match=r"exp\.shard-1-of-2\.jsonl: no exp\.shard-1-of-2\.jsonl\.meta\.json"):
        merge_shards(tmp_path / "exp.jsonl")


def test_merge_refuses_rows_that_are_not_the_jobs_queries(tmp_path):
    write_shards(tmp_path, 2)
    shard1 = tmp_path / "exp.shard-1-of-2.jsonl"
    shard1.write_text(shard1.read_text(encoding="utf-8").replace('"q2"', '"q0"'), encoding="utf-8")
    with pytest.raises(ShardError, match=r"query id 'q0' is in .*exp\.shard-0-of-2\.jsonl and again in "
                                         r".*exp\.shard-1-of-2\.jsonl"):
        merge_shards(tmp_path / "exp.jsonl")
    shard1.write_text(shard1.read_text(encoding="utf-8").replace('"q0"', '"q99"'), encoding="utf-8")
    with pytest.raises(ShardError, match="not the queries their meta files name"):
        merge_shards(tmp_path / "exp.jsonl")


def test_bad_shard_is_a_usage_error(tmp_path, capsys):
    assert main(["expand", "--data", "cranfield", "--out", str(tmp_path / "e.jsonl"), "--shard", "2/2"]) == 2
    assert "argument --shard: must be I/N with 0 <= I < N" in capsys.readouterr().err


# -- integration: the bundled model, byte for byte --------------------------------------------------------------------
@pytest.fixture()
def one_thread():
    """torch on one thread for the test: a row's text does not depend on the thread count (1 and 2 threads give the
    same bytes), and on a busy 2-core machine two OpenMP threads ran the same generation ~8x slower than one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.integration
def test_sharded_expansion_merges_byte_identical(tmp_path, capsys, one_thread):
    """6 Cranfield queries in blocks of 2 (batches of 2), no cache: a one-process run, then shards 0/2 (blocks 0 and
    2) and 1/2 (block 1) merged, must be the same bytes; a killed shard resumes; a missing shard is named."""
    common = ["--data", "cranfield", "--max-queries", "6", "--max-new-tokens", "8", "--batch-size", "2",
              "--block-size", "2", "--cache", "none", "--no-progress"]

    def expand(*extra) -> dict:
        assert main(["expand", *common, *extra]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    one = tmp_path / "one.jsonl"
    assert expand("--out", str(one))["new"] == 6
    out = tmp_path / "exp.jsonl"
    assert main(["merge-shards", str(out)]) == 1
    assert "no shard files" in capsys.readouterr().err
    assert expand("--out", str(out), "--shard", "0/2")["new"] == 4
    assert main(["merge-shards", str(out)]) == 1  # shard 1 not run yet
    assert "1 of 2 shards missing: 1/2 (exp.shard-1-of-2.jsonl)" in capsys.readouterr().err
    assert expand("--out", str(out), "--shard", "1/2")["new"] == 2
    assert main(["merge-shards", str(out)]) == 0
    capsys.readouterr()
    reference = one.read_bytes()
    assert out.read_bytes() == reference
    assert len(reference.splitlines()) == 6

    # a rerun of a finished shard writes nothing; a shard killed inside block 0 regenerates that block whole
    shard0 = tmp_path / "exp.shard-0-of-2.jsonl"
    assert expand("--out", str(out), "--shard", "0/2")["new"] == 0
    first_row = shard0.read_bytes().index(b"\n") + 1
    shard0.write_bytes(shard0.read_bytes()[: first_row + 10])  # one row and a partial line
    assert expand("--out", str(out), "--shard", "0/2")["new"] == 3
    assert [json.loads(r)["query_id"] for r in shard0.read_text(encoding="utf-8").splitlines()] == \
           [json.loads(r)["query_id"] for r in reference.decode("utf-8").splitlines()[:2] +
            reference.decode("utf-8").splitlines()[4:]]
    assert main(["merge-shards", str(out)]) == 0
    assert out.read_bytes() == reference

    # the same --out with other settings is refused (not appended to)
    assert main(["expand", *common, "--out", str(out), "--shard", "0/2", "--seed", "7"]) == 1
    assert "settings.seed: 42 vs 7" in capsys.readouterr().err
