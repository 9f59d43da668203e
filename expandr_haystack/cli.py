"""
The `expandr` command line.

    expandr eval DATA_DIR ...                               retrieval evaluation (expandr_haystack.evaluation.cli)
    expandr pairs --data DATA_DIR --out pairs.jsonl ...     DPO preference pairs (expandr_haystack.training.cli)
    expandr train --config CONFIG.yaml ...                  joint training rounds (expandr_haystack.training.cli)
    expandr expand --data DATA_DIR --out exp.jsonl ...      expansions to JSONL, whole or one --shard I/N of a job
                                                            array (expandr_haystack.expand_cli)
    expandr merge-shards exp.jsonl [SHARD_FILE ...]         merge the shard files of `expandr expand --shard I/N`

DATA_DIR is a BEIR-layout folder, `cranfield` for the bundled collection, or a BEIR dataset name (`scifact`,
`nfcorpus`, ...: downloaded once into $EXPANDR_HOME/beir). `python -m expandr_haystack ...` is
the same as `expandr ...`; `python training/joint.py` and `python training/pairs.py` are `expandr train` and
`expandr pairs`. Errors end the command with a one-line message and exit status 1 (2 for usage errors); set
EXPANDR_DEBUG=1 to see the traceback instead. This module sets HAYSTACK_TELEMETRY_ENABLED=False (unless set) for
every entry point.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

class CommandError(Exception):
    """A failure reported as one line (no traceback) by `main`."""


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
    from expandr_haystack.evaluation.cli import add_eval_parser
    from expandr_haystack.expand_cli import add_expand_parser, add_merge_parser
    from expandr_haystack.training.cli import add_pairs_parser, add_train_parser

    parser = argparse.ArgumentParser(prog="expandr", description="ExpandR for Haystack: evaluation and training.")
    parser.add_argument("--version", action="version", version=f"expandr-haystack {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_eval_parser(subparsers)
    add_pairs_parser(subparsers)
    add_train_parser(subparsers)
    add_expand_parser(subparsers)
    add_merge_parser(subparsers)
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
        args.argv = ["expandr", *(sys.argv[1:] if argv is None else argv)]
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