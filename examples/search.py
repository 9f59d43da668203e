"""
ExpandR search over the bundled Cranfield collection (the `make run` job).

1. Index the corpus with Haystack's stock SentenceTransformersDocumentEmbedder (bundled all-MiniLM-L6-v2).
2. Choose the fusion settings on a validation split carved from the *train* queries (never the test split): the
   query weight w of each ExpandR mode and Rocchio's (k, f).
3. Build three Haystack pipelines with the bundled SmolLM2-135M-Instruct:
   - q2d (the paper's):    LLMQueryExpander -> ExpandRRetriever
   - grounded (ours):      ExpandRRetriever (first pass) -> LLMQueryExpander(GROUNDED_PROMPT) -> ExpandRRetriever
   - Haystack's own:       QueryExpander(LocalChatGenerator) -> MultiQueryEmbeddingRetriever (same LLM, settings,
                           encoder and store: the baseline that isolates the method); the LLM's reply is prefilled
                           with '{"queries": ["' and ends at the first ']}' (JSON_PREFILL: structured output, as a
                           Haystack user turns it on for a small model; --no-multiquery-prefill: its free replies)
4. Expand the test queries in batches (this fills the persistent cache), run the pipelines on each query (cache
   hits), print a few queries with their expansions and top documents, then nDCG@10 of dense retrieval (no
   expansion), PRF, each ExpandR mode and Haystack's multi-query expansion (with how often its JSON was readable).

    python examples/search.py [--max-queries N] [--n-expansions 1] [--temperature 0.7] [--max-new-tokens 48]
                               [--passage-words 30] [--validation-size 16] [--no-multiquery-prefill]

The defaults are small so that `make run` stays near 10 minutes on 2 CPU cores (grounded prompts are long: their
prefill dominates); `expandr eval --tune-on train --seeds 1,2,3 --n-expansions 4` is the full protocol
(docs/training.md).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")

from haystack import Pipeline

from expandr_haystack import GROUNDED_PROMPT, ExpandRRetriever, LLMQueryExpander, LocalChatGenerator
from expandr_haystack.evaluation.data import bundled_path, load_collection
from expandr_haystack.evaluation.indexing import build_document_store
from expandr_haystack.evaluation.metrics import evaluate_run, run_from_documents
from expandr_haystack.evaluation.multiquery import (
    JSON_PREFILL,
    MULTIQUERY_BATCH_SIZE,
    MultiQueryStats,
    expander_messages,
    multiquery_pipeline,
    quiet_query_expander,
    stats_line,
)
from expandr_haystack.evaluation.protocol import select_settings
from expandr_haystack.models import expandr_home
from expandr_haystack.options import FusionSettings, GenerationSettings


def q2d_pipeline(store, expander: LLMQueryExpander, query_weight: float) -> Pipeline:
    """LLMQueryExpander -> ExpandRRetriever (the paper's query-to-document expansion)."""
    p = Pipeline()
    p.add_component("expander", expander)
    p.add_component("retriever", ExpandRRetriever(document_store=store, top_k=100,
                                                  fusion=FusionSettings(query_weight=query_weight)))
    p.connect("expander.query", "retriever.query")
    p.connect("expander.expansions", "retriever.expansions")
    return p


def grounded_pipeline(store, expander: LLMQueryExpander, query_weight: float) -> Pipeline:
    """ExpandRRetriever -> LLMQueryExpander(GROUNDED_PROMPT) -> ExpandRRetriever: the expander reads the first
    pass's top hits (the query goes to the first retriever and to the expander)."""
    p = Pipeline()
    p.add_component("first_pass", ExpandRRetriever(document_store=store, top_k=expander.passages_k))
    p.add_component("expander", expander)
    p.add_component("retriever", ExpandRRetriever(document_store=store, top_k=100,
                                                  fusion=FusionSettings(query_weight=query_weight)))
    p.connect("first_pass.documents", "expander.documents")
    p.connect("expander.query", "retriever.query")
    p.connect("expander.expansions", "retriever.expansions")
    return p


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-queries", type=int, default=None, help="evaluate on the first N test queries")
    parser.add_argument("--n-expansions", type=int, default=1, help="expansions averaged per query")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--passage-words", type=int, default=30, help="grounded: words of each first-pass hit")
    parser.add_argument("--validation-size", type=int, default=16, help="train queries carved for validation")
    parser.add_argument("--cache", default=str(expandr_home() / "cache" / "expansions.sqlite"))
    parser.add_argument("--show", type=int, default=2, help="queries to print in full")
    parser.add_argument("--multiquery-prefill", action=argparse.BooleanOptionalAction, default=True,
                        help="start Haystack multi-query's LLM replies with the JSON opening, end them at ']}'")
    args = parser.parse_args(argv)

    started = time.time()
    test = load_collection(bundled_path("cranfield"), split="test", max_queries=args.max_queries)
    _, validation = load_collection(bundled_path("cranfield"), split="train").split_validation(
        args.validation_size, seed=0)
    print(f"Cranfield: {len(test.corpus)} documents, {len(test.queries)} test queries, "
          f"{len(validation.queries)} validation queries carved from train")
    store = build_document_store(test.documents(), progress_bar=True)
    generation = GenerationSettings(temperature=args.temperature, max_new_tokens=args.max_new_tokens, batch_size=32,
                                    progress_bar=True)
    q2d = LLMQueryExpander(n_expansions=args.n_expansions, generation=generation, cache=args.cache)
    # grounded prompts are ~4x longer: 16 rows a batch keep their KV cache (~46 KB a token) near q2d's at 32
    grounded = LLMQueryExpander(prompt=GROUNDED_PROMPT, passage_words=args.passage_words,
                                n_expansions=args.n_expansions, generation=generation.replace(batch_size=16),
                                cache=args.cache)

    chosen = select_settings(validation, ["prf", "expand", "grounded"], expander=q2d, grounded_expander=grounded,
                             store=store)
    w = chosen.query_weight
    print(f"chosen on validation: w(q2d) {w['expand']:g}, w(grounded) {w['grounded']:g}, "
          f"PRF k {chosen.feedback_k} f {chosen.feedback_weight:g}")

    # Haystack's QueryExpander + MultiQueryEmbeddingRetriever on the same LLM (and settings) and store
    chat = LocalChatGenerator(generation=generation.replace(batch_size=MULTIQUERY_BATCH_SIZE), cache=args.cache,
                              **(JSON_PREFILL if args.multiquery_prefill else {}))
    pipelines = {"q2d": q2d_pipeline(store, q2d, w["expand"]),
                 "grounded": grounded_pipeline(store, grounded, w["grounded"]),
                 "multiquery": multiquery_pipeline(store, chat, n_expansions=args.n_expansions, top_k=100)}
    for p in pipelines.values():
        p.warm_up()
    query_ids, queries = list(test.queries), list(test.queries.values())
    dense = ExpandRRetriever(document_store=store, top_k=100)
    dense.warm_up()
    plain = dense.retrieve(queries, None)
    q2d.expand(queries)  # batched generation: the pipeline runs below are cache hits
    grounded.expand(queries, passages=dense.retrieve(queries, None, top_k=grounded.passages_k))
    multiquery = pipelines["multiquery"].get_component("expander")
    replies = multiquery.chat_generator.generate(expander_messages(multiquery, queries))  # batched, cached
    results, parsed = {mode: [] for mode in pipelines}, MultiQueryStats()
    for i, (qid, query) in enumerate(zip(query_ids, queries)):
        for mode, pipeline in pipelines.items():
            inputs = {"expander": {"query": query}} | ({"first_pass": {"query": query}} if mode == "grounded" else {})
            with quiet_query_expander():  # its warning per unreadable reply is counted in `parsed` instead
                out = pipeline.run(inputs, include_outputs_from={"expander"})
            docs = out["retriever"]["documents"][:100]  # multi-query: the best 100 of the merged searches
            results[mode].append(docs)
            if mode == "multiquery":
                parsed.add(query, out["expander"]["queries"], replies[i].text or "")
            if i < args.show:
                if mode == "multiquery":
                    print(f"\n[{qid}] {query}\n  multiquery queries: {out['expander']['queries']!r} (LLM reply: "
                          f"{(replies[i].text or '')[:160]!r})")
                else:
                    print(f"\n[{qid}] {query}\n  {mode} expansion: {out['expander']['expansions'][0][:240]!r}")
                for rank, d in enumerate(docs[:3], start=1):
                    mark = "*" if d.id in test.qrels[qid] else " "
                    print(f"  {rank}.{mark} {d.id:>5} {d.score:.3f} {d.meta.get('title', '')[:90]}")
    prf = dense.retrieve(queries, None, feedback_k=chosen.feedback_k, feedback_weight=chosen.feedback_weight)

    print(f"\nnDCG@10 on Cranfield test ({len(queries)} queries; * = judged relevant above; one expansion seed — "
          f"`expandr eval --seeds` gives mean ± sd; LLM engine {q2d.engine!r}, weight_precision "
          f"{q2d.sampler_options.weight_precision!r}: the figures are this engine's)")
    rows = (("dense, no expansion", plain), (f"PRF (Rocchio k={chosen.feedback_k}), no LLM", prf),
            (f"ExpandR q2d (n={args.n_expansions}, w={w['expand']:g})", results["q2d"]),
            (f"ExpandR grounded (n={args.n_expansions}, w={w['grounded']:g})", results["grounded"]),
            (f"Haystack multi-query (n={args.n_expansions}{', JSON prefill' if args.multiquery_prefill else ''})",
             results["multiquery"]))
    for name, hits in rows:
        means, _ = evaluate_run(test.qrels, run_from_documents(query_ids, hits))
        print(f"  {name:<42} nDCG@10 {100 * means['ndcg@10']:6.2f}   Recall@100 {100 * means['recall@100']:6.2f}")
    print(f"  ({stats_line([parsed.to_dict()], 'Haystack multi-query')})")
    print(f"\ncache: {q2d.cache_stats}; total {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
