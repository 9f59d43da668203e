"""
ExpandR over PostgreSQL + pgvector: parity with the FAISS path, HNSW recall, quality and latency.

The Cranfield corpus (`--docs`, default all 1,400) is embedded once by Haystack's stock
SentenceTransformersDocumentEmbedder and written by DocumentWriters into three stores, so every path searches the same
vectors: a pgvector table searched exactly (`exact_nearest_neighbor`), a pgvector table with an HNSW index (`hnsw`,
`hnsw.ef_search` = `--ef-search`), and an InMemoryDocumentStore for the FAISS path (`ExpandRRetriever(document_store=
..., search="faiss")`, exact). The queries (`--split all`: the 225 judged Cranfield queries, train 150 + test 75) are
expanded once by `LLMQueryExpander` (bundled SmolLM2-135M-Instruct, one expansion, `--max-new-tokens`, seed 42) into
an sqlite cache (`--cache`), so reruns do not generate again; every path gets the same expansions.

Printed (and written to `--out` as JSON):
- parity: the fraction of queries whose pgvector exact top 10 is the FAISS top 10 (same ids, same order), and the
  mean overlap@10, for fusion mean and rrf;
- HNSW recall@10 of the pgvector exact top 10 (mean over queries), mean and rrf;
- nDCG@10 and MRR@10 of each path (`expandr_haystack.evaluation.metrics.evaluate_run`), and of plain dense retrieval
  (FAISS path, no expansion) for reference;
- latency per query, p50 / p95 in ms, of `ExpandRRetriever.run(query, expansions)` (encode + search + fusion, what a
  pipeline pays) and of the search step alone (`ExpandRRetriever.search` with the query's precomputed vectors: the
  fused vector for mean; the query and expansion vectors, `rrf_depth` hits each, for rrf), the paths interleaved
  query by query;
- the cost of the wrapped retriever's store check (`components.search.StoreCheck`: one `count_documents()`, a
  `SELECT COUNT(*)` in PostgreSQL, per search for tables of at most READ_LIMIT rows, once for larger ones): the
  search step with the check and with it switched off, and
  `count_documents()` alone; with `--count-rows`, `SELECT COUNT(*)` on synthetic tables of those sizes (it scans the
  table: it grows with the table, unlike the search of an HNSW index).

PostgreSQL's planner scans a table of a few thousand rows rather than use its HNSW index (cheaper for it, and exact),
which would make the HNSW figures those of an exact search: the HNSW table's sessions run with `enable_seqscan=off`
(libpq `options` in its connection string) unless `--let-planner-choose`; the plan is printed. `hnsw.ef_search` is set
in the connection string too (pgvector-haystack 8.1.2 sets the store's `hnsw_ef_search` on one connection only).

The server: `--dsn`, else $PG_CONN_STR, else a local PostgreSQL + pgvector started in a temporary folder with
examples/servers/postgres.py (`pip install "expandr-haystack[servers]"`) and stopped at the end. The tables
`bench_exact` and `bench_hnsw` are created afresh.

    python benchmarks/bench_pgvector.py [--docs 1400] [--split all] [--max-new-tokens 64] [--latency-queries 100]
        [--cache /tmp/expandr-bench-pgvector/expansions.sqlite] [--out docs/runs/pgvector.json] [--count-rows 10000,100000]
    python benchmarks/bench_pgvector.py --docs 300 --max-queries 20 --max-new-tokens 8 --latency-queries 10  # sanity
"""

from __future__ import annotations

import os

os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import datetime
import json
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np
from _common import cpu_model, load_example, machine, simd_flags
from haystack.components.writers import DocumentWriter
from haystack.document_stores.in_memory import InMemoryDocumentStore
from haystack.utils import Secret
from haystack_integrations.components.retrievers.pgvector import PgvectorEmbeddingRetriever
from haystack_integrations.document_stores.pgvector import PgvectorDocumentStore

from expandr_haystack import ExpandRRetriever, LLMQueryExpander
from expandr_haystack.evaluation.data import bundled_path, load_collection
from expandr_haystack.evaluation.indexing import indexing_pipeline
from expandr_haystack.evaluation.metrics import evaluate_run, run_from_documents
from expandr_haystack.options import GenerationSettings

DIMENSION = 384
FUSIONS = ("mean", "rrf")
PATHS = ("faiss", "pg exact", "pg hnsw")


def with_options(dsn: str, *settings: str) -> str:
    """`dsn` with PostgreSQL settings for every session it opens (libpq `options`)."""
    if not settings:
        return dsn
    return f"{dsn}{'&' if '?' in dsn else '?'}options={quote(' '.join(f'-c {s}' for s in settings))}"


def pg_store(dsn: str, table: str, **kwargs: Any) -> PgvectorDocumentStore:
    """A PgvectorDocumentStore on `table` (created afresh), with index names of its own (unique per schema)."""
    return PgvectorDocumentStore(connection_string=Secret.from_token(dsn), table_name=table,
                                 embedding_dimension=DIMENSION, vector_function="cosine_similarity",
                                 recreate_table=True, keyword_index_name=f"{table}_keyword_index",
                                 hnsw_index_name=f"{table}_hnsw_index", **kwargs)


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = 1000 * np.asarray(seconds)
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)), "n": len(ms)}


def plan_of(dsn: str, table: str, vector: np.ndarray, limit: int) -> str:
    """The scan PostgreSQL picks for pgvector's nearest-neighbour query on `table` (EXPLAIN, its Scan line)."""
    import psycopg

    literal = "[" + ",".join(map(str, vector.tolist())) + "]"
    with psycopg.connect(dsn) as connection:
        rows = connection.execute(f"EXPLAIN SELECT id FROM {table} ORDER BY embedding <=> %s::vector LIMIT {limit}",
                                  (literal,)).fetchall()
    return next((r[0].strip().lstrip("-> ").split("  (")[0] for r in rows if "Scan" in r[0]), "?")


def count_scaling(dsn: str, sizes: list[int]) -> dict[int, float]:
    """Median ms of `SELECT COUNT(*)` on a synthetic table of random 384-d vectors, for each size (dropped after)."""
    import psycopg

    out = {}
    with psycopg.connect(dsn, autocommit=True) as c:
        for n in sizes:
            c.execute("DROP TABLE IF EXISTS bench_count")
            c.execute(f"CREATE TABLE bench_count (id varchar PRIMARY KEY, content text, meta jsonb, "
                      f"embedding vector({DIMENSION}))")
            c.execute(f"INSERT INTO bench_count SELECT i::text, 'document ' || i, '{{}}', (SELECT "
                      f"array_agg(random())::vector({DIMENSION}) FROM generate_series(1, {DIMENSION}) WHERE i > 0) "
                      f"FROM generate_series(1, {int(n)}) i")
            c.execute("VACUUM ANALYZE bench_count")
            times = []
            for _ in range(23):
                started = time.perf_counter()
                c.execute("SELECT COUNT(*) FROM bench_count").fetchone()
                times.append(time.perf_counter() - started)
            out[n] = 1000 * float(np.median(times[3:]))
        c.execute("DROP TABLE bench_count")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsn", default=os.environ.get("PG_CONN_STR"),
                        help="PostgreSQL + pgvector (default $PG_CONN_STR; neither: a temporary local server)")
    parser.add_argument("--docs", type=int, default=None, help="only the first N documents (default all 1,400)")
    parser.add_argument("--split", choices=("all", "test", "train"), default="all",
                        help="judged queries: all 225 (default), test 75 or train 150")
    parser.add_argument("--max-queries", type=int, default=None, help="only the first N queries (quick runs)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="expansion length (tokens)")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "expandr-bench-pgvector" /
                                              "expansions.sqlite"), help="expansion cache (sqlite; kept for reruns)")
    parser.add_argument("--ef-search", type=int, default=100, help="hnsw.ef_search (>= rrf_depth 100 for rrf)")
    parser.add_argument("--let-planner-choose", action="store_true",
                        help="do not force the HNSW index (small tables are then scanned exactly)")
    parser.add_argument("--latency-queries", type=int, default=100, help="queries timed one at a time")
    parser.add_argument("--count-rows", default="", help="comma-separated sizes of synthetic tables to time "
                                                          "SELECT COUNT(*) on, e.g. 10000,100000")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    started_at = datetime.datetime.now().astimezone()
    command = shlex.join(["python", *sys.argv] if argv is None else ["python", __file__, *argv])
    header = {"date": started_at.isoformat(timespec="seconds"), "command": command, "machine": machine(),
              "cpu": cpu_model(), "simd": simd_flags()}
    for key, value in header.items():
        print(f"{key}: {value}")

    launcher = server = None
    dsn = args.dsn
    if not dsn:
        launcher = load_example("servers/postgres.py", "expandr_example_postgres")
        folder = Path(tempfile.mkdtemp(prefix="expandr-bench-pg-"))
        folder.chmod(0o711)  # as root the server runs as `nobody`, which must reach its data folder
        server = launcher.start(folder / "data")
        dsn = server.dsn
        print(f"server: started PostgreSQL + pgvector on {dsn} (temporary, stopped at the end)")
    try:
        results = measure(args, dsn, header)
    finally:
        if server is not None:
            launcher.stop(server.data)
            shutil.rmtree(folder, ignore_errors=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


def measure(args: argparse.Namespace, dsn: str, header: dict[str, str]) -> dict[str, Any]:
    """Index, expand, retrieve and time (see the module docstring); prints the figures and returns them."""
    results: dict[str, Any] = {**header, "settings": {k: v for k, v in vars(args).items() if k != "dsn"}}

    # -- data: documents, queries, expansions ---------------------------------------------------------------------
    splits = ("train", "test") if args.split == "all" else (args.split,)
    collections = [load_collection(bundled_path("cranfield"), s) for s in splits]
    queries = {q: t for c in collections for q, t in c.queries.items()}
    qrels = {q: j for c in collections for q, j in c.qrels.items()}
    query_ids = list(queries)[: args.max_queries]
    texts = [queries[q] for q in query_ids]
    qrels = {q: qrels[q] for q in query_ids if q in qrels}
    documents = collections[0].documents()[: args.docs]

    expander = LLMQueryExpander(generation=GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=16),
                                cache=args.cache)
    started = time.perf_counter()
    expansions = expander.expand(texts)
    print(f"expansions: {len(texts)} queries, {args.max_new_tokens} new tokens, {time.perf_counter() - started:.1f} s "
          f"(cache {args.cache}: {expander.cache_stats})")

    # -- indexing: one embedding, three stores --------------------------------------------------------------------
    hnsw_settings = [f"hnsw.ef_search={args.ef_search}"] + ([] if args.let_planner_choose else ["enable_seqscan=off"])
    hnsw_dsn = with_options(dsn, *hnsw_settings)
    exact = pg_store(dsn, "bench_exact")
    hnsw = pg_store(hnsw_dsn, "bench_hnsw", search_strategy="hnsw", hnsw_ef_search=args.ef_search)
    memory = InMemoryDocumentStore(embedding_similarity_function="cosine")
    indexing = indexing_pipeline(exact, progress_bar=False)
    for name, store in (("to_hnsw", hnsw), ("to_memory", memory)):
        indexing.add_component(name, DocumentWriter(document_store=store))
        indexing.connect("embedder.documents", f"{name}.documents")
    started = time.perf_counter()
    indexing.run({"embedder": {"documents": documents}})
    assert exact.count_documents() == hnsw.count_documents() == memory.count_documents() == len(documents)
    print(f"indexed {len(documents)} documents once into pgvector exact, pgvector hnsw (ef_search {args.ef_search}) "
          f"and InMemory: {time.perf_counter() - started:.1f} s")
    stores = {"pg exact": exact, "pg hnsw": hnsw}

    def retriever(path: str, fusion: str) -> Any:
        if path == "faiss":
            return ExpandRRetriever(document_store=memory, top_k=10, fusion=fusion)
        return ExpandRRetriever(retriever=PgvectorEmbeddingRetriever(document_store=stores[path]), top_k=10,
                                fusion=fusion)

    retrievers = {(p, f): retriever(p, f) for p in PATHS for f in FUSIONS}
    for r in retrievers.values():
        r.warm_up()
    embedder = retrievers["faiss", "mean"].embedder
    probe = embedder.embed_fused(texts[:1], expansions[:1])[0]
    plans = {"pg exact": plan_of(dsn, "bench_exact", probe, 10), "pg hnsw": plan_of(hnsw_dsn, "bench_hnsw", probe, 10)}
    print(f"plans: pg exact: {plans['pg exact']}; pg hnsw: {plans['pg hnsw']} "
          f"({'forced: enable_seqscan=off' if not args.let_planner_choose else 'the planner chose'})")
    results["plans"] = plans

    # -- quality and parity ---------------------------------------------------------------------------------------
    ranked = {key: r.retrieve(texts, expansions) for key, r in retrievers.items()}
    ids = {key: [[d.id for d in docs] for docs in hits] for key, hits in ranked.items()}
    parity, quality = {}, {}
    print(f"\n{len(texts)} queries ({args.split}), {len(documents)} documents, top 10")
    print(f"{'fusion':<8}{'pg exact = FAISS top 10':>26}{'overlap@10':>12}{'HNSW recall@10 of exact':>26}")
    for f in FUSIONS:
        same = np.mean([a == b for a, b in zip(ids["pg exact", f], ids["faiss", f])])
        overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids["pg exact", f], ids["faiss", f])])
        recall = np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids["pg hnsw", f], ids["pg exact", f])])
        parity[f] = {"identical_top10_fraction": float(same), "overlap_at_10": float(overlap),
                     "hnsw_recall_at_10": float(recall)}
        print(f"{f:<8}{same:>26.4f}{overlap:>12.4f}{recall:>26.4f}")
    results["parity"] = parity

    dense = retrievers["faiss", "mean"].retrieve(texts)
    rows = [("dense (FAISS, no expansion)", dense)] + [(f"{p} {f}", ranked[p, f]) for f in FUSIONS for p in PATHS]
    print(f"\n{'path':<30}{'nDCG@10':>10}{'MRR@10':>10}")
    for name, hits in rows:
        means, _ = evaluate_run(qrels, run_from_documents(query_ids, hits))
        quality[name] = {"ndcg@10": means["ndcg@10"], "mrr@10": means["mrr@10"], "queries": means["queries"]}
        print(f"{name:<30}{100 * means['ndcg@10']:>10.2f}{100 * means['mrr@10']:>10.2f}")
    results["quality"] = quality

    # -- latency ----------------------------------------------------------------------------------------------------
    n = min(args.latency_queries, len(texts))
    fused = embedder.embed_fused(texts[:n], expansions[:n])
    per_query = [embedder.encode([embedder.query_text(q), *(embedder.expansion_text(e) for e in es)], prefix="",
                                 suffix="") for q, es in zip(texts[:n], expansions[:n])]  # rrf's search vectors
    depth = retrievers["faiss", "rrf"].fusion.rrf_depth
    timings: dict[str, list[float]] = {}

    def timed(name: str, fn: Any, *fn_args: Any, **fn_kwargs: Any) -> None:
        started = time.perf_counter()
        fn(*fn_args, **fn_kwargs)
        timings.setdefault(name, []).append(time.perf_counter() - started)

    no_check = {}  # the same retrievers with the store check switched off: what it costs
    for p, f in retrievers:
        if p != "faiss":
            no_check[p, f] = retriever(p, f)
            no_check[p, f].warm_up()
            no_check[p, f].searcher.check.check = lambda dimension: None
    for r in [*retrievers.values(), *no_check.values()]:  # warm: connections, the FAISS index, the first check
        r.run(query=texts[0], expansions=expansions[0])
    for i in range(n):
        keys = list(retrievers) if i % 2 == 0 else list(retrievers)[::-1]
        for p, f in keys:
            vectors, kwargs = (fused[i], {}) if f == "mean" else (per_query[i], {"top_k": depth})
            timed(f"run {p} {f}", retrievers[p, f].run, query=texts[i], expansions=expansions[i])
            timed(f"search {p} {f}", retrievers[p, f].search, vectors, **kwargs)
            if p != "faiss":
                timed(f"search {p} {f}, no check", no_check[p, f].search, vectors, **kwargs)
        timed("count_documents pg exact", exact.count_documents)
    latency = {name: percentiles(t) for name, t in timings.items()}
    results["latency"] = latency
    print(f"\nlatency per query over {n} queries (ms; run = encode + search + fusion; search = the search step alone, "
          f"rrf: {1 + len(expansions[0])} searches x {depth} hits)")
    print(f"{'':<36}{'p50':>9}{'p95':>9}")
    for name, stats in latency.items():
        print(f"{name:<36}{stats['p50_ms']:>9.2f}{stats['p95_ms']:>9.2f}")
    for f in FUSIONS:
        with_check = latency[f"search pg exact {f}"]["p50_ms"]
        without = latency[f"search pg exact {f}, no check"]["p50_ms"]
        print(f"store check, pg exact {f}: {with_check - without:+.2f} ms p50 "
              f"({100 * (with_check - without) / without:+.1f}% of the search step)")

    if args.count_rows:
        sizes = [int(s) for s in args.count_rows.split(",") if s.strip()]
        scaling = count_scaling(dsn, sizes)
        results["count_ms_by_rows"] = scaling
        print("SELECT COUNT(*) (the store check's query) on synthetic tables: " +
              ", ".join(f"{rows:,} rows {ms:.2f} ms" for rows, ms in scaling.items()))

    for r in [*retrievers.values(), *no_check.values()]:
        r.close()
    exact.close()
    hnsw.close()
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return results


if __name__ == "__main__":
    raise SystemExit(main())
