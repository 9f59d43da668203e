"""
The evaluation protocol of this project: fusion settings chosen on a validation split carved from the training
queries, then every expansion figure as the mean ± sd over several expansion seeds, with paired per-query tests.

Usage:
```python
from expandr_haystack.evaluation.data import load_collection
from expandr_haystack.evaluation.protocol import evaluate_seeds, select_settings

train = load_collection("cranfield", "train")
_, validation = train.split_validation(size=40, seed=0)
settings = select_settings(validation, ["prf", "expand", "grounded"], expander=expander)
report = evaluate_seeds(load_collection("cranfield", "test"), ["dense", "prf", "expand", "grounded"],
                        seeds=(1, 2, 3), expander=expander, **settings.evaluate_kwargs())
print(report.table())
```
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from expandr_haystack.checks import check_int
from expandr_haystack.evaluation.data import Collection
from expandr_haystack.evaluation.metrics import METRICS, evaluate_run, run_from_documents
from expandr_haystack.evaluation.runner import (
    EXPANSION_METHODS,
    MULTIQUERY,
    TOP_K,
    EvalResult,
    check_encoder_options,
    default_expander,
    dense_retriever,
    evaluate,
    family_texts,
    grounded_like,
    method_settings,
    parse_methods,
)
from expandr_haystack.evaluation.stats import average_per_query, mean_sd, paired_randomization_test

logger = logging.getLogger(__name__)

#: Query weights tried on validation (1.0 = the query alone: an expansion that does not help can be switched off).
WEIGHT_GRID = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
#: Rocchio settings tried on validation for `prf`: (k, f).
FEEDBACK_GRID = tuple((k, f) for k in (3, 5, 10) for f in (0.6, 0.7, 0.8, 0.9))


@dataclass
class Settings:
    """Fusion settings chosen on validation, and the validation nDCG@10 of every candidate (x100)."""

    query_weight: dict[str, float] = field(default_factory=dict)
    feedback_k: int = 3
    feedback_weight: float = 0.7
    validation: dict[str, dict[str, float]] = field(default_factory=dict)
    queries: int = 0

    def evaluate_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `evaluate` / `evaluate_seeds` these settings fix."""
        return {"query_weight": dict(self.query_weight), "feedback_k": self.feedback_k,
                "feedback_weight": self.feedback_weight}

    def to_dict(self) -> dict[str, Any]:
        return {"query_weight": self.query_weight, "feedback_k": self.feedback_k,
                "feedback_weight": self.feedback_weight, "validation_queries": self.queries,
                "validation_ndcg@10": self.validation}


def select_settings(
    validation: Collection,
    methods: Sequence[str],
    encoder: str | None = None,
    expander: Any | None = None,
    grounded_expander: Any | None = None,
    store: Any | None = None,
    device: Any | None = None,
    weight_grid: Sequence[float] = WEIGHT_GRID,
    feedback_grid: Sequence[tuple[int, float]] = FEEDBACK_GRID,
    progress_bar: bool = False,
    encoder_options: Any | None = None,
) -> Settings:
    """
    Choose each method's fusion setting by nDCG@10 on `validation` (queries carved from the training split with
    `Collection.split_validation`; never the evaluation split): w for `expand`/`grounded` over `weight_grid`,
    (k, f) for `prf` over `feedback_grid`. Expansions are generated once per family; only the fusion varies. Ties go
    to the higher weight (closer to the query alone). `encoder_options`: as `evaluate`'s.
    """
    names = parse_methods(methods)
    settings = Settings(queries=len(validation.queries))
    query_ids = list(validation.queries)
    queries = [validation.queries[q] for q in query_ids]
    scratch = EvalResult()
    retriever = dense_retriever(validation, encoder, store, device, progress_bar, scratch.timings,
                                check_encoder_options(encoder_options, names))
    texts = family_texts(names, retriever, queries, query_ids, scratch, expander, grounded_expander,
                         progress_bar=progress_bar)

    def score(name: str, **overrides: Any) -> float:
        base = method_settings(name, {name: 1.0}, 3, 0.7) | overrides
        family = EXPANSION_METHODS.get(name)
        hits = retriever.retrieve(queries, texts[family] if family else None, top_k=TOP_K, **base)
        return float(evaluate_run(validation.qrels, run_from_documents(query_ids, hits))[0]["ndcg@10"])

    for name in names:
        if name in ("expand", "grounded"):
            scores = {w: score(name, query_weight=w) for w in weight_grid}
            best = max(scores, key=lambda w: (round(scores[w], 10), w))
            settings.query_weight[name] = best
            settings.validation[name] = {f"w={w:g}": round(100 * v, 2) for w, v in scores.items()}
        elif name == "prf":
            scores = {(k, f): score(name, feedback_k=k, feedback_weight=f) for k, f in feedback_grid}
            best = max(scores, key=lambda kf: (round(scores[kf], 10), kf[1], -kf[0]))
            settings.feedback_k, settings.feedback_weight = best
            settings.validation[name] = {f"k={k},f={f:g}": round(100 * v, 2) for (k, f), v in scores.items()}
    return settings


@dataclass
class SeedReport:
    """
    Metrics over expansion seeds: ``rows[method] = {metric: mean, metric + "_sd": sd, "per_seed": {metric: [...]},
    "seeds": n}`` (methods without an LLM run once: sd 0), seed-averaged per-query nDCG@10, and paired tests;
    ``beir[method]`` is BEIR's own metrics of each run (one dict per seed; `EvalResult.beir`); ``runs[method]`` the
    evaluated rankings of each run (one per seed, in `seeds` order; `EvalResult.runs`), ``timings`` the seconds per
    step summed over the runs; ``multiquery`` what Haystack's QueryExpander made of the LLM's replies in each
    `haystack_multiquery` run (`multiquery.MultiQueryStats.to_dict`, one per seed).
    """

    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    per_query: dict[str, dict[str, float]] = field(default_factory=dict)
    comparisons: list[dict[str, Any]] = field(default_factory=list)
    failures: int = 0
    settings: dict[str, Any] = field(default_factory=dict)
    beir: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    runs: dict[str, list[dict[str, list[tuple[str, float | None]]]]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    multiquery: list[dict[str, Any]] = field(default_factory=list)

    def compare(self, method: str, baseline: str, label: str | None = None, seed: int = 0) -> dict[str, Any]:
        """Add (and return) the paired randomization test of `method` against `baseline` on nDCG@10."""
        a, b = self.per_query[method], self.per_query[baseline]
        delta = 100 * (sum(a[q] for q in a) / len(a) - sum(b[q] for q in b) / len(b))
        row = {"method": label or method, "baseline": baseline, "delta_ndcg@10": round(delta, 2),
               "p_randomization": round(paired_randomization_test(a, b, seed=seed), 4)}
        self.comparisons.append(row)
        return row

    def table(self, labels: dict[str, str] | None = None) -> str:
        """nDCG@10 and Recall@100 as mean ± sd (x100), then the paired tests."""
        labels = labels or {}
        width = max([len(labels.get(m, m)) for m in self.rows] + [12]) + 2
        lines = [f"{'method':<{width}}{'nDCG@10':>16}{'Recall@100':>16}{'seeds':>7}"]
        for m, r in self.rows.items():
            cells = "".join(f"{100 * r[k]:>9.2f} ± {100 * r[k + '_sd']:<4.2f}" for k in ("ndcg@10", "recall@100"))
            lines.append(f"{labels.get(m, m):<{width}}{cells}{r['seeds']:>7}")
        for c in self.comparisons:
            lines.append(f"  {labels.get(c['method'], c['method'])} vs {labels.get(c['baseline'], c['baseline'])}: "
                         f"{c['delta_ndcg@10']:+.2f} nDCG@10, paired randomization p = {c['p_randomization']:.4f}")
        if self.multiquery:
            from expandr_haystack.evaluation.multiquery import stats_line

            lines.append("  " + stats_line(self.multiquery, labels.get(MULTIQUERY, MULTIQUERY)))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"methods": self.rows, "comparisons": self.comparisons, "expansion_failures": self.failures,
                "settings": self.settings, "multiquery": self.multiquery}


def evaluate_seeds(collection: Collection, methods: Sequence[str], seeds: Sequence[int] = (1, 2, 3),
                   expander: Any | None = None, grounded_expander: Any | None = None, **kwargs: Any) -> SeedReport:
    """
    `evaluate` once for the methods without an LLM and once per seed for the expansion methods (each seed a copy of
    the expanders with that `seed`), aggregated into a `SeedReport`. `kwargs` go to `evaluate` (encoder, store,
    query_weight, feedback_k, feedback_weight, device, progress_bar, encoder_options).
    """
    names = parse_methods(methods)
    seeds = list(seeds)
    if not seeds:
        raise ValueError("`seeds` must name at least one seed.")
    for s in seeds:
        check_int(s, "seeds[]", minimum=0)
    fixed = [m for m in names if m not in EXPANSION_METHODS]
    expanding = [m for m in names if m in EXPANSION_METHODS]
    if kwargs.get("store") is None and any(m != "bm25" for m in names):  # index once for every run
        from expandr_haystack.evaluation.indexing import build_document_store

        kwargs["store"] = build_document_store(collection.documents(), model=kwargs.get("encoder"),
                                               device=kwargs.get("device"),
                                               progress_bar=kwargs.get("progress_bar", False),
                                               encoder=check_encoder_options(kwargs.get("encoder_options"), names))
    report = SeedReport()
    results: dict[str, list[EvalResult]] = {m: [] for m in names}
    if fixed:
        once = evaluate(collection, fixed, **kwargs)
        for m in fixed:
            results[m].append(once)
        report.settings.update(once.settings)
    if expanding:
        expander = expander if expander is not None else default_expander(kwargs.get("progress_bar", False))
        if grounded_expander is None and "grounded" in expanding:
            grounded_expander = grounded_like(expander)
        for s in seeds:
            run = evaluate(collection, expanding, expander=_with_seed(expander, s),
                           grounded_expander=_with_seed(grounded_expander, s), **kwargs)
            report.failures += sum(run.failures.values())
            if run.multiquery:
                report.multiquery.append(run.multiquery["stats"])
            report.settings.update(run.settings)
            for m in expanding:
                results[m].append(run)
    for m in names:
        runs = results[m]
        row: dict[str, Any] = {"seeds": len(runs) if m in EXPANSION_METHODS else 0, "per_seed": {}}
        for metric in METRICS:
            values = [r[m][metric] for r in runs]
            row[metric], row[metric + "_sd"] = mean_sd(values)
            row["per_seed"][metric] = values
        report.rows[m] = row
        report.per_query[m] = average_per_query([r.per_query[m] for r in runs])
        report.beir[m] = [getattr(r, "beir", {}).get(m, {}) for r in runs]
        report.runs[m] = [getattr(r, "runs", {}).get(m, {}) for r in runs]
    for r in {id(r): r for rs in results.values() for r in rs}.values():
        for step, seconds in getattr(r, "timings", {}).items():
            report.timings[step] = report.timings.get(step, 0.0) + seconds
    return report


def _with_seed(expander: Any | None, seed: int):
    return None if expander is None else expander.with_settings(seed=seed)


__all__ = ["FEEDBACK_GRID", "WEIGHT_GRID", "SeedReport", "Settings", "evaluate_seeds", "select_settings"]
