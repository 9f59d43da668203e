"""
ExpandR joint training: K alternating rounds of retriever training and LLM DPO, with per-round evaluation.

Round r (LLM_{r-1} = base LLM + adapter of round r-1; encoder_{r-1} likewise):
  1. expand     train queries with LLM_{r-1}, `expansion.n_expansions` each     (LLMQueryExpander, cached)
  2. retriever  mine hard negatives, train the encoder on fused queries         (FusedInfoNCELoss)  -> encoder_r
  3. pairs      candidates + answers from LLM_{r-1}, rewards from encoder_r     (RewardScorer)      -> pairs.jsonl
  4. dpo        LoRA DPO on the pairs                                           (trl.DPOTrainer)    -> LLM_r
  5. eval       encoder_r with LLM_r: no expansion, PRF and ExpandR (and ExpandR with LLM_{r-1}) on the eval split
  6. save       a ready YAML search pipeline pointing at encoder_r and LLM_r (paths relative to the run folder:
                 `load_round_pipeline`), with the round's chosen w; model cards (`cards`) for encoder_r and LLM_r
Before round 1 ("baselines"): BM25, zero-shot dense, PRF on the zero-shot encoder, the untrained LLM's q2d and grounded
expansions, and the supervised baseline (same examples and budget, no expansion).

The evaluation protocol (`expandr_haystack.evaluation.protocol`): every evaluation first chooses its fusion settings
(w of each expansion method, PRF's k and f) by nDCG@10 on a validation split carved out of the training queries
(`validation_queries`; those queries never train the retriever or build pairs), with that evaluation's encoder and
LLM; then each expansion method runs once per seed of `eval_seeds` (mean, sd and per-seed values in
``metrics.json``), and each round tests ExpandR against the supervised no-expansion retriever and against PRF on the
same encoder (paired randomization test on per-query nDCG@10).

`expansion.mode` picks the prompt of steps 1, 3 and 5: "q2d" (the paper's) or "grounded" (`GROUNDED_PROMPT`, which
also shows the LLM the top `expansion.passages_k` hits of a first dense pass: in step 1 by encoder_{r-1}, in steps 3
and 5 by encoder_r), so DPO teaches the LLM what to take from the passages.

This module runs the rounds and their steps; the evaluations (the baselines, step 5, ``metrics.json``, the report
and the model cards' metrics) live in `round_eval`, the pipeline that step 6 saves in `round_pipeline`.

Every step writes its outputs atomically and is recorded in ``state.json`` (`runfiles.RunFolder`); ``resume=True``
skips finished steps. Under `torchrun` / `accelerate launch` (`distributed`) rank 0 opens the run folder and runs
every step but the two training ones (expansion, mining the training rows into ``examples.json``, pairs, evaluation,
saving) while the other ranks wait; every rank then trains on the same rows (the trainers split each batch over the
ranks), the ranks' weights are compared, and rank 0 writes the model. Expansions and answers live in one sqlite
cache, pair building is itself resumable, so a killed
run never regenerates text it already has.

Usage:
```python
from expandr_haystack.training.config import JointConfig
from expandr_haystack.training.rounds import JointTrainer

config = JointConfig.from_yaml("training/configs/tiny-cpu.yaml")
rows = JointTrainer(config, "runs/tiny-cpu").run(resume=True)   # the rows of metrics.json
```
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from expandr_haystack.checks import is_adapter_dir
from expandr_haystack.evaluation.data import Collection
from expandr_haystack.files import atomic_write_json, atomic_write_text
from expandr_haystack.training.config import JointConfig
from expandr_haystack.training.round_eval import RoundEvaluation
from expandr_haystack.training.round_pipeline import absolute_if_local, round_pipeline_yaml
from expandr_haystack.training.runfiles import RunFolder, RunFolderError, is_main_process, replace_dir
from expandr_haystack.training.splits import run_collections

logger = logging.getLogger(__name__)

#: The rows a retriever step trains on (written once by rank 0, read by every rank): ``<round or baseline>/...``.
EXAMPLES = "examples.json"


class JointTrainer(RoundEvaluation):
    """
    Runs the rounds of a `JointConfig` into an output folder.

    Usage:
    ```python
    from expandr_haystack.training import JointConfig, JointTrainer
    config = JointConfig.from_yaml("training/configs/tiny-cpu.yaml")
    JointTrainer(config, "runs/tiny-cpu").run(resume=True)
    ```

    :param config: The run's settings (validated).
    :param output: The run folder (`runfiles.RunFolder` keeps its bookkeeping files).
    :param progress_bar: Show progress bars.

    Output folder: ``config.json``, ``state.json``, ``metrics.json`` (one row per round, setting and method: the
    metrics' mean over `eval_seeds`, ``<metric>_sd``, ``per_seed``, ``seeds``, the fusion ``settings`` it ran with
    and, for ExpandR, ``comparisons`` and ``dpo``), ``metrics.png``, ``cache.sqlite`` (all generated text),
    ``baseline/{examples.json, encoder/, zero-shot.json, supervised.json}``, ``round_<r>/{expansions.json,
    examples.json (the encoder's training rows), encoder/, pairs.jsonl,
    adapter/, dpo_log.json, eval.json, pipeline.yaml}`` (the ``.json`` evaluation files hold the settings, the seed
    report and per-query nDCG@10; ``encoder/README.md`` and ``adapter/README.md`` are the model cards of
    sentence-transformers and PEFT with a section of ours, `cards.model_card_text`), and ``logs/{retriever,dpo}``
    in a round or baseline folder when `report_to` includes TensorBoard. ``pipeline.yaml`` names the encoder,
    adapter and cache relative to the run folder (``./round_1/encoder``): load it with `load_round_pipeline` from
    anywhere, so a moved or copied run folder still loads.
    """

    def __init__(self, config: JointConfig, output: str | Path, progress_bar: bool = True):
        self.config = config
        self.output = Path(output)
        self.progress_bar = progress_bar and is_main_process()  # one rank's bars and step logs, not N copies
        if not is_main_process():
            logging.getLogger("expandr_haystack").setLevel(logging.WARNING)
        self.folder = RunFolder(self.output)
        self.cache_path = str(self.output / "cache.sqlite")
        self._train: Collection | None = None
        self._eval: Collection | None = None
        self._validation: Collection | None = None
        self._stores: dict[str, Any] = {}

    @property
    def state(self) -> dict[str, Any]:
        """``state.json``: the config and the finished steps."""
        return self.folder.state

    @property
    def metrics(self) -> list[dict[str, Any]]:
        """The rows of ``metrics.json`` so far."""
        return self.folder.metrics

    # -- data ----------------------------------------------------------------------------------------------
    def _load_data(self) -> None:
        self._train, self._validation, self._eval = run_collections(self.config)

    @property
    def train_data(self) -> Collection:
        """The training queries (the train split less the validation queries)."""
        if self._train is None:
            self._load_data()
        return self._train

    @property
    def eval_data(self) -> Collection:
        if self._eval is None:
            self._load_data()
        return self._eval

    @property
    def validation_data(self) -> Collection | None:
        """The validation queries carved out of the train split (None without `validation_queries`)."""
        if self._train is None:
            self._load_data()
        return self._validation

    def _round_dir(self, r: int) -> Path:
        return self.output / f"round_{r}"

    def _adapter(self, r: int) -> str | None:
        """LLM_r's adapter: round r's, or the latest earlier one when round r kept no pair (None = the base LLM)."""
        for k in range(r, 0, -1):
            if is_adapter_dir(self._round_dir(k) / "adapter"):
                return str(self._round_dir(k) / "adapter")
        return None

    def _encoder(self, r: int) -> str | None:
        return self.config.encoder if r == 0 else str(self._round_dir(r) / "encoder")

    def _expander(self, r: int, **overrides: Any):
        """LLM_r as the q2d expander of the config (`expansion` settings; its grounded twin: `_grounded`)."""
        from expandr_haystack.components.expander import LLMQueryExpander

        e = self.config.expansion
        expander = LLMQueryExpander(model=self.config.llm, adapter=self._adapter(r), n_expansions=e.n_expansions,
                                    generation=e.generation(self.config.seed, self.progress_bar),
                                    sampler=self.config.sampler(self._device()), cache=self.cache_path,
                                    passages_k=e.passages_k, passage_words=e.passage_words)
        return expander.with_settings(**overrides) if overrides else expander

    @staticmethod
    def _grounded(expander):
        """`expander` with `GROUNDED_PROMPT` (same model, samples, passages_k, cache; it shares the loaded engine)."""
        from expandr_haystack.evaluation.runner import grounded_like

        return grounded_like(expander)

    def _mode_expander(self, r: int, **overrides: Any):
        """LLM_r with the prompt of `expansion.mode` (q2d or grounded)."""
        expander = self._expander(r, **overrides)
        return self._grounded(expander) if self._is_grounded else expander

    @property
    def _is_grounded(self) -> bool:
        return self.config.expansion.mode == "grounded"

    @property
    def _mode_method(self) -> str:
        """The evaluation method of ExpandR in this run: "expand" (q2d) or "grounded"."""
        return self.config.expansion.method

    def _device(self):
        from haystack.utils import ComponentDevice

        return ComponentDevice.from_str(self.config.device) if self.config.device else None

    def _store(self, encoder: str | None):
        """The corpus (shared by the train, validation and eval splits) embedded with `encoder`; built once per
        encoder (the base encoder's and the latest other one are kept)."""
        from expandr_haystack.evaluation.indexing import build_document_store

        key = str(encoder)
        if key not in self._stores:
            self._stores = {k: v for k, v in self._stores.items() if k in (str(self.config.encoder),)}
            self._stores[key] = build_document_store(self.train_data.documents(), model=encoder,
                                                     device=self._device(), progress_bar=self.progress_bar)
        return self._stores[key]

    def _first_pass(self, encoder: str | None, queries: list[str]):
        """The top `expansion.passages_k` hits of each query by `encoder` (the passages of a grounded prompt)."""
        from expandr_haystack.components.retriever import ExpandRRetriever

        k = self.config.expansion.passages_k
        retriever = ExpandRRetriever(self._store(encoder), model=encoder, top_k=k, device=self._device())
        return retriever.retrieve(queries, None, top_k=k)

    # -- the run ---------------------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> list[dict[str, Any]]:
        """Run (or continue) every round; returns the metrics rows."""
        self.folder.open(self.config.to_dict(), resume, defaults=JointConfig.defaults(),
                         renamed=JointConfig.RENAMED)
        main_only = self.folder.run_on_main  # generation/evaluation: rank 0 works, the other ranks wait
        if self.config.baselines:
            main_only("baselines.zero-shot", self._zero_shot)
            self._examples_step("baselines.supervised", "baselines.examples", None)
            self._train_step("baselines.supervised", self._supervised_baseline)
            main_only("baselines.eval", self._supervised_eval)
        for r in range(1, self.config.rounds + 1):
            (self._round_dir(r)).mkdir(parents=True, exist_ok=True)
            main_only(f"round{r}.expand", lambda r=r: self._expand(r))
            self._examples_step(f"round{r}.retriever", f"round{r}.examples", r)
            self._train_step(f"round{r}.retriever", lambda r=r: self._train_retriever(r))
            main_only(f"round{r}.pairs", lambda r=r: self._pairs(r))
            self._train_step(f"round{r}.dpo", lambda r=r: self._dpo(r))
            main_only(f"round{r}.eval", lambda r=r: self._eval_round(r))
            main_only(f"round{r}.save", lambda r=r: self._save(r))
        if is_main_process():
            self._plot()
            print(self.summary())
        return self.metrics

    def _examples_step(self, train_step: str, step: str, r: int | None) -> None:
        """The rows of `train_step`, written once by rank 0 before it (a run folder whose `train_step` finished
        before this step existed needs none)."""
        if not self.folder.is_done(train_step):
            self._retriever_folder(r).mkdir(parents=True, exist_ok=True)
            self.folder.run_on_main(step, lambda: self._write_examples(step, r))

    def _train_step(self, step: str, work) -> None:
        """A training step: every process trains (distributed trainers); the main one saves and records it."""
        if self.folder.is_done(step):
            return
        from expandr_haystack.models import release_models

        release_models()  # the inference copies of the LLM / encoders are not needed while training
        self.folder.remove_stale_work()  # leftovers of a run killed inside a trainer
        info = work() or {}
        release_models()  # the trainer's activations and optimizer state are garbage now: give the pages back
        if is_main_process():
            self.folder.finish(step, **info)

    # -- baselines (their evaluation: `round_eval.RoundEvaluation`) --------------------------------------------
    def _supervised_baseline(self) -> dict[str, Any]:
        """No expansion: round 1's queries, positives, loss, temperature, budget and seed, on the query alone."""
        return self._train_on_examples(None, step="baseline-retriever")

    # -- round steps -------------------------------------------------------------------------------------------
    def _expand(self, r: int) -> None:
        """1. Expand the training queries with LLM_{r-1} (grounded: on the first pass of encoder_{r-1})."""
        train_ids = list(self.train_data.queries)
        queries = [self.train_data.queries[q] for q in train_ids]
        passages = self._first_pass(self._encoder(r - 1), queries) if self._is_grounded else None
        expansions = self._mode_expander(r - 1).expand(queries, passages=passages)
        atomic_write_json(self._round_dir(r) / "expansions.json", dict(zip(train_ids, expansions)))
        self.folder.finish(f"round{r}.expand")

    def _train_retriever(self, r: int) -> dict[str, Any]:
        """2. Train the encoder on fused queries (the examples mined by `_write_examples`) -> encoder_r."""
        return self._train_on_examples(r, step=f"round{r}-retriever")

    def _retriever_folder(self, r: int | None) -> Path:
        return self.output / "baseline" if r is None else self._round_dir(r)

    def _start_encoder(self, r: int | None) -> str | None:
        """A retriever step's start and miner (r None = baseline): the base encoder, or round r-1's without restart."""
        c = self.config
        return c.encoder if r is None or c.retriever.restart_each_round else self._encoder(r - 1)

    def _step_seed(self, r: int | None) -> int:  # of a retriever step's rows and training; the baseline: round 1's
        return self.config.seed + (1 if r is None else r)

    def _write_examples(self, step: str, r: int | None) -> None:
        """The training rows of a retriever step, once (rank 0): hard negatives mined with the starting encoder,
        then (query, [expansions of round r], document, negatives) rows into ``<folder>/examples.json``, which
        every rank trains on. `r` None = the no-expansion baseline (base encoder, round 1's seed)."""
        from expandr_haystack.training.retriever import mine_hard_negatives, training_examples

        c = self.config
        start = self._start_encoder(r)
        train_ids = list(self.train_data.queries)
        expansions = None
        if r is not None:
            by_id = json.loads((self._round_dir(r) / "expansions.json").read_text())
            expansions = [by_id[q] for q in train_ids]
        negatives = mine_hard_negatives(self.train_data, train_ids, expansions, self._store(start), start,
                                        c.retriever, self._device())
        rows = training_examples(self.train_data, train_ids, expansions, negatives, c.retriever, self._step_seed(r),
                                 n_expansions=c.expansion.n_expansions)
        atomic_write_json(self._retriever_folder(r) / EXAMPLES, rows)
        self.folder.finish(step, examples=len(rows))

    def _train_on_examples(self, r: int | None, step: str) -> dict[str, Any]:
        """Every rank: train on ``examples.json`` (fused in a round, the query alone for the baseline) -> ``encoder``."""
        from expandr_haystack.training.retriever import train_encoder

        folder = self._retriever_folder(r)
        rows = json.loads((folder / EXAMPLES).read_text())
        return train_encoder(self._start_encoder(r), rows, folder / "encoder", self.config.retriever,
                             fused=r is not None, seed=self._step_seed(r), device=self.config.device,  # per rank there
                             progress_bar=self.progress_bar, **self._tracking(folder, step))

    def _pairs(self, r: int) -> None:
        """3. DPO pairs: candidates and answers from LLM_{r-1}, rewards from encoder_r (grounded: the candidates
        read encoder_r's first-pass hits)."""
        from expandr_haystack.core.text import EXPANSION_PROMPT, GROUNDED_PROMPT
        from expandr_haystack.training.pairs import build_pairs, make_components

        c = self.config
        expander, answerer, scorer = make_components(c.pairs, llm=c.llm, adapter=self._adapter(r - 1),
                                                     encoder=self._encoder(r), cache=self.cache_path,
                                                     sampler=c.sampler(self._device()), progress_bar=self.progress_bar,
                                                     prompt=GROUNDED_PROMPT if self._is_grounded else EXPANSION_PROMPT,
                                                     passages_k=c.expansion.passages_k,
                                                     passage_words=c.expansion.passage_words)
        train_ids = list(self.train_data.queries)
        passages = None
        if self._is_grounded:
            hits = self._first_pass(self._encoder(r), [self.train_data.queries[q] for q in train_ids])
            passages = dict(zip(train_ids, hits))
        stats = build_pairs(self.train_data, self._round_dir(r) / "pairs.jsonl", expander, answerer, scorer, c.pairs,
                            query_ids=train_ids, progress_bar=self.progress_bar, passages=passages)
        self.folder.finish(f"round{r}.pairs", kept=stats.kept, seen=stats.queries_seen)

    def _dpo(self, r: int) -> dict[str, Any]:
        """4. LoRA DPO on the pairs -> LLM_r (continues LLM_{r-1}'s adapter); the final `rewards/margins` and
        `rewards/accuracies` go into the step's info (and the round's ExpandR rows)."""
        from expandr_haystack.training.dpo import LOG_HISTORY, RANKS, final_dpo_metrics, train_dpo

        kept = self.folder.step_info(f"round{r}.pairs").get("kept", 0)
        if kept == 0:
            logger.warning("Round %d: no DPO pair was kept; LLM_%d = LLM_%d.", r, r, r - 1)
            return {"pairs": 0}
        rdir = self._round_dir(r)
        work = Path(tempfile.mkdtemp(prefix=".dpo-", dir=rdir))
        info: dict[str, Any] = {"pairs": kept}
        try:
            adapter = train_dpo(self.config.llm, rdir / "pairs.jsonl", work, self._dpo_settings(),
                                adapter=self._adapter(r - 1), progress_bar=self.progress_bar,
                                **self._tracking(rdir, f"round{r}-dpo"))
            if is_main_process():
                log = work / LOG_HISTORY
                if log.exists():
                    history = json.loads(log.read_text())
                    info.update(final_dpo_metrics(history))
                    atomic_write_json(rdir / "dpo_log.json", history)
                info.update(json.loads((work / RANKS).read_text()) if (work / RANKS).exists() else {})
                replace_dir(adapter, rdir / "adapter")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return info

    def _tracking(self, folder: Path, step: str) -> dict[str, Any]:
        """A trainer's `logging_dir` (``<folder>/logs/<retriever|dpo>``) and `run_name` (``<run>-<step>``)."""
        return {"logging_dir": folder / "logs" / step.rsplit("-", 1)[-1], "run_name": f"{self.output.name}-{step}"}

    def _dpo_settings(self):
        """`dpo` settings with the run's top-level `device` where `dpo.device` is unset, so DPO trains where every
        other step runs (`device: cpu` on a GPU machine stays on the CPU; `cuda:1` is GPU 1)."""
        import dataclasses

        dpo = self.config.dpo
        return dpo if dpo.device is not None else dataclasses.replace(dpo, device=self.config.device)

    def _save(self, r: int) -> None:
        """6. A ready YAML search pipeline for round r's models (paths relative to the run folder), with the w chosen
        for ExpandR in round r; our section in the model cards of the round's encoder and adapter."""
        info = self.folder.state["done"].get(f"round{r}.eval", {})
        weights = info.get("settings", {}).get("query_weight", {})
        w = weights.get(self._mode_method, self.config.retriever.query_weight)
        adapter = str(Path(self._adapter(r)).resolve()) if self._adapter(r) else None
        expander = self._mode_expander(r, model=absolute_if_local(self.config.llm), adapter=adapter,
                                       cache=str(Path(self.cache_path).resolve()), progress_bar=False, device=None)
        rdir = self._round_dir(r)
        # paths inside the run folder are written relative to it (a moved or copied run folder still loads)
        atomic_write_text(rdir / "pipeline.yaml", round_pipeline_yaml(r, expander, rdir / "encoder", w,
                                                                      base=self.output))
        self._write_model_cards(r, w)
        self.folder.finish(f"round{r}.save", query_weight=w)


__all__ = ["JointTrainer", "RunFolderError"]
