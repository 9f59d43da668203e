"""
`expandr eval`: retrieval evaluation on a BEIR-layout collection (registered by `expandr_haystack.cli`).

    expandr eval DATA_DIR [--split test] [--methods bm25,dense,...,haystack_multiquery] [--encoder PATH]
                 [--encoder-backend torch|ctranslate2] [--llm PATH] [--adapter PATH] [--n-expansions N]
                 [--temperature T] [--query-weight W] [--cache PATH | --no-cache] [--json OUT] [--run-file RUN.trec]
                 [--plot OUT.png] [--max-queries N] [--max-new-tokens N] [--engine E] [--depth N]
                 [--keep-identical-ids] [--no-multiquery-prefill]

Argument errors raise `expandr_haystack.cli.CommandError`, which `expandr_haystack.cli.main` reports as one line.

Usage:
```python
import argparse
from expandr_haystack.evaluation.cli import add_eval_parser

subparsers = argparse.ArgumentParser(prog="expandr").add_subparsers(dest="command")
add_eval_parser(subparsers)
```
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from expandr_haystack.cli import CommandError


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Register `expandr eval` on an argparse subparsers object."""
    from expandr_haystack.evaluation.runner import DEFAULT_METHODS, METHODS
    from expandr_haystack.options import add_sampler_arguments

    p = subparsers.add_parser(
        "eval", help="evaluate BM25 / dense / PRF / ExpandR / Haystack multi-query retrieval on a BEIR-format "
                     "collection",
        description="Evaluate retrieval methods on a BEIR-layout collection (nDCG@10, Recall@100, MRR@10 by "
                    "pytrec_eval over the judged queries of one split; --json adds BEIR's own table: nDCG, MAP, "
                    "Recall, P at 1, 3, 5, 10, 100 (1000 with --depth 1000) and MRR@10, as "
                    "beir.retrieval.evaluation.EvaluateRetrieval computes them).")
    p.add_argument("data_dir", metavar="DATA_DIR",
                   help="BEIR-layout folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv), 'cranfield' for the "
                        "bundled collection, or a BEIR dataset name such as 'scifact' (downloaded once with "
                        "beir.util into $EXPANDR_HOME/beir; offline, the error says where to put it)")
    p.add_argument("--split", default="test", help="qrels split to evaluate (default: test)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated methods from {', '.join(METHODS)} (default: {','.join(DEFAULT_METHODS)})")
    p.add_argument("--encoder", default=None, help="sentence-transformers encoder (default: bundled MiniLM)")
    p.add_argument("--encoder-backend", default="torch", choices=("torch", "ctranslate2"),
                   help="encoder runtime for indexing and queries alike (ctranslate2: int8 on CPU, needs the "
                        "ctranslate2 package; not with haystack_multiquery; default: torch)")
    p.add_argument("--llm", default=None, help="expansion LLM (default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", default=None, help="PEFT LoRA adapter directory for the LLM")
    p.add_argument("--n-expansions", type=int, default=1,
                   help="expansions per query, averaged (haystack_multiquery: the alternative queries asked for; "
                        "default: 1)")
    p.add_argument("--temperature", type=float, default=1.0, help="expansion sampling temperature (default: 1.0)")
    p.add_argument("--query-weight", default="0.5", metavar="W",
                   help="w of the fused query w*q + (1-w)*mean(e): one number, or per method like "
                        "expand=0.7,grounded=0.8 (default 0.5, the paper's mean; a trained round's is in its "
                        "metrics.json)")
    p.add_argument("--feedback-k", type=int, default=3, help="prf: hits averaged (default: 3)")
    p.add_argument("--feedback-weight", type=float, default=0.7, help="prf: weight of the query (default: 0.7)")
    p.add_argument("--tune-on", default=None, metavar="SPLIT",
                   help="choose --query-weight and the prf settings on a validation split carved from SPLIT's "
                        "judged queries (e.g. train; never the evaluated split)")
    p.add_argument("--validation-size", type=int, default=40, help="queries carved for --tune-on (default: 40)")
    p.add_argument("--seeds", default=None, metavar="S1,S2,...",
                   help="expansion seeds: report each expansion method as mean ± sd over them, with paired "
                        "randomization tests against dense and prf (default: one run with --seed)")
    p.add_argument("--cache", default=None, metavar="PATH",
                   help="persistent expansion cache (sqlite file; default <expandr home>/cache/expansions.sqlite, "
                        "the one `expandr pairs` uses, so a rerun regenerates nothing)")
    p.add_argument("--no-cache", action="store_true", help="generate every expansion afresh, cache nothing")
    p.add_argument("--json", dest="json_out", default=None, metavar="OUT",
                   help='write {"methods": {method: means}, "settings": ..., "expansion_failures": n, "beir": ..., '
                        '"provenance": {models with fingerprints, seeds, package versions, date, argv, timings}} to '
                        "OUT and per-query scores to OUT.per_query.json")
    p.add_argument("--run-file", default=None, metavar="RUN.trec",
                   help="write each method's ranking as a TREC run (qid Q0 docid rank score method; trec_eval and "
                        "ranx read it), one file per method: RUN.<method>.trec (RUN.<method>.seed<S>.trec per "
                        "seed with --seeds)")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="save a bar chart of the metrics")
    p.add_argument("--max-queries", type=int, default=None, help="evaluate only the first N judged queries")
    p.add_argument("--max-new-tokens", type=int, default=96, help="expansion length limit (default: 96)")
    p.add_argument("--batch-size", type=int, default=16, help="LLM generation batch size (default: 16)")
    p.add_argument("--seed", type=int, default=42, help="expansion seed (default: 42)")
    add_sampler_arguments(p, ("--backend",))
    p.add_argument("--depth", type=int, default=100,
                   help="documents retrieved per query (default: 100; BEIR uses 1000, which @1000 metrics need)")
    p.add_argument("--keep-identical-ids", dest="ignore_identical_ids", action="store_false",
                   help="score hits whose document id equals the query id (by default they are dropped, as BEIR "
                        "does, for collections whose queries are corpus documents)")
    p.add_argument("--multiquery-prefill", action=argparse.BooleanOptionalAction, default=True,
                   help='haystack_multiquery: start the LLM\'s replies with {"queries": [" and end them at the first '
                        "]} (assistant prefill: structured output for a small model; QueryExpander still parses "
                        "them); --no-multiquery-prefill: its free replies (default: on)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run_eval)
    return p


def per_query_path(json_out: str | Path) -> Path:
    """Where the per-query scores go for a `--json OUT` file: OUT with the suffix `.per_query.json`."""
    out = Path(json_out)
    return out.with_suffix(".per_query.json") if out.suffix else out.with_name(out.name + ".per_query.json")


def parse_query_weight(text: str) -> float | dict[str, float]:
    """`--query-weight`: "0.7" or "expand=0.7,grounded=0.8"."""
    try:
        if "=" not in text:
            return float(text)
        pairs = [part.split("=", 1) for part in text.split(",") if part.strip()]
        return {name.strip(): float(value) for name, value in pairs}
    except ValueError:
        raise CommandError(f"--query-weight must be a number or method=number pairs like expand=0.7,grounded=0.8; "
                           f"got {text!r}.") from None


def _check_eval_args(args: argparse.Namespace) -> None:
    from expandr_haystack.checks import check_int, check_number

    try:
        if args.max_queries is not None:
            check_int(args.max_queries, "--max-queries")
        check_int(args.n_expansions, "--n-expansions")
        check_int(args.max_new_tokens, "--max-new-tokens")
        check_int(args.feedback_k, "--feedback-k")
        check_int(args.validation_size, "--validation-size")
        check_int(args.depth, "--depth")
        check_number(args.temperature, "--temperature", 0.0)
        check_number(args.feedback_weight, "--feedback-weight", 0.0, 1.0)
    except ValueError as exc:
        raise CommandError(str(exc).replace("`", "")) from None
    if args.tune_on is not None and args.tune_on == args.split:
        raise CommandError(f"--tune-on {args.tune_on}: settings must be chosen on another split than the evaluated "
                           f"one (--split {args.split}); use the training split.")
    if args.seeds is not None:
        try:
            args.seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
        except ValueError:
            raise CommandError(f"--seeds must be comma-separated integers like 1,2,3; got {args.seeds!r}.") from None
        if not args.seeds:
            raise CommandError("--seeds names no seed.")
    if args.no_cache and args.cache is not None:
        raise CommandError("--cache and --no-cache contradict each other; give one.")
    for name in ("json_out", "plot", "run_file"):  # fail before the (long) evaluation, not after it
        out = getattr(args, name)
        if out is not None and Path(out).expanduser().is_dir():
            raise CommandError(f"--{name.replace('_out', '').replace('_', '-')} {out}: is a directory; give a file "
                               "name.")


#: The modules of the `[eval]` extra that `expandr eval` needs, and the command that installs them.
EVAL_EXTRA_INSTALL = 'pip install "expandr-haystack[eval]"'


def missing_eval_modules(data_dir: str) -> list[str]:
    """
    The `[eval]` extra's modules that `expandr eval DATA_DIR` would need and cannot import: pytrec_eval (metrics)
    always, beir when DATA_DIR is a dataset name still to download (neither a folder nor a bundled collection).
    """
    import importlib.util

    from expandr_haystack.evaluation.data import bundled_names

    needed = ["pytrec_eval"]
    if not Path(data_dir).expanduser().exists() and data_dir not in bundled_names():
        needed.append("beir")
    return [m for m in needed if importlib.util.find_spec(m) is None]


def check_eval_extra(data_dir: str) -> None:
    """Fail before any loading, indexing or generation when the `[eval]` extra is missing, naming the fix."""
    missing = missing_eval_modules(data_dir)
    if missing:
        raise CommandError(f"expandr eval needs the [eval] extra ({', '.join(missing)} not installed): "
                           f"{EVAL_EXTRA_INSTALL}")


def eval_cache_path(args: argparse.Namespace) -> str | None:
    """The expansion cache of `expandr eval`: --cache, else the user cache (`expandr pairs`'s); None with --no-cache."""
    from expandr_haystack.models import expandr_home

    if args.no_cache:
        return None
    if args.cache is not None:
        return None if args.cache.lower() == "none" else str(Path(args.cache).expanduser())
    return str(expandr_home() / "cache" / "expansions.sqlite")


def run_file_path(run_file: str | Path, method: str, seed: int | None = None) -> Path:
    """
    The TREC run file of one method for `--run-file PATH`: the method (and ``seed<S>``) inserted before PATH's
    suffix (``run.trec`` -> ``run.dense.trec``, ``run.expand.seed1.trec``), appended when PATH has no suffix.
    """
    out = Path(run_file).expanduser()
    middle = method + (f".seed{seed}" if seed is not None else "")
    return out.with_name(f"{out.stem}.{middle}{out.suffix}") if out.suffix else out.with_name(f"{out.name}.{middle}")


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages behind the numbers (None where one is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in ("expandr-haystack", "haystack-ai", "torch", "transformers", "sentence-transformers", "peft",
                 "pytrec_eval-terrier", "beir"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _identity(path_or_id: str, adapter: str | None = None) -> str:
    from expandr_haystack.models import model_identity

    try:
        return model_identity(path_or_id, adapter)
    except Exception as exc:  # noqa: BLE001 - provenance must not fail a finished evaluation
        return f"unavailable ({type(exc).__name__}: {exc})"


def eval_provenance(args: argparse.Namespace, methods: Sequence[str], expander: Any | None, cache: str | None,
                    timings: dict[str, float], started: str, argv: Sequence[str],
                    query_weight: float | dict[str, float] | None = None) -> dict[str, Any]:
    """
    What produced the numbers of `expandr eval` (the "provenance" of --json): the encoder, LLM and adapter with
    their fingerprints (`models.model_identity`; they change whenever the weights do), the generation settings and
    seeds, the query weights (`query_weight`: the ones used, e.g. chosen by --tune-on; default --query-weight),
    package versions, the date (UTC, ISO 8601), the command line and the timings.
    """
    from expandr_haystack.models import fingerprint, resolve_encoder_path

    out: dict[str, Any] = {"date": started, "argv": list(argv), "packages": package_versions()}
    if any(m != "bm25" for m in methods):
        path = resolve_encoder_path(args.encoder)
        out["encoder"] = {"model": args.encoder or "bundled:all-MiniLM-L6-v2", "path": path,
                          "fingerprint": _identity(path), "backend": getattr(args, "encoder_backend", "torch")}
    else:
        out["encoder"] = None
    if expander is not None:
        from expandr_haystack.models import DEFAULT_LLM, dequantised_llm_dir, resolve_llm_path

        sampler = getattr(expander, "_sampler", None)
        bundled = args.llm is None or args.llm == DEFAULT_LLM  # its path, without preparing it
        path = str(dequantised_llm_dir()) if bundled else resolve_llm_path(args.llm)
        out["llm"] = {"model": args.llm or "bundled:SmolLM2-135M-Instruct", "path": path,
                      "fingerprint": _identity(path),
                      "sampler": getattr(sampler, "identity", None), "engine": args.engine,
                      "weight_precision": args.weight_precision, "engine_used": getattr(sampler, "engine", None),
                      "backend": args.engine}  # "backend": the key earlier files have
        out["adapter"] = (None if args.adapter is None else
                          {"path": str(Path(args.adapter).expanduser()),
                           "fingerprint": fingerprint(Path(args.adapter))})
        out["generation"] = {"n_expansions": args.n_expansions, "temperature": args.temperature,
                             "top_p": expander.generation.top_p, "max_new_tokens": args.max_new_tokens,
                             "batch_size": args.batch_size, "prompt": expander.prompt,
                             "system_prompt": expander.system_prompt}
        out["seeds"] = list(args.seeds) if args.seeds is not None else [args.seed]
        out["cache"] = cache
    else:
        out["llm"] = out["adapter"] = out["generation"] = None
        out["seeds"] = []
    out["query_weight"] = parse_query_weight(args.query_weight) if query_weight is None else query_weight
    out["timings"] = {k: round(float(v), 3) for k, v in timings.items()}
    return out


def write_run_files(run_file: str, runs: dict[str, Any], seeds: Sequence[int] | None = None) -> list[Path]:
    """
    Write `--run-file`: ``runs[method]`` is one ranking ``{qid: [(doc_id, score), ...]}``, or (`--seeds`) a list of
    them: one per seed (files ``RUN.<method>.seed<S>``) for the expansion methods, a single one for the others.
    """
    from expandr_haystack.evaluation.metrics import write_trec_run
    from expandr_haystack.evaluation.runner import EXPANSION_METHODS

    written = []
    for method, ranked in runs.items():
        if isinstance(ranked, list):
            if seeds is None or method not in EXPANSION_METHODS:
                written.append(write_trec_run(run_file_path(run_file, method), ranked[0], method))
            else:
                for seed, one in zip(seeds, ranked, strict=True):
                    written.append(write_trec_run(run_file_path(run_file, method, seed), one, method))
        else:
            written.append(write_trec_run(run_file_path(run_file, method), ranked, method))
    return written


def run_eval(args: argparse.Namespace) -> int:
    """Run `expandr eval` with parsed arguments; returns the exit status."""
    from datetime import UTC, datetime

    from expandr_haystack.components.expander import LLMQueryExpander
    from expandr_haystack.evaluation import evaluate, format_table, parse_methods, plot_metrics
    from expandr_haystack.evaluation.data import load_collection
    from expandr_haystack.evaluation.multiquery import MultiQueryStats, stats_line
    from expandr_haystack.evaluation.protocol import evaluate_seeds, select_settings
    from expandr_haystack.evaluation.runner import EXPANSION_METHODS, method_weights
    from expandr_haystack.files import atomic_write_json
    from expandr_haystack.options import GenerationSettings, SamplerOptions

    started = datetime.now(UTC).isoformat(timespec="seconds")
    argv = list(getattr(args, "argv", None) or sys.argv)
    methods = parse_methods(args.methods)  # before any loading: a typo fails at once
    _check_eval_args(args)
    check_eval_extra(args.data_dir)  # before any loading, indexing or generation
    cache = eval_cache_path(args)
    settings = {"query_weight": parse_query_weight(args.query_weight), "feedback_k": args.feedback_k,
                "feedback_weight": args.feedback_weight}
    run_options = {"ignore_identical_ids": args.ignore_identical_ids, "depth": args.depth,
                   "multiquery_prefill": args.multiquery_prefill}
    method_weights(settings["query_weight"])  # a bad weight fails before any loading
    backend = getattr(args, "encoder_backend", "torch")
    encoder_options = None if backend == "torch" else {"backend": backend}  # None: the stock document embedder
    if encoder_options is not None and "haystack_multiquery" in methods:
        raise CommandError(f"--encoder-backend {backend} does not apply to haystack_multiquery (Haystack's own text "
                           f"embedder runs torch); evaluate it in a separate run.")

    collection = load_collection(args.data_dir, split=args.split, max_queries=args.max_queries)
    print(f"{collection.path} [{collection.split}]: {len(collection.corpus)} documents, "
          f"{len(collection.queries)} judged queries; methods: {', '.join(methods)}", flush=True)
    expander = None
    if any(m in EXPANSION_METHODS for m in methods):
        generation = GenerationSettings(temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                                        batch_size=args.batch_size, seed=args.seed, progress_bar=not args.no_progress)
        expander = LLMQueryExpander(model=args.llm, adapter=args.adapter, n_expansions=args.n_expansions,
                                    generation=generation, cache=cache,
                                    sampler=SamplerOptions(engine=args.engine, weight_precision=args.weight_precision))
    tuned = None
    if args.tune_on is not None:
        _, validation = load_collection(args.data_dir, split=args.tune_on).split_validation(args.validation_size)
        tuned = select_settings(validation, methods, encoder=args.encoder, expander=expander,
                                progress_bar=not args.no_progress, encoder_options=encoder_options)
        settings = tuned.evaluate_kwargs()
        print(f"chosen on {tuned.queries} validation queries of {args.tune_on!r}: {json.dumps(settings)}", flush=True)
    info: dict[str, Any] = {"settings": settings | run_options | {"n_expansions": args.n_expansions,
                                                                  "temperature": args.temperature}}
    if tuned is not None:
        info["validation"] = tuned.to_dict()
    if args.seeds is not None:
        report = evaluate_seeds(collection, methods, seeds=args.seeds, expander=expander, encoder=args.encoder,
                                progress_bar=not args.no_progress, encoder_options=encoder_options, **settings,
                                **run_options)
        for m in methods:
            for baseline in ("dense", "prf"):
                if m in EXPANSION_METHODS and baseline in methods:
                    report.compare(m, baseline)
        print()
        print(report.table())
        means = {m: {k: v for k, v in r.items() if k != "per_seed"} for m, r in report.rows.items()}
        payload = {"methods": means, **info, "comparisons": report.comparisons,
                   "expansion_failures": report.failures,
                   "per_seed": {m: r["per_seed"] for m, r in report.rows.items()}, "beir": report.beir}
        multiquery = report.multiquery
        per_query = report.per_query
        failures = report.failures
        timings, runs = report.timings, report.runs
    else:
        result = evaluate(collection, methods, encoder=args.encoder, expander=expander,
                          progress_bar=not args.no_progress, encoder_options=encoder_options, **settings,
                          **run_options)
        print()
        print(format_table(result, title=f"{collection.path.name} {collection.split} (metrics x100)"))
        timings = ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items())
        print(f"time: {timings}")
        if result.warnings:
            print(f"data warnings: {len(result.warnings)}")
            for w in result.warnings:
                print(f"  warning: {w}")
        payload = {"methods": result.metrics, **info, "expansion_failures": sum(result.failures.values()),
                   "beir": result.beir}
        multiquery = [result.multiquery["stats"]] if result.multiquery else []
        if multiquery:
            print(stats_line(multiquery))
        per_query = result.per_query
        failures = sum(result.failures.values())
        means = result.metrics
        timings, runs = result.timings, result.runs
    if multiquery:
        payload["haystack_multiquery"] = {"per_seed": multiquery, "total": MultiQueryStats.total(multiquery).to_dict()}
    if failures:
        print(f"expansion failures: {failures} samples fell back to the query alone (see the warnings above)")
    if args.run_file:
        for path in write_run_files(args.run_file, runs, args.seeds):
            print(f"wrote {path}")
    if args.json_out:
        payload["provenance"] = eval_provenance(args, methods, expander, cache, timings, started, argv,
                                                settings.get("query_weight"))
        out = atomic_write_json(Path(args.json_out).expanduser(), payload)
        pq = atomic_write_json(per_query_path(out), per_query)
        print(f"wrote {out} and {pq}")
    if args.plot:
        print(f"wrote {plot_metrics(means, args.plot, title=f'{collection.path.name} {collection.split}')}")
    return 0


__all__ = ["EVAL_EXTRA_INSTALL", "add_eval_parser", "check_eval_extra", "eval_cache_path", "eval_provenance",
           "missing_eval_modules", "package_versions", "parse_query_weight", "per_query_path", "run_eval",
           "run_file_path", "write_run_files"]
