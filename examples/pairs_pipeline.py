"""
ExpandR DPO pair construction as a Haystack pipeline (the same flow `training/pairs.py` runs in batches):

    expander (n candidate expansions, sampled) ──expansions──────────────────────────> scorer.expansions
        │ query ─> answerer.query (ANSWER_PROMPT, greedy; also gets the gold document) ─> scorer.answer
        └ query ─> scorer.query                                       gold document ─> scorer.document

    python examples/pairs_pipeline.py [--max-queries 2] [--n-candidates 4] [--yaml examples/pairs_pipeline.yaml]
    python examples/pairs_pipeline.py --dump examples/pairs_pipeline.yaml    # (re)write the YAML

The answer expander emits a one-element list; Haystack unwraps it into the scorer's `answer: str`.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from haystack import Pipeline

import expandr_haystack  # noqa: F401 - adds our module to Haystack's deserialization allow-list
from expandr_haystack import ANSWER_PROMPT, LLMQueryExpander, RewardScorer
from expandr_haystack.core.text import document_text
from expandr_haystack.evaluation.data import bundled_path, load_collection
from expandr_haystack.options import GenerationSettings


def build_pipeline(n_candidates: int = 4, max_new_tokens: int = 64, threshold: float = 0.6,
                   cache: str | None = None) -> Pipeline:
    """expander -> answerer -> scorer, wired as in the diagram above."""
    p = Pipeline()
    p.add_component("expander", LLMQueryExpander(n_expansions=n_candidates, cache=cache, generation=GenerationSettings(
        temperature=1.0, max_new_tokens=max_new_tokens)))
    p.add_component("answerer", LLMQueryExpander(prompt=ANSWER_PROMPT, n_expansions=1, cache=cache,
                                                 generation=GenerationSettings(temperature=0.0,
                                                                               max_new_tokens=max_new_tokens)))
    p.add_component("scorer", RewardScorer(threshold=threshold))
    p.connect("expander.query", "answerer.query")
    p.connect("expander.query", "scorer.query")
    p.connect("expander.expansions", "scorer.expansions")
    p.connect("answerer.expansions", "scorer.answer")
    return p


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--yaml", default=None, help="load the pipeline from this YAML instead of building it")
    parser.add_argument("--dump", default=None, help="write the pipeline as YAML to this path and exit")
    parser.add_argument("--max-queries", type=int, default=2)
    parser.add_argument("--n-candidates", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threshold", type=float, default=0.6)
    args = parser.parse_args()

    if args.yaml:
        with open(args.yaml, encoding="utf-8") as f:
            pipeline = Pipeline.loads(f.read())
    else:
        pipeline = build_pipeline(args.n_candidates, args.max_new_tokens, args.threshold)
    if args.dump:
        with open(args.dump, "w", encoding="utf-8") as f:
            f.write(pipeline.dumps())
        print(f"wrote {args.dump}")
        return

    collection = load_collection(bundled_path("cranfield"), split="train", max_queries=args.max_queries)
    documents = {d.id: d for d in collection.documents()}
    pipeline.warm_up()
    for qid, query in collection.queries.items():
        gold = documents[collection.relevant(qid)[0]]
        out = pipeline.run({"expander": {"query": query},
                            "answerer": {"document": document_text(gold)},
                            "scorer": {"document": gold}})["scorer"]
        print(f"\nquery {qid}: {query}\n  gold document {gold.id}: {gold.meta['title'][:80]}")
        print(f"  rewards {[round(r, 3) for r in out['rewards']]}  kept={out['kept']}")
        if out["kept"]:
            print(f"  chosen:   {out['chosen'][:150]!r}\n  rejected: {out['rejected'][:150]!r}")


if __name__ == "__main__":
    main()
