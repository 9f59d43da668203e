"""
The training subcommands of the `expandr` command line (registered by `expandr_haystack.cli`):

    expandr train --config training/configs/tiny-cpu.yaml [--output runs/tiny-cpu] [--resume] [--rounds K]
        [--set expansion.mode=grounded --set dpo.learning_rate=1e-4 ...]
    expandr pairs --data cranfield --split train --out pairs.jsonl [--n-candidates 8]
        [--temperatures 0.8,0.9,1.0,1.1] [--threshold 0.6] [--top-p 0.9] [--llm PATH --adapter PATH --encoder PATH]
        [--max-queries N] [--cache PATH] [--max-new-tokens N] [--no-answer] [--overwrite]
        [--grounded --passages-k 3 --passage-words 50]

`python training/joint.py ...` and `python training/pairs.py ...` are the same commands. The pair-construction
options of `expandr pairs` are generated from `PairConfig`'s fields (`add_settings_arguments`: its defaults, its
docstring as help, its rules as checks); argument errors use the wording of `expandr_haystack.checks`.

Usage:
```python
import argparse
from expandr_haystack.training.cli import add_pairs_parser, add_train_parser

subparsers = argparse.ArgumentParser(prog="expandr").add_subparsers(dest="command")
add_train_parser(subparsers)
add_pairs_parser(subparsers)
```
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from expandr_haystack.checks import check_adapter_dir, check_int, check_model_name
from expandr_haystack.training.config import PairConfig


def _verbose() -> None:
    """Show the package's INFO messages (steps finished, pairs resumed, ...) under `expandr`'s WARNING default."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("expandr_haystack").setLevel(logging.INFO)


# -- expandr train ---------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `expandr train`."""
    parser.add_argument("--config", required=True, help="YAML config, e.g. training/configs/tiny-cpu.yaml")
    parser.add_argument("--output", default=None, help="run folder (default runs/<config name>)")
    parser.add_argument("--resume", action="store_true", help="continue a run in --output from its last finished step")
    parser.add_argument("--rounds", type=_arg(check_int, "--rounds"), default=None,
                        help="override the config's number of rounds")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override one config value, YAML-typed, e.g. --set expansion.mode=grounded "
                             "--set dpo.learning_rate=1e-4 (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["expansion.mode=grounded", "dpo.learning_rate=1e-4"]` -> {"expansion.mode": "grounded", ...} (YAML-typed)."""
    import yaml

    from expandr_haystack.training.config import ConfigError

    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set: expected KEY=VALUE (e.g. expansion.mode=grounded), got {item!r}.")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # YAML 1.1 reads "1e-4" as a string; a number is what anyone means
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        overrides[key.strip()] = parsed
    return overrides


def run(args: argparse.Namespace) -> int:
    """Validate the config (before loading any model), then run the rounds; returns the exit status."""
    from expandr_haystack.training.config import ConfigError, JointConfig
    from expandr_haystack.training.rounds import JointTrainer
    from expandr_haystack.training.runfiles import RunFolderError

    _verbose()
    try:
        config = JointConfig.from_yaml(args.config, {**parse_overrides(args.overrides), "rounds": args.rounds})
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    output = Path(args.output or Path("runs") / Path(args.config).stem)
    try:
        JointTrainer(config, output, progress_bar=not args.no_progress).run(resume=args.resume)
    except (FileExistsError, RunFolderError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"\nrun folder: {output} (metrics.json, metrics.png, round_*/pipeline.yaml: load one with "
          f"expandr_haystack.training.load_round_pipeline(path), from any folder)")
    return 0


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Register `expandr train` on an argparse subparsers object (used by `expandr_haystack.cli`)."""
    p = subparsers.add_parser("train", help="ExpandR joint training (retriever InfoNCE + LLM DPO, k rounds)",
                              description="ExpandR joint training: k alternating rounds of retriever contrastive "
                                          "training and LLM DPO, from a YAML config.")
    add_arguments(p)
    p.set_defaults(func=run)
    return p


# -- argument types: the checks' rules, as argparse errors ------------------------------------------------------------
def _arg(check: Callable[..., Any], option: str, *args: Any, convert: Callable[[str], Any] = int) -> Callable:
    """
    An argparse `type` that converts the text, then applies a `expandr_haystack.checks` rule.

    :param check: e.g. `check_int` or `check_model_name` (called as ``check(value, option, *args)``).
    :param option: The option, e.g. ``--n-candidates`` (argparse prefixes the message with it).
    :param convert: Text -> value (`int`, `float`, or `str`).
    """
    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            value = text  # the check below names it with its expected type
        try:
            check(value, option, *args)
        except (ValueError, TypeError, FileNotFoundError) as exc:
            message = str(exc)
            for prefix in (f"`{option}`: ", f"`{option}` "):
                message = message.removeprefix(prefix)
            raise argparse.ArgumentTypeError(message) from None
        return value

    parse.__name__ = option.lstrip("-").replace("-", "_")
    return parse


def _sequence(text: str) -> tuple[Any, ...] | str:
    """Comma-separated values (numbers where they read as numbers), e.g. ``0.8,0.9,1.0,1.1``; the text itself when
    they do not (the setting's rule then names it)."""
    items = tuple(t.strip() for t in text.split(",") if t.strip())
    try:
        return tuple(float(t) for t in items)
    except ValueError:
        return text


def add_settings_arguments(parser: argparse.ArgumentParser, cls: type, renamed: dict[str, str] | None = None) -> None:
    """
    One option per field of the settings dataclass `cls` (`--n-candidates` for `n_candidates`), generated from the
    fields: the default is the field's, the help its docstring line, and a value is checked by the field's own rule
    (an argparse error naming the option). A true/false field that defaults to True becomes ``--no-<name>``.

    :param renamed: Option names other than the generated ones (field -> option), e.g. ``{"use_answer": "--no-answer"}``.
    """
    helps = cls.help()
    for f in dataclasses.fields(cls):
        default, rule = f.default, f.metadata.get("rule")
        option = (renamed or {}).get(f.name) or "--" + f.name.replace("_", "-")
        help_text = helps.get(f.name, "").replace("%", "%%")
        if isinstance(default, bool):
            if default:
                option = (renamed or {}).get(f.name) or "--no-" + f.name.replace("_", "-")
                parser.add_argument(option, dest=f.name, action="store_false", default=True, help=help_text)
            else:
                parser.add_argument(option, dest=f.name, action="store_true", help=help_text)
            continue
        if isinstance(default, tuple):
            convert, shown = _sequence, ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default)
        else:
            convert, shown = type(default), f"{default:g}" if isinstance(default, float) else str(default)
        parser.add_argument(option, dest=f.name, default=default, help=f"{help_text} (default {shown})",
                            type=_arg(rule, option, convert=convert) if rule else convert)


def _collection(text: str) -> str:
    """A BEIR-layout folder or a bundled collection name (checked now; loaded later)."""
    from expandr_haystack.evaluation.data import DataError, resolve_collection_path

    try:
        resolve_collection_path(text)
    except DataError as exc:
        raise argparse.ArgumentTypeError(f"{exc} Pass a BEIR-layout folder or \"cranfield\".") from None
    return text


def _out_file(text: str) -> str:
    if Path(text).expanduser().is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; pass a file path such as pairs.jsonl")
    return text


# -- expandr pairs ---------------------------------------------------------------------------------------------------
def add_pairs_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of `expandr pairs`; their defaults are `PairConfig`'s."""
    from expandr_haystack.options import add_sampler_arguments

    p.add_argument("--data", required=True, type=_collection,
                   help='BEIR-layout folder, or "cranfield" for the bundled collection')
    p.add_argument("--split", default="train", help="qrels split whose judged queries are used (default: train)")
    p.add_argument("--out", required=True, type=_out_file, help="output JSONL pair file (appended to when it exists)")
    add_settings_arguments(p.add_argument_group("pair construction (PairConfig)"), PairConfig,
                           renamed={"use_answer": "--no-answer"})
    p.add_argument("--llm", default=None, type=_arg(check_model_name, "--llm", convert=str),
                   help="expander LLM: HF id or local folder (default: bundled SmolLM2)")
    p.add_argument("--adapter", default=None, type=_arg(check_adapter_dir, "--adapter", convert=str),
                   help="PEFT LoRA adapter folder for --llm")
    p.add_argument("--encoder", default=None, type=_arg(check_model_name, "--encoder", convert=str),
                   help="reward encoder: sentence-transformers id or folder (default: bundled all-MiniLM-L6-v2)")
    p.add_argument("--max-queries", type=_arg(check_int, "--max-queries"), default=None,
                   help="use the first N judged queries")
    p.add_argument("--cache", default=None,
                   help='expansion cache (sqlite; default <expandr home>/cache/expansions.sqlite); "none" disables it')
    p.add_argument("--device", default=None, help='"cpu", "cuda:0", ... (default: best available)')
    add_sampler_arguments(p, ("--backend",))
    p.add_argument("--grounded", action="store_true",
                   help="candidates written with GROUNDED_PROMPT from each query and its top first-pass hits by "
                        "--encoder (beyond the paper; the pair's prompt holds the passages)")
    p.add_argument("--passages-k", type=_arg(check_int, "--passages-k"), default=3,
                   help="--grounded: first-pass hits shown (default 3)")
    p.add_argument("--passage-words", type=_arg(check_int, "--passage-words"), default=50,
                   help="--grounded: words kept of each hit (default 50)")
    p.add_argument("--overwrite", action="store_true", help="start afresh instead of resuming --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def pair_config(args: argparse.Namespace) -> PairConfig:
    """The `PairConfig` of parsed `expandr pairs` arguments (every field of it is an option)."""
    return PairConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PairConfig)
                         if hasattr(args, f.name)})


def first_pass_hits(collection, encoder: str | None, k: int, device=None) -> dict[str, list]:
    """``{query_id: top-k documents}`` of a dense first pass over the collection's corpus (grounded candidates)."""
    from expandr_haystack.evaluation.runner import dense_retriever

    retriever = dense_retriever(collection, encoder, None, device, False, {})
    query_ids = list(collection.queries)
    hits = retriever.retrieve([collection.queries[q] for q in query_ids], None, top_k=k)
    return dict(zip(query_ids, hits))


def run_pairs(args: argparse.Namespace) -> int:
    """Build (or complete) a pair file from parsed `expandr pairs` arguments; returns the exit status."""
    from haystack.utils import ComponentDevice

    from expandr_haystack.core.text import EXPANSION_PROMPT, GROUNDED_PROMPT
    from expandr_haystack.evaluation.data import DataError, load_collection
    from expandr_haystack.models import expandr_home
    from expandr_haystack.options import SamplerOptions
    from expandr_haystack.training.config import ConfigError
    from expandr_haystack.training.pairs import build_pairs, make_components

    _verbose()
    cache = args.cache if args.cache is not None else str(expandr_home() / "cache" / "expansions.sqlite")
    cache = None if cache.lower() == "none" else cache
    try:
        collection = load_collection(args.data, split=args.split, max_queries=args.max_queries)
    except DataError as exc:
        print(f"error: --data/--split: {exc}", file=sys.stderr)
        return 2
    try:
        config = pair_config(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    device = ComponentDevice.from_str(args.device) if args.device else None
    prompt = GROUNDED_PROMPT if args.grounded else EXPANSION_PROMPT
    expander, answerer, scorer = make_components(config, llm=args.llm, adapter=args.adapter, encoder=args.encoder,
                                                 cache=cache, sampler=SamplerOptions(engine=args.engine, device=device,
                                                                                     weight_precision=args.weight_precision),
                                                 prompt=prompt, passages_k=args.passages_k,
                                                 passage_words=args.passage_words)
    passages = first_pass_hits(collection, args.encoder, args.passages_k, device) if args.grounded else None
    print(f"{collection.path}: split {args.split!r}, {len(collection.queries)} judged queries; "
          f"{config.n_candidates} candidates at temperatures {list(config.temperatures)}; "
          f"threshold {config.threshold}; answer term {'on' if config.use_answer else 'off (ablation)'}")
    stats = build_pairs(collection, args.out, expander, answerer, scorer, config,
                        progress_bar=not args.no_progress, overwrite=args.overwrite, passages=passages)
    print(stats.summary())
    if stats.margin_histogram.get("counts"):
        edges, counts = stats.margin_histogram["edges"], stats.margin_histogram["counts"]
        print("reward margin histogram:")
        for lo, hi, c in zip(edges, edges[1:], counts):
            if c:
                print(f"  [{lo:5.2f}, {hi:5.2f})  {c:5d}  {'#' * min(c, 60)}")
    print(json.dumps({"stats": stats.stats_path, "plot": stats.plot_path, "expansion_cache": expander.cache_stats}))
    return 0


def add_pairs_parser(subparsers) -> argparse.ArgumentParser:
    """Register `expandr pairs` on an argparse subparsers object (used by `expandr_haystack.cli`)."""
    p = subparsers.add_parser(
        "pairs", help="build ExpandR DPO preference pairs for the expander (TRL conversational JSONL)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Build ExpandR DPO preference pairs for the expander (TRL conversational format, JSONL).\n\n"
                    "Rerunning with the same --out appends only the queries not yet recorded (the expansion cache "
                    "makes\nregeneration free). Writes <out>, <out>.seen.jsonl, <out>.stats.json and "
                    "<out>.margins.png.")
    add_pairs_arguments(p)
    p.set_defaults(func=run_pairs)
    return p


__all__ = ["add_pairs_parser", "add_settings_arguments", "add_train_parser", "pair_config", "run", "run_pairs"]
