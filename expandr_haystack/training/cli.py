"""`expandr train` / `python training/joint.py`: run ExpandR joint training from a YAML config."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config, e.g. training/configs/tiny-cpu.yaml")
    parser.add_argument("--output", default=None, help="run folder (default runs/<config name>)")
    parser.add_argument("--resume", action="store_true", help="continue a run in --output from its last finished step")
    parser.add_argument("--rounds", type=int, default=None, help="override the config's number of rounds")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args: argparse.Namespace) -> int:
    """Validate the config (before loading any model), then run the rounds."""
    from expandr_haystack.training.config import ConfigError, JointConfig
    from expandr_haystack.training.rounds import JointTrainer, RunFolderError

    try:
        config = JointConfig.from_yaml(args.config, {"rounds": args.rounds})
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    output = Path(args.output or Path("runs") / Path(args.config).stem)
    try:
        JointTrainer(config, output, progress_bar=not args.no_progress).run(resume=args.resume)
    except (FileExistsError, RunFolderError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"\nrun folder: {output} (metrics.json, metrics.png, round_*/pipeline.yaml)")
    return 0


def add_train_parser(subparsers) -> None:
    """Register `expandr train` (used by `expandr_haystack.cli`)."""
    p = subparsers.add_parser("train", help="ExpandR joint training (retriever InfoNCE + LLM DPO, k rounds)")
    add_arguments(p)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="training/joint.py", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
