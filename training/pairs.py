"""
Build ExpandR DPO preference pairs for the expander (TRL conversational format, JSONL).

    python training/pairs.py --data cranfield --split train --out pairs.jsonl [--n-candidates 8]
        [--temperatures 0.8,0.9,1.0,1.1] [--threshold 0.6] [--llm PATH --adapter PATH --encoder PATH]
        [--max-queries N] [--cache PATH] [--max-new-tokens N] [--no-answer] [--overwrite]

--data is a BEIR-layout folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv) or "cranfield" for the bundled
collection. Rerunning with the same --out appends only the queries not yet recorded (the expansion cache makes
regeneration free). Writes <out>, <out>.seen.jsonl, <out>.stats.json and <out>.margins.png.
The library code is expandr_haystack/training/pairs.py (`build_pairs`), which the joint-training loop calls.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _temperatures(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.8,0.9,1.0,1.1; got {text!r}") from exc
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected one or more numbers >= 0; got {text!r}")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1; got {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1; got {text!r}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from expandr_haystack.components.expander import BACKENDS
    from expandr_haystack.models import expandr_home

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help='BEIR-layout folder, or "cranfield" for the bundled collection')
    p.add_argument("--split", default="train", help="qrels split whose judged queries are used (default: train)")
    p.add_argument("--out", required=True, help="output JSONL pair file (appended to when it exists)")
    p.add_argument("--n-candidates", type=_positive_int, default=8, help="candidate expansions per query (>= 2)")
    p.add_argument("--temperatures", type=_temperatures, default=(0.8, 0.9, 1.0, 1.1),
                   help="sampling temperatures, sample i uses the (i mod k)-th (default 0.8,0.9,1.0,1.1)")
    p.add_argument("--threshold", type=float, default=0.6, help="min of max(cos_doc + cos_answer) to keep a pair")
    p.add_argument("--llm", default=None, help="expander LLM: HF id or local folder (default: bundled SmolLM2)")
    p.add_argument("--adapter", default=None, help="PEFT LoRA adapter folder for --llm")
    p.add_argument("--encoder", default=None, help="reward encoder: sentence-transformers id or folder "
                                                    "(default: bundled all-MiniLM-L6-v2)")
    p.add_argument("--max-queries", type=_positive_int, default=None, help="use the first N judged queries")
    p.add_argument("--cache", default=str(expandr_home() / "cache" / "expansions.sqlite"),
                   help='expansion cache (sqlite); "none" disables it')
    p.add_argument("--max-new-tokens", type=_positive_int, default=96, help="length limit of a candidate")
    p.add_argument("--answer-max-new-tokens", type=_positive_int, default=96, help="length limit of the answer")
    p.add_argument("--chunk-size", type=_positive_int, default=16, help="queries processed and saved together")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="rows the LLM generates at once")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--no-answer", action="store_true", help="document-only reward (ablation; no answers generated)")
    p.add_argument("--device", default=None, help='"cpu", "cuda:0", ... (default: best available)')
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="LLM generation engine (default auto: the packed float32 decoder on CPU)")
    p.add_argument("--overwrite", action="store_true", help="start afresh instead of resuming --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)

    if args.n_candidates < 2:
        p.error(f"--n-candidates must be >= 2 to form a pair; got {args.n_candidates}")
    for name in ("llm", "adapter", "encoder"):
        value = getattr(args, name)
        looks_local = value is not None and (value.startswith((".", "/", "~")) or value.count("/") >= 2)
        if looks_local and not Path(value).expanduser().exists():
            p.error(f"--{name}: no such folder {value!r}")
    if args.adapter is not None and not (Path(args.adapter).expanduser() / "adapter_config.json").exists():
        p.error(f"--adapter: {args.adapter!r} is not a PEFT adapter folder (no adapter_config.json)")
    if args.data != "cranfield" and not Path(args.data).expanduser().is_dir():
        p.error(f'--data: no folder {args.data!r} (pass a BEIR-layout folder or "cranfield")')
    out = Path(args.out).expanduser()
    if out.is_dir():
        p.error(f"--out: {args.out!r} is a folder; pass a file path such as pairs.jsonl")
    if args.cache.lower() == "none":
        args.cache = None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from haystack.utils import ComponentDevice

    from expandr_haystack.data import DataError, bundled_path, load_collection
    from expandr_haystack.training.pairs import PairConfig, build_pairs, make_components

    try:
        data = bundled_path("cranfield") if args.data == "cranfield" else Path(args.data).expanduser()
        collection = load_collection(data, split=args.split, max_queries=args.max_queries)
    except DataError as exc:
        print(f"error: --data/--split: {exc}", file=sys.stderr)
        return 2
    try:
        config = PairConfig(n_candidates=args.n_candidates, temperatures=args.temperatures, threshold=args.threshold,
                            max_new_tokens=args.max_new_tokens, answer_max_new_tokens=args.answer_max_new_tokens,
                            chunk_size=args.chunk_size, batch_size=args.batch_size, seed=args.seed,
                            use_answer=not args.no_answer)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    device = ComponentDevice.from_str(args.device) if args.device else None
    expander, answerer, scorer = make_components(config, llm=args.llm, adapter=args.adapter, encoder=args.encoder,
                                                 cache=args.cache, device=device, progress_bar=False,
                                                 backend=args.backend)
    print(f"{data}: split {args.split!r}, {len(collection.queries)} judged queries; "
          f"{config.n_candidates} candidates at temperatures {list(config.temperatures)}; "
          f"threshold {config.threshold}; answer term {'on' if config.use_answer else 'off (ablation)'}")
    stats = build_pairs(collection, args.out, expander, answerer, scorer, config,
                        progress_bar=not args.no_progress, overwrite=args.overwrite)
    print(stats.summary())
    if stats.margin_histogram.get("counts"):
        edges, counts = stats.margin_histogram["edges"], stats.margin_histogram["counts"]
        print("reward margin histogram:")
        for lo, hi, c in zip(edges, edges[1:], counts):
            if c:
                print(f"  [{lo:5.2f}, {hi:5.2f})  {c:5d}  {'#' * min(c, 60)}")
    print(json.dumps({"stats": stats.stats_path, "plot": stats.plot_path, "expansion_cache": expander.cache_stats}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
