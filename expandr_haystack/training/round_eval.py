"""
The evaluation and report of joint training: the round-0 baselines, step 5 of a round (evaluate encoder_r with LLM_r,
and with LLM_{r-1}), the rows of ``metrics.json``, the summary table, ``metrics.png`` and our section of the round's
model cards.

`RoundEvaluation` is the evaluation half of `expandr_haystack.training.rounds.JointTrainer` (a mixin: it works with
the trainer's config, run folder, data splits, models and document stores). The protocol
(`expandr_haystack.evaluation.protocol`): every evaluation first chooses its fusion settings (w of each expansion
method, PRF's k and f) by nDCG@10 on the validation split, with that evaluation's encoder and LLM; then each expansion
method runs once per seed of `eval_seeds`; each round tests ExpandR against the supervised no-expansion retriever and
against PRF on the same encoder (paired randomization test on per-query nDCG@10).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from expandr_haystack.checks import is_adapter_dir
from expandr_haystack.files import atomic_write_json

logger = logging.getLogger(__name__)

#: Labels of the round-0 rows in ``metrics.json``.
ZERO_SHOT = "zero-shot (untrained LLM)"
SUPERVISED = "supervised, no expansion"
#: What every round-0 report evaluates with the base encoder and the untrained LLM (plus `eval_methods`);
#: `haystack_multiquery` is Haystack's own query expansion (QueryExpander + MultiQueryEmbeddingRetriever) with the
#: same LLM, settings and seeds, its replies prefilled as JSON (`evaluation.multiquery.JSON_PREFILL`).
BASELINE_METHODS = ("bm25", "dense", "prf", "expand", "grounded", "haystack_multiquery")
#: What every round evaluates with its encoder (plus the ExpandR method of `expansion.mode`, and `eval_methods`).
ROUND_METHODS = ("dense", "prf")
#: Rocchio settings of `prf` when there is no validation split (`evaluation.runner.evaluate`'s defaults).
DEFAULT_FEEDBACK = {"feedback_k": 3, "feedback_weight": 0.7}


class RoundEvaluation:
    """
    The evaluations of a joint-training run (mixed into `JointTrainer`): the baselines before round 1, step 5 of each
    round, their ``metrics.json`` rows and evaluation files, `summary`, ``metrics.png`` and the model cards.
    """

    # -- evaluation protocol ----------------------------------------------------------------------------------
    @property
    def _baseline_methods(self) -> list[str]:
        from expandr_haystack.evaluation.runner import parse_methods

        return parse_methods([*BASELINE_METHODS, *self.config.eval_methods])

    @property
    def _methods(self) -> list[str]:
        """The methods of every round (bm25 is encoder-independent: reported once, with the baselines)."""
        from expandr_haystack.evaluation.runner import parse_methods

        return parse_methods([*ROUND_METHODS, self._mode_method,
                              *(m for m in self.config.eval_methods if m != "bm25")])

    def _settings(self, encoder: str | None, llm_round: int | None, methods: list[str], store=None) -> dict[str, Any]:
        """
        The fusion settings of `methods` for (encoder, LLM_llm_round): w of each expansion method and PRF's (k, f),
        chosen by nDCG@10 on the validation split (`protocol.select_settings`), or the config's
        (`retriever.query_weight`, k = 3, f = 0.7) without one. ``chosen_on`` says which.
        """
        from expandr_haystack.evaluation.protocol import select_settings
        from expandr_haystack.evaluation.runner import WEIGHTED_METHODS

        w = self.config.retriever.query_weight
        tunable = [m for m in methods if m == "prf" or m in WEIGHTED_METHODS]
        validation = self.validation_data
        if validation is None or not tunable:
            return {"chosen_on": "config", "query_weight": dict.fromkeys(WEIGHTED_METHODS, w), **DEFAULT_FEEDBACK,
                    "validation_queries": 0, "validation_ndcg@10": {}}
        expander = self._expander(llm_round) if llm_round is not None else None
        chosen = select_settings(validation, tunable, encoder=encoder, expander=expander,
                                 grounded_expander=None if expander is None else self._grounded(expander),
                                 store=store, device=self._device())
        settings = {"chosen_on": "validation", **chosen.to_dict()}
        settings["query_weight"] = {m: chosen.query_weight.get(m, w) for m in WEIGHTED_METHODS}
        return settings

    def _evaluate(self, encoder: str | None, methods: list[str], llm_round: int | None, store=None,
                  settings: dict[str, Any] | None = None):
        """
        `protocol.evaluate_seeds` of `methods` on the eval split: encoder + LLM_llm_round's expansions (q2d, and
        grounded with the same settings), once per seed of `eval_seeds` for the expansion methods.
        """
        from expandr_haystack.evaluation.protocol import evaluate_seeds

        settings = settings or self._settings(encoder, llm_round, [], store)
        expander = self._expander(llm_round) if llm_round is not None else None
        return evaluate_seeds(self.eval_data, methods, self.config.seeds, expander=expander,
                              grounded_expander=None if expander is None else self._grounded(expander),
                              encoder=encoder, store=store, device=self._device(), progress_bar=self.progress_bar,
                              query_weight=settings["query_weight"], feedback_k=settings["feedback_k"],
                              feedback_weight=settings["feedback_weight"])

    def _record(self, round_: int, label: str, report, settings: dict[str, Any], series: str | None = None,
                extra: dict[str, dict[str, Any]] | None = None) -> None:
        """
        One ``metrics.json`` row per method of a `SeedReport`: the metrics' means (x1, as `evaluate` reports them),
        ``<metric>_sd`` over the seeds, ``per_seed`` values, ``seeds`` (the expansion seeds; [] for a method
        without an LLM), ``queries``, the ``settings`` the method ran with (and how they were chosen), for
        `haystack_multiquery` ``multiquery`` (what QueryExpander made of the LLM's replies, per seed), and `extra`.
        """
        from expandr_haystack.evaluation.metrics import METRICS
        from expandr_haystack.evaluation.runner import EXPANSION_METHODS, MULTIQUERY

        rows = {}
        for method, row in report.rows.items():
            values: dict[str, Any] = {m: row[m] for m in METRICS}
            values["queries"] = len(self.eval_data.queries)
            values.update({f"{m}_sd": row[f"{m}_sd"] for m in METRICS})
            values["seeds"] = list(self.config.seeds) if method in EXPANSION_METHODS else []
            values["per_seed"] = row["per_seed"]
            values["settings"] = self._method_settings(method, report, settings)
            if method == MULTIQUERY and getattr(report, "multiquery", None):
                values["multiquery"] = report.multiquery
            values.update((extra or {}).get(method, {}))
            rows[method] = values
        self.folder.record(round_, label, rows, series=series)

    @staticmethod
    def _method_settings(method: str, report, settings: dict[str, Any]) -> dict[str, Any]:
        """What `method` ran with (`evaluate`'s settings), how it was chosen, and its validation scores (x100)."""
        out = dict(report.settings.get(method, {}))
        if method == "prf" or method in settings["query_weight"]:
            out["chosen_on"] = settings["chosen_on"]
            if settings.get("validation_ndcg@10", {}).get(method):
                out["validation_queries"] = settings["validation_queries"]
                out["validation_ndcg@10"] = settings["validation_ndcg@10"][method]
        return out

    @staticmethod
    def _report_file(path: Path, settings: dict[str, Any], report, **extra: Any) -> None:
        atomic_write_json(path, {"settings": settings, "report": report.to_dict(), "per_query": report.per_query,
                                 **extra})

    # -- baselines -------------------------------------------------------------------------------------------
    def _zero_shot(self) -> None:
        """BM25, the base encoder without expansion, with PRF, and with the untrained LLM's q2d and grounded
        expansions and Haystack's multi-query expansion (settings chosen on validation with these models); each
        expansion method tested against dense and PRF (paired randomization test on per-query nDCG@10)."""
        from expandr_haystack.evaluation.runner import EXPANSION_METHODS

        c = self.config
        store = self._store(c.encoder)
        methods = self._baseline_methods
        settings = self._settings(c.encoder, 0, methods, store)
        report = self._evaluate(c.encoder, methods, 0, store, settings)
        tests = {m: [report.compare(m, b) for b in ("dense", "prf") if b in methods]
                 for m in methods if m in EXPANSION_METHODS}
        self._record(0, ZERO_SHOT, report, settings, extra={m: {"comparisons": t} for m, t in tests.items() if t})
        self._report_file(self.output / "baseline" / "zero-shot.json", settings, report)
        self.folder.finish("baselines.zero-shot", settings=settings)

    def _supervised_eval(self) -> None:
        """The supervised encoder without expansion; its per-query nDCG@10 is what each round's ExpandR is tested
        against."""
        encoder = str(self.output / "baseline" / "encoder")
        settings = self._settings(encoder, None, [])
        report = self._evaluate(encoder, ["dense"], None, self._store(encoder), settings)
        self._record(0, SUPERVISED, report, settings)
        self._report_file(self.output / "baseline" / "supervised.json", settings, report)
        self.folder.finish("baselines.eval")

    def _supervised_per_query(self) -> dict[str, float] | None:
        """Per-query nDCG@10 of the supervised baseline (None when it was not run, or by an older version)."""
        path = self.output / "baseline" / "supervised.json"
        if not path.exists():
            return None
        return json.loads(path.read_text())["per_query"]["dense"]

    # -- round step 5 ------------------------------------------------------------------------------------------
    def _eval_round(self, r: int) -> None:
        """5. encoder_r without expansion, with PRF and with LLM_r's expansions (then LLM_{r-1}'s), each with the
        settings chosen on validation for these models; ExpandR tested against the supervised baseline and PRF."""
        from expandr_haystack.evaluation.runner import EXPANSION_METHODS

        encoder = self._encoder(r)
        store = self._store(encoder)
        methods = self._methods
        settings = self._settings(encoder, r, methods, store)
        report = self._evaluate(encoder, methods, r, store, settings)
        comparisons = self._comparisons(r, report)
        dpo = {k: v for k, v in self.folder.state["done"].get(f"round{r}.dpo", {}).items() if k != "at"}
        expand_methods = [m for m in methods if m in EXPANSION_METHODS]
        extra = {m: {"dpo": dpo} for m in expand_methods}
        extra[self._mode_method]["comparisons"] = comparisons
        self.folder.record(r, f"round {r}: encoder_{r} + LLM_{r - 1}", {}, series="LLM_r-1")  # drop a stale row
        self._record(r, f"round {r}: encoder_{r} + LLM_{r}", report, settings, series="LLM_r", extra=extra)
        previous = {}
        if expand_methods and self._adapter(r) != self._adapter(r - 1):
            before_settings = self._settings(encoder, r - 1, expand_methods, store)
            before = self._evaluate(encoder, expand_methods, r - 1, store, before_settings)
            self._record(r, f"round {r}: encoder_{r} + LLM_{r - 1}", before, before_settings, series="LLM_r-1")
            previous = {"previous_llm": {"settings": before_settings, "report": before.to_dict(),
                                         "per_query": before.per_query}}
        self._report_file(self._round_dir(r) / "eval.json", settings, report, **previous)
        self._plot()
        self.folder.finish(f"round{r}.eval", settings=settings, comparisons=comparisons)

    def _comparisons(self, r: int, report) -> list[dict[str, Any]]:
        """Paired randomization tests (nDCG@10 per query, seed-averaged) of ExpandR (encoder_r + LLM_r) against the
        supervised no-expansion retriever and against PRF on encoder_r."""
        method = self._mode_method
        label = f"ExpandR ({method}): encoder_{r} + LLM_{r}"
        out = []
        supervised = self._supervised_per_query()
        if supervised is not None:
            report.per_query[SUPERVISED] = supervised
            out.append(report.compare(method, SUPERVISED, label=label))
        else:
            logger.warning("Round %d: no supervised baseline in %s; ExpandR is compared with PRF only.", r,
                           self.output)
        if "prf" in report.per_query:
            row = report.compare(method, "prf", label=label)
            row["baseline"] = f"PRF on encoder_{r}"
            out.append(row)
        return out

    # -- reporting ---------------------------------------------------------------------------------------------
    def summary(self) -> str:
        """
        A table of nDCG@10 (mean ± sd over the expansion seeds) and Recall@100 by round, setting and method, with
        each method's fusion setting; then each round's paired tests and DPO figures.
        """
        from expandr_haystack.evaluation.multiquery import stats_line

        lines = [f"{'round':<6}{'setting':<36}{'method':<20}{'nDCG@10':>9}{'± sd':>7}{'R@100':>8}  setting"]
        notes = []
        for m in self.metrics:
            sd = m.get("ndcg@10_sd")
            sd_text = f"{100 * sd:>7.2f}" if sd is not None and m.get("seeds") else f"{'':>7}"
            lines.append(f"{m['round']:<6}{m['label'][:35]:<36}{m['method']:<20}{100 * m['ndcg@10']:>9.2f}{sd_text}"
                         f"{100 * m['recall@100']:>8.2f}  {_setting_text(m.get('settings') or {})}")
            for c in m.get("comparisons") or []:
                notes.append(f"round {m['round']}: {c['method']} vs {c['baseline']}: {c['delta_ndcg@10']:+.2f} "
                             f"nDCG@10, paired randomization p = {c['p_randomization']:.4f}")
            if m.get("multiquery"):
                notes.append(f"round {m['round']}: {stats_line(m['multiquery'])}")
            dpo = m.get("dpo") or {}
            if m["method"] == self._mode_method and m.get("series") == "LLM_r" and "rewards/margins" in dpo:
                notes.append(f"round {m['round']}: DPO on {dpo.get('pairs')} pairs, final rewards/margins "
                             f"{dpo['rewards/margins']:.4f}, rewards/accuracies {dpo.get('rewards/accuracies', 0):.2f}")
        seeds = self.config.seeds
        where = (f"chosen on {len(self.validation_data.queries)} validation queries" if self.validation_data is not None
                 else "from the config (no validation split)")
        lines.append(f"(x100; expansion methods averaged over {len(seeds)} seed(s) {seeds}; w and PRF's (k, f) "
                     f"{where})")
        return "\n".join(lines + notes)

    def _plot(self) -> None:
        """``metrics.png``: nDCG@10 by round (`expandr_haystack.evaluation.report.plot_rounds`)."""
        from expandr_haystack.evaluation.report import plot_rounds

        if self.metrics:
            plot_rounds(self.metrics, self.output / "metrics.png", self.config.eval_split,
                        title=f"ExpandR joint training on {Path(self.config.data).name} "
                              f"({self.config.expansion.mode})")  # a data path: its folder's name

    def _write_model_cards(self, r: int, query_weight: float) -> None:
        """Our section in the model cards of round r's encoder and adapter (`cards.model_card_text`), merged into
        the ``README.md`` sentence-transformers and PEFT wrote there."""
        from expandr_haystack.training.cards import model_card_text, write_model_card

        rows = [m for m in self.metrics if m.get("round") == r]
        rdir = self._round_dir(r)
        for kind, folder, step in (("encoder", rdir / "encoder", f"round{r}.retriever"),
                                   ("adapter", rdir / "adapter", f"round{r}.dpo")):
            if kind == "adapter" and not is_adapter_dir(folder):  # no pair kept: LLM_r is LLM_{r-1}
                continue
            if folder.is_dir():
                info = {k: v for k, v in self.folder.state["done"].get(step, {}).items() if k != "at"}
                write_model_card(folder, model_card_text(kind, r, self.config, rows, query_weight=query_weight,
                                                         info=info))


def _setting_text(settings: dict[str, Any]) -> str:
    """A method's fusion setting in a few characters: ``w=0.7 (validation)``, ``k=5 f=0.8 (config)``, ``rrf``."""
    where = f" ({settings['chosen_on']})" if "chosen_on" in settings else ""
    if settings.get("feedback_k"):
        return f"k={settings['feedback_k']} f={settings.get('feedback_weight', 0):g}{where}"
    if settings.get("fusion") == "rrf":
        return "rrf"
    if "chosen_on" in settings and "query_weight" in settings:
        return f"w={settings['query_weight']:g}{where}"
    return ""


__all__ = ["BASELINE_METHODS", "DEFAULT_FEEDBACK", "ROUND_METHODS", "SUPERVISED", "ZERO_SHOT", "RoundEvaluation"]
