"""
How much of an `expand` nDCG@10 difference is sampling noise? The same zero-shot setting (bundled encoder and LLM,
Cranfield test, one expansion per query) evaluated with several expansion seeds; prints each, the mean and the
standard deviation. Differences between training rounds smaller than about two standard deviations are not evidence.

    python benchmarks/seed_noise.py [--seeds 1,2,3,4] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="1,2,3,4")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args(argv)

    from expandr_haystack import LLMQueryExpander
    from expandr_haystack.evaluation.data import bundled_path, load_collection
    from expandr_haystack.evaluation.indexing import build_document_store
    from expandr_haystack.evaluation.runner import evaluate
    from expandr_haystack.options import GenerationSettings

    print(machine())
    collection = load_collection(bundled_path("cranfield"), split="test")
    store = build_document_store(collection.documents(), progress_bar=False)
    scores = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in [int(s) for s in args.seeds.split(",")]:
            expander = LLMQueryExpander(generation=GenerationSettings(seed=seed, max_new_tokens=args.max_new_tokens,
                                                                      batch_size=32),
                                        cache=str(Path(tmp) / "c.sqlite"))
            result = evaluate(collection, ["expand"], expander=expander, store=store, progress_bar=False)
            scores.append(100 * result["expand"]["ndcg@10"])
            print(f"seed {seed}: expand nDCG@10 {scores[-1]:.2f}", flush=True)
    print(f"mean {statistics.mean(scores):.2f}, standard deviation {statistics.stdev(scores):.2f}, "
          f"range {min(scores):.2f} .. {max(scores):.2f} over {len(scores)} seeds ({args.max_new_tokens} tokens)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
