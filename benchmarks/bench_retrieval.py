"""
Retrieval benchmark: the `ExpandRRetriever` query path vs raw `SentenceTransformer.encode` + faiss `IndexFlatIP`.

Both sides embed the same queries (and expansions) with the same encoder object, batch size and normalisation, and
search the same document vectors for the top `--top-k`. Five cases:

- `batch, no expansion`:   `retriever.retrieve(queries)`             vs  encode(queries) + index.search
- `batch, 1 expansion`:    `retriever.retrieve(queries, expansions)` vs  encode(queries + expansions), mean of unit
                                                                          vectors (numpy), index.search
- `single, no expansion`:  `retriever.run(query)` per query          vs  encode([query]) + index.search per query
- `single, 1 expansion`:   `retriever.run(query, expansions)`        vs  the same per query
- `search only, single`:   `retriever.search(vector)` per query      vs  index.search(vector) + the ids of the hits
                           (the query vectors encoded beforehand: the retriever's own cost without the encoder)

The corpus is the bundled Cranfield collection (1,400 documents), embedded once with raw `encode` (indexing speed is
`bench_indexing.py`'s subject); the queries are all 225 Cranfield queries. Stand-in expansions: the first 60 words
of a Cranfield document (the length of a 96-token generation), so no LLM is needed. Goals: component time <= 1.15x
raw time (medians of interleaved repeats), and the per-query overhead over raw faiss (component - raw, ms per
query) <= 1 ms at top_k 100 for the single-query cases (issue #15 goal 4).

    python benchmarks/bench_retrieval.py [--repeats 5] [--single-queries 50] [--top-k 100]
    python benchmarks/bench_retrieval.py --repeats 1 --max-queries 20 --single-queries 10 --docs 300  # sanity
"""

from __future__ import annotations

import os

os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np
from _common import interleaved, machine, median, summary, verdict
from haystack import Document
from haystack.document_stores.in_memory import InMemoryDocumentStore

from expandr_haystack import ExpandRQueryEmbedder, ExpandRRetriever
from expandr_haystack.evaluation.data import bundled_path, load_collection
from expandr_haystack.models import load_encoder, resolve_device
from expandr_haystack.options import EncoderOptions

GOAL = 1.15
GOAL_OVERHEAD_MS = 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--single-queries", type=int, default=50, help="queries timed one at a time")
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--docs", type=int, default=None, help="index only the first N documents (quick runs)")
    parser.add_argument("--max-queries", type=int, default=None, help="only the first N queries (quick runs)")
    args = parser.parse_args()

    import faiss

    print(f"machine: {machine()}")
    test = load_collection(bundled_path("cranfield"), "test")
    train = load_collection(bundled_path("cranfield"), "train")
    queries = (list(train.queries.values()) + list(test.queries.values()))[: args.max_queries]
    rng = random.Random(0)
    bodies = [d["text"] for d in test.corpus.values() if len(d["text"].split()) >= 60]
    expansions = [[" ".join(rng.choice(bodies).split()[:60])] for _ in queries]

    encoder = load_encoder(None, resolve_device(None))  # the very object the retriever uses (memoised)
    corpus = dict(list(test.corpus.items())[: args.docs])
    texts = [f"{d['title']}\n{d['text']}" for d in corpus.values()]
    doc_vectors = encoder.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    doc_vectors = np.ascontiguousarray(doc_vectors, dtype=np.float32)
    store = InMemoryDocumentStore(embedding_similarity_function="cosine")
    store.write_documents([Document(id=i, content=d["text"], meta={"title": d["title"]}, embedding=v.tolist())
                           for (i, d), v in zip(corpus.items(), doc_vectors)])
    embedder = ExpandRQueryEmbedder(encoder=EncoderOptions(batch_size=args.batch_size))
    retriever = ExpandRRetriever(document_store=store, top_k=args.top_k, query_embedder=embedder)
    retriever.warm_up()
    retriever.refresh_index()  # built once, as in a serving process

    index = faiss.IndexFlatIP(doc_vectors.shape[1])
    index.add(doc_vectors)
    ids = list(corpus)

    def raw_encode(qs):
        return encoder.encode(qs, batch_size=args.batch_size, normalize_embeddings=True, convert_to_numpy=True,
                              show_progress_bar=False)

    def raw_plain(qs):
        _, rows = index.search(np.ascontiguousarray(raw_encode(qs), dtype=np.float32), args.top_k)
        return [[ids[r] for r in row] for row in rows]

    def raw_fused(qs, exps):
        flat = [e for es in exps for e in es]
        emb = raw_encode(list(qs) + flat)
        q, e = emb[: len(qs)], emb[len(qs):]
        fused = 0.5 * q + 0.5 * e  # one expansion per query, both unit vectors
        _, rows = index.search(np.ascontiguousarray(fused, dtype=np.float32), args.top_k)
        return [[ids[r] for r in row] for row in rows]

    # sanity: the same rankings
    assert [[d.id for d in r] for r in retriever.retrieve(queries[:20], None, top_k=10)] == \
        [r[:10] for r in raw_plain(queries[:20])]
    single = queries[: args.single_queries]
    single_exp = expansions[: args.single_queries]
    single_vectors = np.ascontiguousarray(raw_encode(single), dtype=np.float32)

    def raw_search_only():
        out = []
        for v in single_vectors:
            _, rows = index.search(v[None], args.top_k)
            out.append([ids[r] for r in rows[0]])
        return out

    assert [[d.id for d in retriever.search(v)[0]] for v in single_vectors[:5]] == raw_search_only()[:5]
    cases = {
        "batch, no expansion": (lambda: retriever.retrieve(queries, None), lambda: raw_plain(queries), len(queries)),
        "batch, 1 expansion": (lambda: retriever.retrieve(queries, expansions),
                               lambda: raw_fused(queries, expansions), len(queries)),
        "single, no expansion": (lambda: [retriever.run(q) for q in single],
                                 lambda: [raw_plain([q]) for q in single], len(single)),
        "single, 1 expansion": (lambda: [retriever.run(q, e) for q, e in zip(single, single_exp)],
                                lambda: [raw_fused([q], [e]) for q, e in zip(single, single_exp)], len(single)),
        "search only, single": (lambda: [retriever.search(v) for v in single_vectors], raw_search_only, len(single)),
    }
    print(f"corpus {len(ids)} documents; top_k {args.top_k}; {args.repeats} interleaved repeats (median)\n")
    print(f"{'case':<22}{'queries':>8}{'raw ms/q':>10}{'component ms/q':>16}{'ratio':>8}{'overhead ms/q':>15}  "
          f"goals: ratio <= {GOAL}x; overhead <= {GOAL_OVERHEAD_MS:g} ms/q (single-query cases)")
    for name, (component, raw, n) in cases.items():
        component(), raw()  # warm
        times = interleaved({"component": component, "raw": raw}, args.repeats)
        ratio = median(times["component"]) / median(times["raw"])
        overhead = 1000 * (median(times["component"]) - median(times["raw"])) / n
        single_query = name.startswith(("single", "search only"))
        goals = ([] if name.startswith("search only") else [ratio <= GOAL]) + (
            [overhead <= GOAL_OVERHEAD_MS] if single_query else [])
        print(f"{name:<22}{n:>8}{1000 * median(times['raw']) / n:>10.2f}{1000 * median(times['component']) / n:>16.2f}"
              f"{ratio:>8.3f}{overhead:>15.3f}  {verdict(all(goals))}")
        print(f"{'':<22}raw {summary(times['raw'])}; component {summary(times['component'])}")


if __name__ == "__main__":
    main()
