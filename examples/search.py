"""
ExpandR search over the bundled Cranfield collection (the `make run` job).

1. Index the corpus with Haystack's stock SentenceTransformersDocumentEmbedder (bundled all-MiniLM-L6-v2).
2. Build the pipeline  LLMQueryExpander (bundled SmolLM2-135M-Instruct) -> ExpandRRetriever.
3. Expand the test queries in batches (this fills the persistent cache), then run the pipeline on each query
   (cache hits), print a few queries with their expansion and top documents, and nDCG@10 with/without expansion.

    python examples/search.py [--max-queries N] [--n-expansions N] [--cache PATH]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")

from haystack import Pipeline

from expandr_haystack import ExpandRRetriever, LLMQueryExpander
from expandr_haystack.data import bundled_path, load_collection
from expandr_haystack.indexing import build_document_store
from expandr_haystack.metrics import evaluate_run, run_from_documents
from expandr_haystack.models import expandr_home


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-queries", type=int, default=None, help="evaluate on the first N test queries")
    parser.add_argument("--n-expansions", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--cache", default=str(expandr_home() / "cache" / "expansions.sqlite"))
    parser.add_argument("--show", type=int, default=3, help="queries to print in full")
    args = parser.parse_args()

    started = time.time()
    collection = load_collection(bundled_path("cranfield"), split="test", max_queries=args.max_queries)
    print(f"Cranfield: {len(collection.corpus)} documents, {len(collection.queries)} test queries")
    store = build_document_store(collection.documents(), progress_bar=True)

    expander = LLMQueryExpander(n_expansions=args.n_expansions, max_new_tokens=args.max_new_tokens,
                                cache=args.cache, progress_bar=True)
    retriever = ExpandRRetriever(document_store=store, top_k=100)
    pipeline = Pipeline()
    pipeline.add_component("expander", expander)
    pipeline.add_component("retriever", retriever)
    pipeline.connect("expander.query", "retriever.query")
    pipeline.connect("expander.expansions", "retriever.expansions")
    pipeline.warm_up()

    query_ids, queries = list(collection.queries), list(collection.queries.values())
    expander.expand(queries)  # batched generation; the pipeline runs below are cache hits
    expanded_results, plain_results = [], []
    for i, (qid, query) in enumerate(zip(query_ids, queries)):
        out = pipeline.run({"expander": {"query": query}}, include_outputs_from={"expander"})
        docs = out["retriever"]["documents"]
        expanded_results.append(docs)
        if i < args.show:
            print(f"\n[{qid}] {query}")
            print(f"  expansion: {out['expander']['expansions'][0][:300]!r}")
            for rank, d in enumerate(docs[:3], start=1):
                mark = "*" if d.id in collection.qrels[qid] else " "
                print(f"  {rank}.{mark} {d.id:>5} {d.score:.3f} {d.meta.get('title', '')[:90]}")
    plain_results = retriever.retrieve(queries, None, top_k=100)

    print(f"\nnDCG@10 on Cranfield test ({len(queries)} queries; * = judged relevant above)")
    for name, results in (("dense, no expansion", plain_results), ("ExpandR fused (mean)", expanded_results)):
        means, _ = evaluate_run(collection.qrels, run_from_documents(query_ids, results))
        print(f"  {name:<22} nDCG@10 {100 * means['ndcg@10']:6.2f}   Recall@100 {100 * means['recall@100']:6.2f}")
    print(f"\ncache: {expander.cache_stats}; total {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
