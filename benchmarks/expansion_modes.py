"""
Zero-shot expansion modes under the project's protocol: fusion settings chosen on a validation split carved from the
train queries, then each method on the evaluation split as the mean ± sd over expansion seeds, with paired
randomization tests against dense retrieval and against PRF. No training: this is the untrained part of the
ablation table (docs/training.md), and what `make run` shows in small.

    python benchmarks/expansion_modes.py [--data cranfield] [--eval-split test] [--seeds 1,2,3] [--temperature 0.7]
        [--n 4] [--validation-size 40] [--methods dense,prf,expand,grounded] [--out docs/runs/modes.json]

--data is `cranfield` (bundled) or a BEIR-layout folder (e.g. a SciFact copy: --data PATH --eval-split dev).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="cranfield")
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--eval-split", default="test")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--n", type=int, default=4, help="expansions per query, averaged")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--validation-size", type=int, default=40)
    parser.add_argument("--methods", default="dense,prf,expand,grounded")
    parser.add_argument("--cache", default=None, help="expansion cache (sqlite); default: next to --out")
    parser.add_argument("--out", default=None, help="JSON report")
    args = parser.parse_args(argv)

    from expandr_haystack import LLMQueryExpander
    from expandr_haystack.evaluation.data import load_collection
    from expandr_haystack.evaluation.protocol import evaluate_seeds, select_settings

    started = time.time()
    print(machine(), flush=True)
    cache = args.cache or (str(Path(args.out).with_suffix(".sqlite")) if args.out else None)
    expander = LLMQueryExpander(n_expansions=args.n, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                                batch_size=32, cache=cache)
    methods = [m for m in args.methods.split(",") if m]
    _, validation = load_collection(args.data, args.train_split).split_validation(args.validation_size, seed=0)
    settings = select_settings(validation, methods, expander=expander)
    print(f"chosen on {settings.queries} validation queries: {json.dumps(settings.evaluate_kwargs())}", flush=True)
    collection = load_collection(args.data, args.eval_split)
    report = evaluate_seeds(collection, methods, seeds=[int(s) for s in args.seeds.split(",")], expander=expander,
                            progress_bar=False, **settings.evaluate_kwargs())
    for m in methods:
        if m != "dense":
            report.compare(m, "dense")
    for m in methods:
        if m not in ("dense", "prf") and "prf" in methods:
            report.compare(m, "prf")
    print(report.table())
    if args.out:
        out = {"data": args.data, "eval_split": args.eval_split, "n_expansions": args.n,
               "temperature": args.temperature, "max_new_tokens": args.max_new_tokens,
               "validation": settings.to_dict(), **report.to_dict(), "seconds": round(time.time() - started),
               "machine": machine(), "date": time.strftime("%Y-%m-%d")}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
