"""
The `expandr` command line.

    expandr eval DATA_DIR [--split test] [--methods bm25,dense,expand,expand-rrf] [--encoder PATH] [--llm PATH]
                 [--adapter PATH] [--n-expansions N] [--cache PATH] [--json OUT] [--plot OUT.png]
                 [--max-queries N] [--max-new-tokens N] [--backend B]
    expandr train ...        (registered by expandr_haystack.training.cli when that module is present)

DATA_DIR is a BEIR-layout folder, or `cranfield` for the bundled collection. `python -m expandr_haystack.eval ...`
is the same as `expandr eval ...`. Errors end the command with a one-line message and exit status 1
(2 for usage errors); set EXPANDR_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

#: The module that registers `expandr train` with a function `add_train_parser(subparsers)`.
TRAIN_MODULE = "expandr_haystack.training.cli"


class CommandError(Exception):
    """A failure reported as one line (no traceback) by `main`."""


# -- eval ------------------------------------------------------------------------------------------------------
def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Register `expandr eval` on an argparse subparsers object."""
    from expandr_haystack.evaluation import METHODS

    p = subparsers.add_parser(
        "eval", help="evaluate BM25 / dense / ExpandR retrieval on a BEIR-format collection",
        description="Evaluate retrieval methods on a BEIR-layout collection (nDCG@10, Recall@100, MRR@10 by "
                    "pytrec_eval over the judged queries of one split).")
    add_eval_arguments(p, METHODS)
    p.set_defaults(func=run_eval)
    return p


def add_eval_arguments(p: argparse.ArgumentParser, methods: Sequence[str]) -> None:
    """The arguments of `expandr eval` (shared with `python -m expandr_haystack.eval`)."""
    from expandr_haystack.components.expander import BACKENDS

    p.add_argument("data_dir", metavar="DATA_DIR",
                   help="BEIR-layout folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv), or 'cranfield' for "
                        "the bundled collection")
    p.add_argument("--split", default="test", help="qrels split to evaluate (default: test)")
    p.add_argument("--methods", default=",".join(methods),
                   help=f"comma-separated methods from {', '.join(methods)} (default: all)")
    p.add_argument("--encoder", default=None, help="sentence-transformers encoder (default: bundled MiniLM)")
    p.add_argument("--llm", default=None, help="expansion LLM (default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", default=None, help="PEFT LoRA adapter directory for the LLM")
    p.add_argument("--n-expansions", type=int, default=1, help="expansions per query (default: 1)")
    p.add_argument("--cache", default=None, help="persistent expansion cache (sqlite file)")
    p.add_argument("--json", dest="json_out", default=None, metavar="OUT",
                   help="write the means to OUT and per-query scores to OUT with suffix .per_query.json")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="save a bar chart of the metrics")
    p.add_argument("--max-queries", type=int, default=None, help="evaluate only the first N judged queries")
    p.add_argument("--max-new-tokens", type=int, default=96, help="expansion length limit (default: 96)")
    p.add_argument("--batch-size", type=int, default=16, help="LLM generation batch size (default: 16)")
    p.add_argument("--seed", type=int, default=42, help="expansion seed (default: 42)")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="LLM generation engine (default auto: the packed float32 decoder on CPU)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def per_query_path(json_out: str | Path) -> Path:
    """Where the per-query scores go for a `--json OUT` file: OUT with the suffix `.per_query.json`."""
    out = Path(json_out)
    return out.with_suffix(".per_query.json") if out.suffix else out.with_name(out.name + ".per_query.json")


def run_eval(args: argparse.Namespace) -> int:
    """Run `expandr eval` with parsed arguments; returns the exit status."""
    from expandr_haystack.data import load_collection
    from expandr_haystack.evaluation import evaluate, format_table, parse_methods, plot_metrics

    methods = parse_methods(args.methods)  # before any loading: a typo fails at once
    if args.max_queries is not None and args.max_queries < 1:
        raise CommandError(f"--max-queries must be >= 1; got {args.max_queries}.")
    if args.n_expansions < 1:
        raise CommandError(f"--n-expansions must be >= 1; got {args.n_expansions}.")
    if args.max_new_tokens < 1:
        raise CommandError(f"--max-new-tokens must be >= 1; got {args.max_new_tokens}.")
    for name in ("json_out", "plot"):  # fail before the (long) evaluation, not after it
        out = getattr(args, name)
        if out is not None and Path(out).expanduser().is_dir():
            raise CommandError(f"--{name.replace('_out', '')} {out}: is a directory; give a file name.")

    collection = load_collection(args.data_dir, split=args.split, max_queries=args.max_queries)
    print(f"{collection.path} [{collection.split}]: {len(collection.corpus)} documents, "
          f"{len(collection.queries)} judged queries; methods: {', '.join(methods)}", flush=True)
    result = evaluate(collection, methods, encoder=args.encoder, llm=args.llm, adapter=args.adapter,
                      n_expansions=args.n_expansions, cache=args.cache, max_new_tokens=args.max_new_tokens,
                      batch_size=args.batch_size, seed=args.seed, progress_bar=not args.no_progress,
                      backend=args.backend)
    print()
    print(format_table(result, title=f"{collection.path.name} {collection.split} (metrics x100)"))
    timings = ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items())
    print(f"time: {timings}")
    if result.warnings:
        print(f"data warnings: {len(result.warnings)}")
        for w in result.warnings:
            print(f"  warning: {w}")
    if args.json_out:
        out = Path(args.json_out).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result.metrics, indent=2) + "\n")
        pq = per_query_path(out)
        pq.write_text(json.dumps(result.per_query, indent=1, sort_keys=False) + "\n")
        print(f"wrote {out} and {pq}")
    if args.plot:
        print(f"wrote {plot_metrics(result, args.plot, title=f'{collection.path.name} {collection.split}')}")
    return 0


# -- train (registered by another module) ----------------------------------------------------------------------
def add_train_parser(subparsers) -> None:
    """
    Register `expandr train`.

    The subcommand itself lives in `expandr_haystack.training.cli`, which must define
    `add_train_parser(subparsers)` that adds a "train" parser and sets `func` (``args -> exit status``) with
    `set_defaults`. When that module is missing or cannot be imported, a placeholder `train` is registered that
    explains why; `expandr eval` is unaffected either way.
    """
    try:
        module = importlib.import_module(TRAIN_MODULE)
        register = module.add_train_parser
    except ImportError as exc:
        reason = f"cannot import {TRAIN_MODULE} ({exc})"
    except AttributeError:
        reason = f"{TRAIN_MODULE} defines no add_train_parser(subparsers)"
    else:
        register(subparsers)
        return
    # prefix_chars that no argument uses: every argument (even --help) reaches `unavailable`, which explains
    p = subparsers.add_parser("train", help="joint training (not available in this installation)", add_help=False,
                              prefix_chars="\x00")
    p.add_argument("rest", nargs="*")

    def unavailable(args: argparse.Namespace) -> int:
        raise CommandError(f"training is not available: {reason}. Install the training extras "
                           f"(pip install 'expandr-haystack[train]') in a version that ships it.")

    p.set_defaults(func=unavailable)


def _apply_telemetry_setting() -> None:
    """
    Honour HAYSTACK_TELEMETRY_ENABLED=False (our default, set above) even though Haystack was imported (by the
    `expandr_haystack` package) before this module could set it: Haystack reads it once, at import.
    """
    if os.environ.get("HAYSTACK_TELEMETRY_ENABLED", "").lower() in ("false", "0"):
        import haystack.telemetry._telemetry as haystack_telemetry

        haystack_telemetry.telemetry = None


# -- entry point -------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The `expandr` parser with all subcommands."""
    from expandr_haystack import __version__

    parser = argparse.ArgumentParser(prog="expandr", description="ExpandR for Haystack: evaluation and training.")
    parser.add_argument("--version", action="version", version=f"expandr-haystack {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_eval_parser(subparsers)
    add_train_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run the `expandr` command line.

    :param argv: Arguments without the program name (None = `sys.argv[1:]`).
    :returns: Exit status: 0 on success, 1 on an error (one line on stderr), 2 on a usage error.
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    _apply_telemetry_setting()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors, --help, --version
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"expandr {args.command}: interrupted", file=sys.stderr)
        return 130
    except (CommandError, ValueError, TypeError, FileNotFoundError, ImportError, OSError, RuntimeError) as exc:
        if os.environ.get("EXPANDR_DEBUG"):
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"expandr {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
