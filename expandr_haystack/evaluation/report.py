"""
Presentation of evaluation results: a plain-text table and a grouped bar chart (library code, no pyplot state);
for training, nDCG@10 by round (`plot_rounds`) and the reward margins of DPO pairs (`plot_pair_margins`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from expandr_haystack.evaluation.metrics import METRICS

_LABELS = {"ndcg@10": "nDCG@10", "recall@100": "Recall@100", "mrr@10": "MRR@10"}


def format_table(results: dict[str, dict[str, float]], title: str | None = None) -> str:
    """
    A plain-text table of `results` (one row per method; metrics x100 with two decimals).

    :param results: ``{method: {"ndcg@10", "recall@100", "mrr@10", "queries"}}``, e.g. an `EvalResult`.
    :param title: An optional first line.
    """
    header = f"{'method':<12}" + "".join(f"{_LABELS[m]:>12}" for m in METRICS) + f"{'queries':>9}"
    lines = ([title] if title else []) + [header, "-" * len(header)]
    for name, row in results.items():
        lines.append(f"{name:<12}" + "".join(f"{100 * row[m]:>12.2f}" for m in METRICS)
                     + f"{int(row.get('queries', 0)):>9}")
    return "\n".join(lines)


def plot_metrics(results: dict[str, dict[str, float]], path: str | Path, title: str | None = None) -> Path:
    """
    Save a grouped bar chart of `results` (one group per metric, one bar per method; values x100) as an image.

    :param results: ``{method: {"ndcg@10", "recall@100", "mrr@10", ...}}``, e.g. an `EvalResult`.
    :param path: Output file; the format follows its suffix (.png, .pdf, .svg).
    :param title: Chart title.
    :returns: The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        raise ValueError("`results` is empty: nothing to plot.")
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    methods = list(results)
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(METRICS) * max(1, len(methods)) * 0.5, 4))
    for i, name in enumerate(methods):
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(METRICS))]
        values = [100 * results[name][m] for m in METRICS]
        bars = ax.bar(xs, values, width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    ax.set_xticks(range(len(METRICS)), [_LABELS[m] for m in METRICS])
    ax.set_ylabel("score x100")
    ax.set_ylim(0, 105)
    queries = {int(r.get("queries", 0)) for r in results.values()}
    ax.set_title(title or f"Retrieval quality ({'/'.join(map(str, sorted(queries)))} queries)")
    ax.legend(loc="upper left", fontsize=8, ncols=min(4, len(methods)))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path



def _agg_figure(figsize: tuple[float, float]):
    """A matplotlib Figure drawn by the Agg canvas (no pyplot: no global state, no GUI backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize)
    FigureCanvasAgg(figure)
    return figure


def plot_rounds(metrics_rows: list[dict[str, Any]], path: str | Path, eval_split: str = "test",
                title: str | None = None) -> Path:
    """
    Save the nDCG@10 of a joint-training run by round: the baselines (round 0: BM25, zero-shot dense, PRF, the
    untrained LLM's q2d and grounded expansions and Haystack multi-query, the supervised no-expansion retriever) as
    horizontal lines, and one line per round setting (encoder_r without expansion, with PRF, with LLM_r's and
    LLM_{r-1}'s expansions), with ± sd error bars where a row has several expansion seeds. Written atomically (a kill
    never leaves half an image).

    Usage:
    ```python
    rows = json.loads(Path("runs/tiny-cpu/metrics.json").read_text())
    plot_rounds(rows, "runs/tiny-cpu/metrics.png", eval_split="test")
    ```

    :param metrics_rows: The rows of a run's ``metrics.json``: ``{"round", "label", "series", "method", "ndcg@10",
        ...}`` (optionally ``"ndcg@10_sd"``); round 0 = baselines, ``series`` = which LLM's expansions (``"LLM_r"``
        or ``"LLM_r-1"``).
    :param path: Output image (format from its suffix).
    :param eval_split: The split the numbers are from (y-axis label).
    :param title: Chart title (default "ExpandR joint training").
    :returns: The path written.
    """
    from expandr_haystack.files import atomic_save_figure

    if not metrics_rows:
        raise ValueError("`metrics_rows` is empty: nothing to plot.")
    figure = _agg_figure((10, 4.6))
    ax = figure.subplots()
    colors = iter(["0.45", "tab:purple", "tab:brown", "tab:olive", "tab:cyan", "tab:pink", "0.7", "tab:gray"])
    styles = {"bm25": (0, (1, 1)), "prf": (0, (5, 2, 1, 2)), "grounded": (0, (3, 1, 1, 1, 1, 1)),
              "haystack_multiquery": (0, (2, 2))}
    zero_shot = {"bm25": "BM25", "dense": "zero-shot dense", "prf": "PRF, zero-shot encoder",
                 "expand": "untrained LLM, q2d (zero-shot encoder)",
                 "grounded": "untrained LLM, grounded (zero-shot encoder)",
                 "haystack_multiquery": "untrained LLM, Haystack multi-query (zero-shot encoder)"}
    for m in metrics_rows:
        if m["round"] == 0:
            supervised = m["label"].startswith("supervised")
            name = zero_shot.get(m["method"]) if m["label"].startswith("zero-shot") else None
            ax.axhline(100 * m["ndcg@10"], linestyle="--" if supervised else styles.get(m["method"], ":"),
                       color="black" if supervised else next(colors, "0.6"), linewidth=1.2,
                       label=name or f"{m['label']}: {m['method']}")
    series: dict[str, list[tuple[int, float, float]]] = {}
    for m in metrics_rows:
        if m["round"] > 0:
            if m["method"] in ("dense", "prf") and m["series"] != "LLM_r":
                continue
            if m["method"] == "dense":
                name = "encoder_r, no expansion"
            elif m["method"] == "prf":
                name = "encoder_r + PRF (no LLM)"
            else:
                name = f"encoder_r + {m['series']} ({m['method']})"
            series.setdefault(name, []).append((m["round"], 100 * m["ndcg@10"], 100 * (m.get("ndcg@10_sd") or 0.0)))
    for name, points in sorted(series.items()):
        points.sort()
        xs, ys, sds = [p[0] for p in points], [p[1] for p in points], [p[2] for p in points]
        ax.errorbar(xs, ys, yerr=sds if any(sds) else None, marker="o", capsize=3, label=name)
    ax.set_xlabel("round")
    ax.set_ylabel(f"nDCG@10 x100 ({eval_split})")
    ax.set_title(title or "ExpandR joint training")
    ax.set_xticks(sorted({m["round"] for m in metrics_rows if m["round"] > 0}) or [1])
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.tight_layout()
    return atomic_save_figure(figure, Path(path).expanduser(), dpi=120)


def plot_pair_margins(stats: Any, pairs: list[dict[str, Any]], records: list[dict[str, Any]], path: str | Path,
                      threshold: float) -> Path:
    """
    Save the reward-margin histogram of the kept DPO pairs and the best-score histogram of every processed query,
    with the keep threshold marked. Written atomically.

    Usage:
    ```python
    stats = build_pairs(...)        # expandr_haystack.training.pairs
    plot_pair_margins(stats, pairs, records, "pairs.jsonl.margins.png", threshold=0.6)
    ```

    :param stats: A `PairStats` (`margin_histogram` and `best_score_histogram` edges, `kept`, `kept_fraction`,
        `queries_seen`, `config`, `out_path`).
    :param pairs: The pair rows (each with ``rewards.margin``).
    :param records: The per-query records of ``<out>.seen.jsonl`` (each with ``best_score``, None when unscored).
    :param path: Output image (format from its suffix).
    :param threshold: The keep threshold on the best score.
    :returns: The path written.
    """
    from expandr_haystack.files import atomic_save_figure

    margins = [float(p["rewards"]["margin"]) for p in pairs]
    best = [float(r["best_score"]) for r in records if r.get("best_score") is not None]
    figure = _agg_figure((10, 4))
    ax1, ax2 = figure.subplots(1, 2)
    if margins:
        ax1.hist(margins, bins=stats.margin_histogram["edges"], color="tab:blue")
    ax1.set_title(f"reward margin (chosen - rejected), {stats.kept} pairs")
    ax1.set_xlabel("margin")
    ax1.set_ylabel("pairs")
    if best:
        ax2.hist(best, bins=stats.best_score_histogram["edges"], color="tab:gray")
    ax2.axvline(threshold, color="tab:red", linestyle="--", label=f"threshold {threshold:g}")
    ax2.set_title(f"max cos_doc{' + cos_answer' if stats.config.get('use_answer', True) else ''}, "
                  f"{stats.queries_seen} queries")
    ax2.set_xlabel("best score")
    ax2.legend()
    figure.suptitle(f"{Path(stats.out_path).name}: kept {stats.kept_fraction:.1%}")
    figure.tight_layout()
    return atomic_save_figure(figure, Path(path).expanduser(), dpi=100)


__all__ = ["format_table", "plot_metrics", "plot_pair_margins", "plot_rounds"]
