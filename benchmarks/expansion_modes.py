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
    parser.add_argument("--out", default=None, help="JSON report (and a bar chart with the suffix .png)")
    parser.add_argument("--plot-only", action="store_true", help="redraw the chart of an existing --out report")
    args = parser.parse_args(argv)
    if args.plot_only:
        print(f"wrote {plot(json.loads(Path(args.out).read_text()), Path(args.out).with_suffix('.png'))}")
        return 0

    from expandr_haystack import LLMQueryExpander
    from expandr_haystack.evaluation.data import load_collection
    from expandr_haystack.evaluation.protocol import evaluate_seeds, select_settings
    from expandr_haystack.options import GenerationSettings

    started = time.time()
    print(machine(), flush=True)
    cache = args.cache or (str(Path(args.out).with_suffix(".sqlite")) if args.out else None)
    expander = LLMQueryExpander(n_expansions=args.n, cache=cache, generation=GenerationSettings(
        temperature=args.temperature, max_new_tokens=args.max_new_tokens, batch_size=32))
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
        print(f"wrote {args.out} and {plot(out, Path(args.out).with_suffix('.png'))}")
    return 0


def plot(report: dict, path: Path) -> Path:
    """nDCG@10 per method, mean ± sd over the seeds (one dot per seed), with the dense level as a line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = report["methods"]
    names = list(rows)
    fig = Figure(figsize=(1.6 + 1.3 * len(names), 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    means = [100 * rows[m]["ndcg@10"] for m in names]
    sds = [100 * rows[m]["ndcg@10_sd"] for m in names]
    ax.bar(range(len(names)), means, yerr=sds, capsize=4, color=["0.6" if rows[m]["seeds"] == 0 else "tab:blue"
                                                              for m in names])
    for i, m in enumerate(names):
        values = [100 * v for v in rows[m]["per_seed"]["ndcg@10"]]
        ax.plot([i] * len(values), values, "k.", markersize=4)
        ax.annotate(f"{means[i]:.2f}", (i, means[i] + sds[i] + 0.3), ha="center", fontsize=8)
    if "dense" in rows:
        ax.axhline(100 * rows["dense"]["ndcg@10"], color="black", linestyle=":", linewidth=1)
    ax.set_xticks(range(len(names)), names)
    low = min(m - s for m, s in zip(means, sds))
    ax.set_ylim(max(0.0, low - 4), max(m + s for m, s in zip(means, sds)) + 2)
    ax.set_ylabel(f"nDCG@10 x100 ({report['eval_split']})")
    seeds = max(r["seeds"] for r in rows.values())
    ax.set_title(f"{Path(str(report['data'])).name}: zero-shot, n={report['n_expansions']}, T={report['temperature']}, "
                 f"{seeds} seeds (grey: no LLM)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
