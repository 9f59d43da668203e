"""
`expandr expand` (expansions of a query list to JSONL, whole or as one shard of N) and `expandr merge-shards`
(registered by `expandr_haystack.cli`):

    expandr expand (--data cranfield [--split test] | --queries queries.jsonl|queries.tsv) --out exp.jsonl
        [--shard I/N] [--block-size 64] [--llm PATH --adapter PATH] [--n-expansions 1] [--max-new-tokens 96]
        [--temperature 1.0] [--top-p 0.9] [--seed 42] [--batch-size 16] [--cache PATH|none]
        [--engine auto|packed|transformers|vllm] [--device cpu] [--max-queries N] [--overwrite] [--no-progress]
    expandr merge-shards exp.jsonl [SHARD_FILE ...] [--cache PATH]

One line per query, in input order: ``{"query_id": ..., "query": ..., "expansions": [...]}`` (this key order,
``ensure_ascii=False``), appended and fsynced block by block; a rerun resumes after the last row written. With
``--shard I/N`` the command writes ``exp.shard-I-of-N.jsonl`` (`shards.Shard.path`) with blocks I, I+N, ... of the
queries (`expandr_haystack.shards`: why blocks), and its own expansion cache ``<that file>.cache.sqlite`` unless
``--cache`` says otherwise (sqlite is safe between processes of one machine, not over a network file system).
`expandr merge-shards exp.jsonl` checks the N shard files (same settings and queries, every shard once, complete) and
writes ``exp.jsonl``: byte-identical to the file one process writes with the same settings (same ``--batch-size``
and ``--block-size``, same kind of machine). Every output has a ``.meta.json`` sidecar (`shards.meta_path`).

Usage:
```python
from expandr_haystack.cli import main

for i in range(2):
    main(["expand", "--data", "cranfield", "--max-queries", "8", "--out", "exp.jsonl", "--shard", f"{i}/2"])
main(["merge-shards", "exp.jsonl"])
```
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any

from expandr_haystack.checks import check_adapter_dir, check_int, check_model_name, check_number
from expandr_haystack.shards import (
    FORMAT,
    Shard,
    ShardError,
    check_shard,
    default_cache_path,
    differences,
    meta_path,
    read_meta,
    shard_blocks,
)
from expandr_haystack.training.cli import _arg, _collection, _out_file, _verbose

logger = logging.getLogger(__name__)


# -- the query list ---------------------------------------------------------------------------------------------------
def read_queries_file(path: str | Path) -> list[tuple[str, str]]:
    """``(query_id, text)`` in file order from a BEIR ``queries.jsonl`` (``_id``, ``text``; by the ``.jsonl`` /
    ``.json`` suffix) or a TSV ``id<TAB>text`` without header; a bad line or a repeated id names the file and line."""
    from expandr_haystack.evaluation.data import DataError, parse_jsonl

    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"no file {path}.")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix in (".jsonl", ".json"):
        pairs = [(str(r["_id"]), str(r["text"])) for r in parse_jsonl(lines, path, ("_id", "text"))]
        numbers = [n for n, line in enumerate(lines, start=1) if line.strip()]
    else:
        pairs, numbers = [], []
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            query_id, sep, text = line.partition("\t")
            if not sep or not query_id.strip():
                raise DataError(f"{path}:{n}: expected 'query-id<TAB>text' (or pass a .jsonl file); got {line!r:.120}.")
            pairs.append((query_id.strip(), text))
            numbers.append(n)
    first: dict[str, int] = {}
    for (query_id, _), n in zip(pairs, numbers):
        if query_id in first:
            raise DataError(f"{path}:{n}: query id {query_id!r} again (first on line {first[query_id]}).")
        first[query_id] = n
    return pairs


def load_queries(args: argparse.Namespace) -> tuple[list[tuple[str, str]], str]:
    """The job's ``(query_id, text)`` list (``--queries`` file, or ``--data``'s judged ``--split`` queries), cut to
    ``--max-queries``, every text checked as the expander checks it; and a description of where it came from."""
    from expandr_haystack.core.text import check_query
    from expandr_haystack.evaluation.data import load_collection

    if args.queries is not None:
        pairs, source = read_queries_file(args.queries), str(args.queries)
    else:
        collection = load_collection(args.data, split=args.split)
        pairs, source = list(collection.queries.items()), f"{collection.path} split {args.split!r}"
    pairs = pairs[: args.max_queries] if args.max_queries is not None else pairs
    for query_id, text in pairs:
        check_query(text, f"{source}: query {query_id!r}")
    return pairs, source


# -- expandr expand ---------------------------------------------------------------------------------------------------
def add_expand_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of `expandr expand`; the sampling defaults are `GenerationSettings`'."""
    from expandr_haystack.options import GenerationSettings, add_sampler_arguments

    g = GenerationSettings()
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=_collection, metavar="DATA", help='BEIR-layout folder, or "cranfield": its --split queries')
    source.add_argument("--queries", metavar="FILE", help="query file: BEIR queries.jsonl (_id, text) or a TSV id<TAB>text")
    p.add_argument("--split", default="test", help="--data: qrels split whose judged queries are used (default test)")
    p.add_argument("--out", required=True, type=_out_file, metavar="OUT",
                   help="output JSONL; with --shard I/N the shard writes OUT's stem + .shard-I-of-N + suffix")
    p.add_argument("--shard", type=_arg(check_shard, "--shard", convert=Shard.parse), default=Shard(), metavar="I/N",
                   help="I/N: expand only shard I of N (blocks I, I+N, ...), e.g. $SLURM_ARRAY_TASK_ID/8")
    p.add_argument("--block-size", type=_arg(check_int, "--block-size"), default=64,
                   help="queries per generation call, the unit of sharding; like --batch-size, every shard and "
                        "a one-process run must use the same for byte-identical output (default 64)")
    p.add_argument("--llm", default=None, type=_arg(check_model_name, "--llm", convert=str),
                   help="expander LLM: HF id or local folder (default: bundled SmolLM2)")
    p.add_argument("--adapter", default=None, type=_arg(check_adapter_dir, "--adapter", convert=str),
                   help="PEFT LoRA adapter folder for --llm")
    p.add_argument("--n-expansions", type=_arg(check_int, "--n-expansions"), default=1,
                   help="expansions per query (default 1)")
    p.add_argument("--max-new-tokens", type=_arg(check_int, "--max-new-tokens"), default=g.max_new_tokens,
                   help=f"length limit of an expansion (default {g.max_new_tokens})")
    p.add_argument("--temperature", type=_arg(check_number, "--temperature", 0.0, convert=float),
                   default=g.temperature, help=f"sampling temperature, 0 = greedy (default {g.temperature:g})")
    p.add_argument("--top-p", type=_arg(check_number, "--top-p", 0.0, 1.0, True, convert=float), default=g.top_p,
                   help=f"nucleus mass (default {g.top_p:g})")
    p.add_argument("--seed", type=int, default=g.seed, help=f"base seed of the per-row seeds (default {g.seed})")
    p.add_argument("--batch-size", type=_arg(check_int, "--batch-size"), default=g.batch_size,
                   help=f"rows generated together (default {g.batch_size})")
    p.add_argument("--cache", default=None, metavar="PATH",
                   help='expansion cache (sqlite); default OUTFILE.cache.sqlite next to the file written (one per '
                        'shard); "none" disables it')
    add_sampler_arguments(p)
    p.add_argument("--device", default=None, help='"cpu", "cuda:0", ... (default: best available)')
    p.add_argument("--max-queries", type=_arg(check_int, "--max-queries"), default=None,
                   help="use the first N queries (before sharding)")
    p.add_argument("--overwrite", action="store_true",
                   help="start the output (and its default cache) afresh instead of resuming it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def job_settings(expander, args: argparse.Namespace) -> dict[str, Any]:
    """What the texts depend on: shards and resumed runs must agree on all of it (the model by content, not path)."""
    from expandr_haystack.models import model_identity, resolve_device, resolve_llm_path

    options, g = expander.sampler_options, expander.generation
    return {"model": model_identity(resolve_llm_path(args.llm), args.adapter), "engine": expander.engine,
            "dtype": options.dtype, "device": resolve_device(options.device).split(":")[0],
            "prompt": expander.prompt, "system_prompt": expander.system_prompt,
            "n_expansions": expander.n_expansions, "temperature": g.temperature, "top_p": g.top_p,
            "max_new_tokens": g.max_new_tokens, "seed": g.seed, "max_prompt_tokens": options.max_prompt_tokens,
            "batch_size": g.batch_size, "block_size": args.block_size}


def _machine() -> dict[str, str]:
    """The torch version and CPU model: shards on other kinds of machine may round differently (see the merge)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"torch": torch.__version__, "cpu": cpu}


def _resume(out: Path, meta: dict[str, Any], expected_ids: list[str], shard: Shard) -> int:
    """How many rows of `out` are already done (0 when it is new); a file of another job is an error."""
    from expandr_haystack.evaluation.data import parse_jsonl
    from expandr_haystack.files import cut_partial_last_line

    if not out.exists():
        return 0
    again = "pass --overwrite to start it afresh, or another --out"
    if not meta_path(out).exists():
        raise ShardError(f"--out: {out} exists but has no {meta_path(out).name} (not written by `expandr expand`); "
                         f"{again}.")
    previous = read_meta(out)
    diff = differences(previous, meta, ("format", "shard", "queries", "settings"))
    if diff:
        raise ShardError(f"--out: {out} was written by another job: {'; '.join(diff)}; {again}.")
    rows = parse_jsonl(cut_partial_last_line(out).splitlines(), out, ("query_id",), ShardError)
    done = [str(r["query_id"]) for r in rows]
    if done != expected_ids[: len(done)]:
        raise ShardError(f"--out: the rows of {out} are not the first {len(done)} queries of shard {shard}; "
                         f"{again}.")
    return len(done)


def run_expand(args: argparse.Namespace) -> int:
    """Expand the queries of one shard (or all) into its output file, resuming it; returns the exit status."""
    from expandr_haystack.components.expander import LLMQueryExpander
    from expandr_haystack.evaluation.data import DataError
    from expandr_haystack.files import append_jsonl, atomic_write_json
    from expandr_haystack.options import GenerationSettings, SamplerOptions
    from expandr_haystack.shards import queries_digest

    _verbose()
    try:
        pairs, source = load_queries(args)
    except (DataError, ValueError) as exc:
        print(f"error: {'--queries' if args.queries else '--data/--split'}: {exc}", file=sys.stderr)
        return 2
    shard: Shard = args.shard
    out = shard.path(args.out)
    own = shard_blocks(len(pairs), args.block_size, shard)
    indices = [i for block in own for i in block]
    cache = str(default_cache_path(out)) if args.cache is None else args.cache
    cache = None if cache.lower() == "none" else cache
    if args.overwrite:  # the default cache too: rows cached in other batches would not be this job's text
        for path in (out, *([Path(cache + x) for x in ("", "-wal", "-shm")] if args.cache is None else [])):
            path.unlink(missing_ok=True)

    from haystack.utils import ComponentDevice

    expander = LLMQueryExpander(
        model=args.llm, adapter=args.adapter, n_expansions=args.n_expansions, cache=cache,
        generation=GenerationSettings(temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                      max_new_tokens=args.max_new_tokens, batch_size=args.batch_size),
        sampler=SamplerOptions(engine=args.engine, weight_precision=args.weight_precision,
                               device=ComponentDevice.from_str(args.device) if args.device else None))
    expander.warm_up()
    meta = {"format": FORMAT, "shard": None if shard.count == 1 else str(shard), "rows": len(indices),
            "queries": {"total": len(pairs), "sha256": queries_digest(pairs)},
            "settings": job_settings(expander, args),
            "run": {"source": source, "cache": cache, "argv": getattr(args, "argv", None), "machine": _machine()}}
    done = _resume(out, meta, [pairs[i][0] for i in indices], shard)
    atomic_write_json(meta_path(out), meta)
    print(f"{source}: {len(pairs)} queries; shard {shard}: {len(indices)} of them in {len(own)} block(s) of "
          f"{args.block_size}; {done} already in {out}; engine {expander.engine}; cache {cache or 'none'}",
          file=sys.stderr)
    if not own:
        logger.warning("Shard %s has no queries: %d queries make %d block(s) of %d (fewer than the %d shards).",
                       shard, len(pairs), -(-len(pairs) // args.block_size), args.block_size, shard.count)

    from tqdm.auto import tqdm

    started, written, short = time.time(), 0, 0
    bar = tqdm(total=len(indices), initial=done, desc="Expanding", unit="query", disable=args.no_progress)
    end = 0
    with out.open("a", encoding="utf-8") as f:
        for block in own:
            start, end = end, end + len(block)
            if end <= done:
                continue  # written by an earlier run
            # the whole block in one call even when part of it is written: its rows share batches as they did then
            texts = expander.expand([pairs[i][1] for i in block])
            for k, (i, expansions) in enumerate(zip(block, texts)):
                if start + k >= done:
                    append_jsonl(f, {"query_id": pairs[i][0], "query": pairs[i][1], "expansions": expansions})
                    written += 1
                    short += len(expansions) < args.n_expansions
            bar.update(end - max(start, done))
    bar.close()
    summary = {"out": str(out), "shard": str(shard), "rows": len(indices), "new": written,
               "queries_with_failed_expansions": short, "seconds": round(time.time() - started, 2),
               "expansion_cache": expander.cache_stats}
    if shard.count > 1:
        summary["then"] = f"expandr merge-shards {args.out}"
    print(json.dumps(summary))
    return 0


def add_expand_parser(subparsers) -> argparse.ArgumentParser:
    """Register `expandr expand` on an argparse subparsers object (used by `expandr_haystack.cli`)."""
    p = subparsers.add_parser(
        "expand", help="expand a query list to JSONL (whole, or one shard of N for a job array)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Expand queries with the ExpandR LLM into JSONL, one {query_id, query, expansions} line per "
                    "query.\n\nRerunning with the same --out resumes it. With --shard I/N only blocks I, I+N, ... "
                    "are expanded,\ninto OUT's stem + .shard-I-of-N + suffix; `expandr merge-shards OUT` then "
                    "writes OUT, byte-identical\nto a one-process run with the same settings.")
    add_expand_arguments(p)
    p.set_defaults(func=run_expand)
    return p


# -- expandr merge-shards ---------------------------------------------------------------------------------------------
def merge_caches(target: str | Path, sources: list[Path]) -> int:
    """Copy every entry of the sqlite expansion caches `sources` into `target` (existing keys kept); the count."""
    import sqlite3
    from contextlib import closing

    from expandr_haystack.cache import ExpansionCache

    cache, copied = ExpansionCache(target), 0
    for source in sources:
        with closing(sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True)) as conn:
            cursor = conn.execute("SELECT key, text FROM expansions")
            while chunk := cursor.fetchmany(5000):
                cache.put_many(dict(chunk))
                copied += len(chunk)
    return copied


def run_merge(args: argparse.Namespace) -> int:
    """Merge the shard files into `args.out` (and their caches into `args.cache`); returns the exit status."""
    from expandr_haystack.shards import find_shard_files, merge_shards

    meta = merge_shards(args.out, args.shards)
    summary = {"out": args.out, "rows": meta["rows"], "merged_from": [m["file"] for m in meta["merged_from"]]}
    if args.cache:
        files = [Path(f) for f in args.shards] or find_shard_files(args.out)
        caches = [default_cache_path(f) for f in files if default_cache_path(f).exists()]
        summary["cache"] = {"path": args.cache, "copied": merge_caches(args.cache, caches),
                            "from": [str(c) for c in caches]}
    print(json.dumps(summary))
    return 0


def add_merge_parser(subparsers) -> argparse.ArgumentParser:
    """Register `expandr merge-shards` on an argparse subparsers object (used by `expandr_haystack.cli`)."""
    p = subparsers.add_parser(
        "merge-shards", help="merge the shard files of `expandr expand --shard I/N` into one file",
        description="Check that shard files of `expandr expand --shard I/N` form one complete job (every shard "
                    "once, complete, same settings and queries) and write their rows, in query order, to OUT.")
    p.add_argument("out", metavar="OUT", type=_out_file, help="the job's --out (the merged file written)")
    p.add_argument("shards", metavar="SHARD_FILE", nargs="*",
                   help="the shard files (default: OUT's stem + .shard-*-of-* + suffix, next to OUT)")
    p.add_argument("--cache", default=None, metavar="PATH",
                   help="also copy the shards' default caches (SHARD_FILE.cache.sqlite, where present) into PATH")
    p.set_defaults(func=run_merge)
    return p


__all__ = ["add_expand_parser", "add_merge_parser", "job_settings", "load_queries", "merge_caches",
           "read_queries_file", "run_expand", "run_merge"]
