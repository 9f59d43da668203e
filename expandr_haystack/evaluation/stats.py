"""
Statistics for honest comparisons: mean and spread over seeds, and paired per-query significance tests.

Usage:
```python
from expandr_haystack.evaluation.stats import mean_sd, paired_randomization_test

mean, sd = mean_sd([39.1, 38.7, 39.4])
p = paired_randomization_test({"1": 0.5, "2": 0.7}, {"1": 0.4, "2": 0.6})
```
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0.0 for a single value)."""
    if not values:
        raise ValueError("`values` is empty: nothing to average.")
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def _paired(a: Mapping[str, float], b: Mapping[str, float]) -> np.ndarray:
    common = sorted(set(a) & set(b))
    if not common:
        raise ValueError("The two runs share no query id: nothing to pair.")
    return np.asarray([float(a[q]) - float(b[q]) for q in common], dtype=np.float64)


def paired_randomization_test(a: Mapping[str, float], b: Mapping[str, float], permutations: int = 10_000,
                              seed: int = 0) -> float:
    """
    Two-sided paired randomization (sign-flip) test of mean(a - b) over the queries both runs scored: the share of
    random sign assignments of the per-query differences whose |mean| reaches the observed one (Smucker et al. 2007).

    :param a: ``{query_id: score}`` of one system (e.g. per-query nDCG@10, seed-averaged).
    :param b: The same for the other system.
    :returns: The p-value (with the observed assignment counted, so never 0).
    """
    diff = _paired(a, b)
    observed = abs(diff.mean())
    rng = np.random.default_rng(seed)
    signs = rng.choice((-1.0, 1.0), size=(permutations, len(diff)))
    extreme = int((np.abs((signs * diff).mean(axis=1)) >= observed - 1e-12).sum())
    return (extreme + 1) / (permutations + 1)


def paired_t_test(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    """Two-sided paired t-test p-value of mean(a - b) over the common queries (1.0 when all differences are 0)."""
    from scipy import stats

    diff = _paired(a, b)
    if np.allclose(diff, 0):
        return 1.0
    p = float(stats.ttest_1samp(diff, 0.0).pvalue)
    return 1.0 if math.isnan(p) else p


def average_per_query(runs: Sequence[Mapping[str, Mapping[str, float]]], metric: str = "ndcg@10") -> dict[str, float]:
    """Per-query `metric` averaged over several runs (seeds) of one method: ``{query_id: mean}``."""
    if not runs:
        raise ValueError("`runs` is empty.")
    ids = set(runs[0])
    return {q: float(np.mean([r[q][metric] for r in runs if q in r])) for q in sorted(ids)}


__all__ = ["average_per_query", "mean_sd", "paired_randomization_test", "paired_t_test"]
