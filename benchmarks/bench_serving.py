"""
Serving: the ExpandR search pipeline behind Hayhooks (examples/hayhooks/, the PipelineWrapper route) under load.

1. Starts PostgreSQL + pgvector (examples/servers/postgres.py) on a temporary data folder and indexes the Cranfield
   documents (all 1,400 by default) with examples/hayhooks/index.py, in a subprocess.
2. Starts `hayhooks run` on 127.0.0.1 with a fresh expansion cache (EXPANDR_CACHE_DIR) and
   EXPANDR_MAX_NEW_TOKENS=--max-new-tokens; one untimed request first (a query outside the set).
3. Cold: `--queries` requests (the 75 Cranfield test queries in order, cycled as "<query> (variant k)" beyond 75 so
   every text is new: each request pays for its LLM expansion) sent by `--clients` threads, each with its own HTTP
   connection, taking the next query as soon as its last answer came back.
4. Warm: the same requests again: every expansion is now a cache hit, so what is left is the serving overhead
   (HTTP, JSON, the query encoder, the pgvector search).

For each phase it prints the answered and failed requests, latency per request (p50 / p95 / max, seconds, from send
to the full answer), throughput (requests/s over the phase's wall time) and whether every warm answer has the
documents of its cold answer. Then stops both servers and removes the temporary folder.

    python benchmarks/bench_serving.py [--queries 200] [--clients 4] [--max-new-tokens 64] [--docs 1400]
"""

from __future__ import annotations

import os

os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import EXAMPLES, cpu_line, load_example, machine

ROUTE = "expandr_search"


def make_queries(n: int) -> list[str]:
    """`n` distinct texts: the Cranfield test queries, then "<query> (variant k)" for k = 1, 2, ..."""
    from expandr_haystack.evaluation.data import bundled_path, load_collection

    base = list(load_collection(bundled_path("cranfield"), "test").queries.values())
    return [base[i % len(base)] + (f" (variant {i // len(base)})" if i >= len(base) else "") for i in range(n)]


@dataclass
class Phase:
    name: str
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    documents: dict[int, list[str]] = field(default_factory=dict)
    wall: float = 0.0


def run_phase(name: str, url: str, queries: list[str], clients: int, timeout: float) -> Phase:
    """Send every query once from `clients` threads (each takes the next query when its answer is in)."""
    phase, lock = Phase(name), threading.Lock()
    todo = iter(enumerate(queries))

    def client() -> None:
        with httpx.Client(timeout=timeout) as http:
            while True:
                with lock:
                    item = next(todo, None)
                if item is None:
                    return
                i, query = item
                started = time.perf_counter()
                try:
                    response = http.post(f"{url}/{ROUTE}/run", json={"query": query})
                    elapsed = time.perf_counter() - started
                    if response.status_code != 200:
                        raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
                    ids = [d["id"] for d in response.json()["result"]["documents"]]
                    if not ids:
                        raise RuntimeError("no documents")
                except (httpx.HTTPError, RuntimeError, ValueError, KeyError, TypeError) as error:  # counted, reported
                    with lock:
                        phase.errors.append(f"query {i}: {error}")
                    continue
                with lock:
                    phase.latencies.append(elapsed)
                    phase.documents[i] = ids

    started = time.perf_counter()
    threads = [threading.Thread(target=client, name=f"client-{k}") for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    phase.wall = time.perf_counter() - started
    return phase


def percentile(values: list[float], q: float) -> float:
    """The `q`-th percentile (0..100), linear between the two nearest ranks."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]


def report(phase: Phase, label: str, n: int) -> None:
    print(f"\n{label}")
    print(f"  answered {len(phase.latencies)}/{n}, errors {len(phase.errors)}")
    for error in phase.errors[:5]:
        print(f"    {error}")
    if phase.latencies:
        lat = phase.latencies
        print(f"  latency per request: p50 {percentile(lat, 50):.3f} s, p95 {percentile(lat, 95):.3f} s, "
              f"max {max(lat):.3f} s (mean {statistics.mean(lat):.3f} s)")
        print(f"  throughput: {len(lat) / phase.wall:.2f} requests/s ({phase.wall:.1f} s wall)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=200, help="requests per phase (distinct query texts)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients (threads)")
    parser.add_argument("--max-new-tokens", type=int, default=64,
                        help="expansion length (EXPANDR_MAX_NEW_TOKENS; the YAML's own is 64)")
    parser.add_argument("--docs", type=int, default=None, help="index only the first N Cranfield documents")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take")
    args = parser.parse_args(argv)
    for name in ("queries", "clients", "max_new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")

    print(f"date: {datetime.now(UTC).isoformat(timespec='seconds')}")
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(machine())
    print(cpu_line())
    print(f"{args.queries} requests per phase from {args.clients} clients, max_new_tokens {args.max_new_tokens}, "
          f"route /{ROUTE}/run (PipelineWrapper, examples/hayhooks/pipelines)")

    postgres = load_example("servers/postgres.py", "bench_serving_postgres")
    launcher = load_example("hayhooks/launcher.py", "bench_serving_launcher")
    work = Path(tempfile.mkdtemp(prefix="expandr-serving-"))
    work.chmod(0o711)  # as root PostgreSQL runs as nobody, which must reach its data folder
    server = hayhooks = None
    try:
        t0 = time.perf_counter()
        server = postgres.start(work / "pgdata")
        env = {"PG_CONN_STR": server.dsn}
        print(f"\nPostgreSQL + pgvector on {server.dsn} ({time.perf_counter() - t0:.1f} s)")
        index_cmd = [sys.executable, str(EXAMPLES / "hayhooks" / "index.py")]
        if args.docs:
            index_cmd += ["--docs", str(args.docs)]
        subprocess.run(index_cmd, env={**os.environ, **env}, check=True)

        t0 = time.perf_counter()
        hayhooks = launcher.start(EXAMPLES / "hayhooks" / "pipelines", cwd=work, log=work / "hayhooks.log",
                                  drop_env=("HAYSTACK_DESERIALIZATION_ALLOWLIST",),
                                  env={**env, "EXPANDR_CACHE_DIR": str(work / "cache"),
                                       "EXPANDR_MAX_NEW_TOKENS": str(args.max_new_tokens)})
        hayhooks.wait_for(ROUTE)
        print(f"hayhooks up with /{ROUTE} deployed ({time.perf_counter() - t0:.1f} s, models loaded in setup)")
        first = httpx.post(f"{hayhooks.url}/{ROUTE}/run", json={"query": "warm-up request outside the set"},
                           timeout=args.timeout)
        first.raise_for_status()

        queries = make_queries(args.queries)
        cold = run_phase("cold", hayhooks.url, queries, args.clients, args.timeout)
        report(cold, f"COLD cache (every request generates its expansion: LLM, {args.max_new_tokens} new tokens max, "
                     f"+ retrieval + HTTP):", len(queries))
        warm = run_phase("warm", hayhooks.url, queries, args.clients, args.timeout)
        report(warm, "WARM cache (every expansion a cache hit: serving overhead = HTTP + JSON + query encoder + "
                     "pgvector search):", len(queries))
        both = sorted(set(cold.documents) & set(warm.documents))
        same = sum(cold.documents[i] == warm.documents[i] for i in both)
        print(f"\nwarm answers with the documents of their cold answer: {same}/{len(both)}")
        alive = hayhooks.process.poll() is None
        print(f"server still up after both phases: {alive}")
        failed = cold.errors or warm.errors or same != len(both) or not alive
    finally:
        if hayhooks is not None:
            code = hayhooks.stop()
            print(f"hayhooks stopped (exit code {code})")
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
