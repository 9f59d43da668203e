"""
Cache-hit latency of `LLMQueryExpander.expand` when every expansion is cached, vs a raw sqlite lookup.

1. Fill a fresh cache: the bundled SmolLM2 expands `--queries` Cranfield test queries with max_new_tokens=8.
2. Time `--lookups` query lookups that are all hits:
   - `expand([q])`, one query per call (what `run` does per pipeline query);
   - `expand(queries)`, all queries per call (the batched path), repeated until `--lookups` queries are served.
   Raw baseline: `SELECT text FROM expansions WHERE key = ?` on the same sqlite file, one key per query.
Goal: < 1 ms per query (the raw ratio is printed for reference).

    python benchmarks/bench_cache.py [--queries 20] [--lookups 1000]
"""

from __future__ import annotations

import os

os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, verdict

from expandr_haystack import LLMQueryExpander
from expandr_haystack.evaluation.data import bundled_path, load_collection
from expandr_haystack.options import GenerationSettings

GOAL_MS = 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--lookups", type=int, default=1000)
    args = parser.parse_args()

    print(f"machine: {machine()}")
    queries = list(load_collection(bundled_path("cranfield"), "test", max_queries=args.queries).queries.values())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cache.sqlite"
        expander = LLMQueryExpander(generation=GenerationSettings(max_new_tokens=8), cache=str(path))
        started = time.perf_counter()
        expander.expand(queries)
        print(f"filled the cache: {len(queries)} queries in {time.perf_counter() - started:.1f} s "
              f"({expander.cache_stats})")

        rounds = max(1, args.lookups // len(queries))
        n_lookups = rounds * len(queries)
        expander.expand(queries)  # warm (statements prepared, pages cached)
        started = time.perf_counter()
        for _ in range(rounds):
            for q in queries:
                expander.expand([q])
        single_ms = 1000 * (time.perf_counter() - started) / n_lookups

        started = time.perf_counter()
        for _ in range(rounds):
            expander.expand(queries)
        batch_ms = 1000 * (time.perf_counter() - started) / n_lookups
        stats = expander.cache_stats
        assert stats["misses"] == len(queries), stats  # every timed lookup was a hit

        keys = [r.key for r in expander._plan(queries, None, None, None, None)]
        conn = sqlite3.connect(str(path))
        conn.execute("SELECT text FROM expansions WHERE key = ?", (keys[0],)).fetchone()
        started = time.perf_counter()
        for _ in range(rounds):
            for k in keys:
                conn.execute("SELECT text FROM expansions WHERE key = ?", (k,)).fetchone()
        raw_ms = 1000 * (time.perf_counter() - started) / n_lookups
        conn.close()

    print(f"{n_lookups} cached query lookups each way")
    print(f"raw sqlite SELECT by key     {raw_ms:8.4f} ms/query")
    print(f"expand([q]) one per call     {single_ms:8.4f} ms/query  ({single_ms / raw_ms:.1f}x raw)  "
          f"goal < {GOAL_MS} ms: {verdict(single_ms < GOAL_MS)}")
    print(f"expand({len(queries)} queries) batched   {batch_ms:8.4f} ms/query  ({batch_ms / raw_ms:.1f}x raw)  "
          f"goal < {GOAL_MS} ms: {verdict(batch_ms < GOAL_MS)}")


if __name__ == "__main__":
    main()
