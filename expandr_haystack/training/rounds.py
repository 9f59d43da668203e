"""
ExpandR joint training: K alternating rounds of retriever training and LLM DPO, with per-round evaluation.

Round r (LLM_{r-1} = base LLM + adapter of round r-1; encoder_{r-1} likewise):
  1. expand     train queries with LLM_{r-1}                                   (LLMQueryExpander, cached)
  2. retriever  mine hard negatives, train the encoder on fused queries         (FusedInfoNCELoss)  -> encoder_r
  3. pairs      candidates + answers from LLM_{r-1}, rewards from encoder_r     (RewardScorer)      -> pairs.jsonl
  4. dpo        LoRA DPO on the pairs                                           (trl.DPOTrainer)    -> LLM_r
  5. eval       encoder_r with LLM_r expansions (and with LLM_{r-1}'s, and no expansion) on the eval split
  6. save       a ready YAML search pipeline pointing at encoder_r and LLM_r
Before round 1 ("baselines"): zero-shot dense, zero-shot with the untrained LLM's expansions, and the supervised
baseline (same examples and budget, no expansion).

Every step writes its outputs atomically and is recorded in ``state.json`` (`runfiles.RunFolder`); ``resume=True``
skips finished steps. Expansions and answers live in one sqlite cache, pair building is itself resumable, so a killed
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
from expandr_haystack.evaluation.data import Collection, load_collection
from expandr_haystack.files import atomic_write_json, atomic_write_text
from expandr_haystack.training.config import JointConfig
from expandr_haystack.training.runfiles import RunFolder, RunFolderError, is_main_process, replace_dir

logger = logging.getLogger(__name__)


def round_pipeline_yaml(round_: int, expander, encoder: str | Path, query_weight: float = 0.5,
                        top_k: int = 10) -> str:
    """
    The YAML of a ready search pipeline for one round's models: `expander` -> `ExpandRRetriever(encoder)` over an
    in-memory store (index the documents with `SentenceTransformersDocumentEmbedder(model=encoder)`, as the header
    comment says).

    Usage:
    ```python
    text = round_pipeline_yaml(1, LLMQueryExpander(adapter="runs/x/round_1/adapter"), "runs/x/round_1/encoder")
    Pipeline.loads(text)
    ```

    :param round_: The round (names the store's index and the header comment).
    :param expander: An `LLMQueryExpander` (serialised with its settings: model, adapter, cache, ...).
    :param encoder: The round's encoder folder (written as an absolute path).
    :param query_weight: w of the fused query vector.
    :param top_k: Documents the retriever returns.
    :returns: A comment line, then `Pipeline.dumps()`.
    """
    from haystack import Pipeline
    from haystack.document_stores.in_memory import InMemoryDocumentStore

    from expandr_haystack.components.retriever import ExpandRRetriever

    encoder = str(Path(encoder).resolve())
    p = Pipeline()
    p.add_component("expander", expander)
    store = InMemoryDocumentStore(index=f"expandr-round-{round_}", embedding_similarity_function="cosine")
    p.add_component("retriever", ExpandRRetriever(document_store=store, model=encoder, top_k=top_k,
                                                  query_weight=query_weight))
    p.connect("expander.query", "retriever.query")
    p.connect("expander.expansions", "retriever.expansions")
    return (f"# Search pipeline of round {round_}: index documents with SentenceTransformersDocumentEmbedder("
            f"model={encoder!r}), then run this.\n{p.dumps()}")


class JointTrainer:
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

    Output folder: ``config.json``, ``state.json``, ``metrics.json`` (one row per round and method),
    ``metrics.png``, ``cache.sqlite`` (all generated text), ``baseline/encoder``, ``round_<r>/{expansions.json,
    encoder/, pairs.jsonl, adapter/, pipeline.yaml}``.
    """

    def __init__(self, config: JointConfig, output: str | Path, progress_bar: bool = True):
        self.config = config
        self.output = Path(output)
        self.progress_bar = progress_bar
        self.folder = RunFolder(self.output)
        self.cache_path = str(self.output / "cache.sqlite")
        self._train: Collection | None = None
        self._eval: Collection | None = None
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
        c = self.config
        self._train = load_collection(c.data, c.train_split, c.max_train_queries)
        self._eval = load_collection(c.data, c.eval_split, c.max_eval_queries)
        if c.max_corpus_documents is not None:  # judged documents of the chosen queries + the first N others
            keep = {d for col in (self._train, self._eval) for j in col.qrels.values() for d in j}
            keep.update(list(self._train.corpus)[: c.max_corpus_documents])
            corpus = {d: v for d, v in self._train.corpus.items() if d in keep}
            self._train.corpus = self._eval.corpus = corpus

    @property
    def train_data(self) -> Collection:
        if self._train is None:
            self._load_data()
        return self._train

    @property
    def eval_data(self) -> Collection:
        if self._eval is None:
            self._load_data()
        return self._eval

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
        from expandr_haystack.components.expander import LLMQueryExpander

        e = self.config.expansion
        kwargs = {"model": self.config.llm, "adapter": self._adapter(r), "n_expansions": e.n_expansions,
                  "temperature": e.temperature, "top_p": e.top_p, "max_new_tokens": e.max_new_tokens,
                  "batch_size": e.batch_size, "seed": self.config.seed, "cache": self.cache_path,
                  "device": self._device(), "progress_bar": self.progress_bar, "backend": self.config.llm_backend}
        kwargs.update(overrides)
        return LLMQueryExpander(**kwargs)

    def _device(self):
        from haystack.utils import ComponentDevice

        return ComponentDevice.from_str(self.config.device) if self.config.device else None

    def _torch_device(self) -> str:
        from expandr_haystack.models import resolve_device

        return resolve_device(self._device())

    def _store(self, encoder: str | None):
        """The corpus (shared by the train and eval splits) embedded with `encoder`; built once per encoder."""
        from expandr_haystack.evaluation.indexing import build_document_store

        key = str(encoder)
        if key not in self._stores:
            self._stores = {k: v for k, v in self._stores.items() if k in (str(self.config.encoder),)}
            self._stores[key] = build_document_store(self.train_data.documents(), model=encoder,
                                                     device=self._device(), progress_bar=self.progress_bar)
        return self._stores[key]

    # -- the run ---------------------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> list[dict[str, Any]]:
        """Run (or continue) every round; returns the metrics rows."""
        self.folder.open(self.config.to_dict(), resume)
        main_only = self.folder.run_on_main  # generation/evaluation: rank 0 works, the other ranks wait
        if self.config.baselines:
            main_only("baselines.zero-shot", self._zero_shot)
            self._train_step("baselines.supervised", self._supervised_baseline)
            main_only("baselines.eval", self._supervised_eval)
        for r in range(1, self.config.rounds + 1):
            (self._round_dir(r)).mkdir(parents=True, exist_ok=True)
            main_only(f"round{r}.expand", lambda r=r: self._expand(r))
            self._train_step(f"round{r}.retriever", lambda r=r: self._train_retriever(r))
            main_only(f"round{r}.pairs", lambda r=r: self._pairs(r))
            self._train_step(f"round{r}.dpo", lambda r=r: self._dpo(r))
            main_only(f"round{r}.eval", lambda r=r: self._eval_round(r))
            main_only(f"round{r}.save", lambda r=r: self._save(r))
        if is_main_process():
            self._plot()
            print(self.summary())
        return self.metrics

    def _train_step(self, step: str, work) -> None:
        """A training step: every process trains (distributed trainers); the main one saves and records it."""
        if self.folder.is_done(step):
            return
        from expandr_haystack.models import release_models

        release_models()  # the inference copies of the LLM / encoders are not needed while training
        self.folder.remove_stale_work()  # leftovers of a run killed inside a trainer
        info = work() or {}
        if is_main_process():
            self.folder.finish(step, **info)

    def _evaluate(self, encoder: str | None, methods, llm_round: int | None, store=None):
        from expandr_haystack.evaluation.runner import evaluate

        expander = self._expander(llm_round) if llm_round is not None else None
        return evaluate(self.eval_data, methods=methods, encoder=encoder, expander=expander,
                        query_weight=self.config.retriever.query_weight, store=store, device=self._device(),
                        progress_bar=self.progress_bar)

    @property
    def _methods(self) -> list[str]:
        return [m for m in self.config.eval_methods if m != "bm25"] or ["dense"]

    # -- baselines -------------------------------------------------------------------------------------------
    def _zero_shot(self) -> None:
        c = self.config
        methods = list(c.eval_methods)  # bm25 is encoder-independent: reported once, here
        self.folder.record(0, "zero-shot (untrained LLM)", self._evaluate(c.encoder, methods, 0, self._store(c.encoder))
                     .metrics)
        self.folder.finish("baselines.zero-shot")

    def _supervised_baseline(self) -> dict[str, Any]:
        from expandr_haystack.training.retriever import mine_hard_negatives, train_encoder, training_examples

        c = self.config
        train_ids = list(self.train_data.queries)
        negatives = mine_hard_negatives(self.train_data, train_ids, None, self._store(c.encoder), c.encoder,
                                        c.retriever, self._device())
        # the same queries, positives, loss, temperature, budget and seed as round 1's encoder training
        rows = training_examples(self.train_data, train_ids, None, negatives, c.retriever, c.seed + 1)
        train_encoder(c.encoder, rows, self.output / "baseline" / "encoder", c.retriever, fused=False, seed=c.seed + 1,
                      device=self._torch_device(), progress_bar=self.progress_bar)
        return {"examples": len(rows)}

    def _supervised_eval(self) -> None:
        encoder = str(self.output / "baseline" / "encoder")
        result = self._evaluate(encoder, ["dense"], None, self._store(encoder))
        self.folder.record(0, "supervised, no expansion", {"dense": result.metrics["dense"]})
        self.folder.finish("baselines.eval")

    # -- round steps -------------------------------------------------------------------------------------------
    def _expand(self, r: int) -> None:
        """1. Expand the training queries with LLM_{r-1}."""
        train_ids = list(self.train_data.queries)
        expansions = self._expander(r - 1).expand([self.train_data.queries[q] for q in train_ids])
        atomic_write_json(self._round_dir(r) / "expansions.json", dict(zip(train_ids, expansions)))
        self.folder.finish(f"round{r}.expand")

    def _train_retriever(self, r: int) -> dict[str, Any]:
        """2. Mine hard negatives with the starting encoder, train on fused queries -> encoder_r."""
        from expandr_haystack.training.retriever import mine_hard_negatives, train_encoder, training_examples

        c = self.config
        start = c.encoder if c.retriever.restart_each_round else self._encoder(r - 1)
        train_ids = list(self.train_data.queries)
        by_id = json.loads((self._round_dir(r) / "expansions.json").read_text())
        expansions = [by_id[q] for q in train_ids]
        negatives = mine_hard_negatives(self.train_data, train_ids, expansions, self._store(start), start,
                                        c.retriever, self._device())
        rows = training_examples(self.train_data, train_ids, expansions, negatives, c.retriever, c.seed + r)
        train_encoder(start, rows, self._round_dir(r) / "encoder", c.retriever, fused=True, seed=c.seed + r,
                      device=self._torch_device(), progress_bar=self.progress_bar)
        return {"examples": len(rows)}

    def _pairs(self, r: int) -> None:
        """3. DPO pairs: candidates and answers from LLM_{r-1}, rewards from encoder_r."""
        from expandr_haystack.training.pairs import build_pairs, make_components

        c = self.config
        expander, answerer, scorer = make_components(c.pairs, llm=c.llm, adapter=self._adapter(r - 1),
                                                     encoder=self._encoder(r), cache=self.cache_path,
                                                     device=self._device(), progress_bar=self.progress_bar,
                                                     backend=c.llm_backend)
        stats = build_pairs(self.train_data, self._round_dir(r) / "pairs.jsonl", expander, answerer, scorer, c.pairs,
                            query_ids=list(self.train_data.queries), progress_bar=self.progress_bar)
        self.folder.finish(f"round{r}.pairs", kept=stats.kept, seen=stats.queries_seen)

    def _dpo(self, r: int) -> dict[str, Any]:
        """4. LoRA DPO on the pairs -> LLM_r (continues LLM_{r-1}'s adapter)."""
        from expandr_haystack.training.dpo import train_dpo

        kept = self.folder.step_info(f"round{r}.pairs").get("kept", 0)
        if kept == 0:
            logger.warning("Round %d: no DPO pair was kept; LLM_%d = LLM_%d.", r, r, r - 1)
            return {"pairs": 0}
        rdir = self._round_dir(r)
        work = Path(tempfile.mkdtemp(prefix=".dpo-", dir=rdir))
        try:
            adapter = train_dpo(self.config.llm, rdir / "pairs.jsonl", work, self.config.dpo,
                                adapter=self._adapter(r - 1))
            if is_main_process():
                replace_dir(adapter, rdir / "adapter")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return {"pairs": kept}

    def _eval_round(self, r: int) -> None:
        """5. encoder_r with LLM_r's expansions, with LLM_{r-1}'s, and without expansion."""
        store = self._store(self._encoder(r))
        now = self._evaluate(self._encoder(r), self._methods, r, store)
        self.folder.record(r, f"round {r}: encoder_{r} + LLM_{r}", now.metrics, series="LLM_r")
        expand_methods = [m for m in self._methods if m != "dense"]
        if expand_methods and self._adapter(r) != self._adapter(r - 1):
            before = self._evaluate(self._encoder(r), expand_methods, r - 1, store)
            self.folder.record(r, f"round {r}: encoder_{r} + LLM_{r - 1}", before.metrics, series="LLM_r-1")
        self._plot()
        self.folder.finish(f"round{r}.eval")

    def _save(self, r: int) -> None:
        """6. A ready YAML search pipeline for round r's models."""
        adapter = str(Path(self._adapter(r)).resolve()) if self._adapter(r) else None
        expander = self._expander(r, adapter=adapter, cache=str(Path(self.cache_path).resolve()), progress_bar=False,
                                  device=None)
        rdir = self._round_dir(r)
        atomic_write_text(rdir / "pipeline.yaml", round_pipeline_yaml(r, expander, rdir / "encoder",
                                                                      self.config.retriever.query_weight))
        self.folder.finish(f"round{r}.save")

    # -- reporting ---------------------------------------------------------------------------------------------
    def summary(self) -> str:
        """A table of nDCG@10 / Recall@100 by round and method."""
        lines = [f"{'round':<6}{'setting':<40}{'method':<12}{'nDCG@10':>9}{'R@100':>9}"]
        for m in self.metrics:
            lines.append(f"{m['round']:<6}{m['label'][:39]:<40}{m['method']:<12}{100 * m['ndcg@10']:>9.2f}"
                         f"{100 * m['recall@100']:>9.2f}")
        return "\n".join(lines)

    def _plot(self) -> None:
        """``metrics.png``: nDCG@10 by round (`expandr_haystack.evaluation.report.plot_rounds`)."""
        from expandr_haystack.evaluation.report import plot_rounds

        if self.metrics:
            plot_rounds(self.metrics, self.output / "metrics.png", self.config.eval_split,
                        title=f"ExpandR joint training on {self.config.data}")


__all__ = ["JointTrainer", "RunFolderError", "round_pipeline_yaml"]
