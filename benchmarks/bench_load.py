"""
Load: N queries (default 1,000) through the expander + retriever Haystack Pipeline with the cache on; does memory
stay flat?

1. Builds the bundled Cranfield store (1,400 documents, bundled all-MiniLM-L6-v2).
2. Makes N distinct queries from the 225 bundled Cranfield queries (train + test): the query itself, then variants
   "<query> (variant k)"; every variant is a different text, hence a different cache key and a fresh expansion.
3. Fills a fresh sqlite cache by calling the pipeline's own `LLMQueryExpander.expand` on all N queries in batches
   (bundled SmolLM2-135M-Instruct, `--max-new-tokens`, default 8, to keep generation cheap on a CPU).
4. Runs `Pipeline.run` (expander -> retriever, `top_k=10`) once per query, one query at a time, every expansion a
   cache hit, and samples the process's resident set size (RSS) every `--every` queries.

Prints RSS after warm-up, after the first `--every` queries and after all N, the growth between the two, the time per
query and the cache counters.

    python benchmarks/bench_load.py [--queries 1000] [--max-new-tokens 8] [--every 100] [--cache PATH]
"""

from __future__ import annotations

import os

os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine


def rss_mib() -> float:
    """Resident set size of this process in MiB (psutil when installed, else /proc/self/status VmRSS)."""
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("cannot read the resident set size (no psutil, no /proc/self/status)")


def make_queries(n: int) -> list[str]:
    from expandr_haystack.evaluation.data import bundled_path, load_collection

    base = []
    for split in ("train", "test"):
        base.extend(load_collection(bundled_path("cranfield"), split=split).queries.values())
    out = []
    k = 0
    while len(out) < n:
        out.extend(q if k == 0 else f"{q} (variant {k})" for q in base[: n - len(out)])
        k += 1
    assert len(set(out)) == n
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--cache", default=None, help="sqlite cache (default: a fresh temporary file)")
    args = parser.parse_args()

    from haystack import Pipeline

    from expandr_haystack import ExpandRRetriever, LLMQueryExpander
    from expandr_haystack.evaluation.data import bundled_path, load_collection
    from expandr_haystack.evaluation.indexing import build_document_store
    from expandr_haystack.options import GenerationSettings

    print(f"machine: {machine()}")
    cache = args.cache or str(Path(tempfile.mkdtemp(prefix="bench-load-")) / "expansions.sqlite")
    started = time.perf_counter()
    store = build_document_store(load_collection(bundled_path("cranfield")).documents(), progress_bar=False)
    print(f"store: {store.count_documents()} documents embedded in {time.perf_counter() - started:.0f} s")

    queries = make_queries(args.queries)
    expander = LLMQueryExpander(generation=GenerationSettings(max_new_tokens=args.max_new_tokens), cache=cache)
    p = Pipeline()
    p.add_component("expander", expander)
    p.add_component("retriever", ExpandRRetriever(document_store=store, top_k=10))
    p.connect("expander.query", "retriever.query")
    p.connect("expander.expansions", "retriever.expansions")
    p.warm_up()

    started = time.perf_counter()
    for i in range(0, len(queries), 64):
        expander.expand(queries[i:i + 64])
    fill_s = time.perf_counter() - started
    stats = expander.cache_stats
    print(f"cache fill: {len(queries)} distinct queries, {stats['misses']} expansions generated "
          f"(max_new_tokens={args.max_new_tokens}) in {fill_s:.0f} s; {stats['entries']} cache entries")

    # one query through the pipeline (first index build, lazy allocations), then measure
    p.run({"expander": {"query": queries[0]}})
    gc.collect()
    samples = [(0, rss_mib())]
    hits_before, misses_before = expander.cache_stats["hits"], expander.cache_stats["misses"]
    started = time.perf_counter()
    for n, q in enumerate(queries, start=1):
        docs = p.run({"expander": {"query": q}})["retriever"]["documents"]
        assert len(docs) == 10
        if n % args.every == 0 or n == len(queries):
            samples.append((n, rss_mib()))
    loop_s = time.perf_counter() - started
    stats = expander.cache_stats
    print(f"pipeline: {len(queries)} queries in {loop_s:.1f} s ({1000 * loop_s / len(queries):.1f} ms/query); "
          f"cache hits {stats['hits'] - hits_before}, misses {stats['misses'] - misses_before}, "
          f"entries {stats['entries']}")
    print("RSS (MiB) after N queries: " + ", ".join(f"{n}: {r:.0f}" for n, r in samples))
    first = next(r for n, r in samples if n >= args.every)
    print(f"RSS at start {samples[0][1]:.0f} MiB, after {args.every} {first:.0f} MiB, after {samples[-1][0]} "
          f"{samples[-1][1]:.0f} MiB; growth from {args.every} to {samples[-1][0]} queries: "
          f"{samples[-1][1] - first:+.1f} MiB ({samples[-1][1] - samples[0][1]:+.1f} MiB from the start)")


if __name__ == "__main__":
    main()
