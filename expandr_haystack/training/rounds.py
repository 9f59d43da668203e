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

Every step writes its outputs atomically and is recorded in ``state.json``; ``resume=True`` skips finished steps.
Expansions and answers live in one sqlite cache, pair building is itself resumable, so a killed run never
regenerates text it already has.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from expandr_haystack.data import Collection, load_collection
from expandr_haystack.training.config import JointConfig
from expandr_haystack.training.retriever import is_main_process

logger = logging.getLogger(__name__)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file in the same folder, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunFolderError(ValueError):
    """The output folder holds a run that cannot be resumed with this config."""


class JointTrainer:
    """
    Runs the rounds of a `JointConfig` into an output folder.

    Usage:
    ```python
    from expandr_haystack.training import JointConfig, JointTrainer
    config = JointConfig.from_yaml("training/configs/tiny-cpu.yaml")
    JointTrainer(config, "runs/tiny-cpu").run(resume=True)
    ```

    Output folder: ``config.json``, ``state.json``, ``metrics.json`` (one row per round and method),
    ``metrics.png``, ``cache.sqlite`` (all generated text), ``baseline/encoder``, ``round_<r>/{expansions.json,
    encoder/, pairs.jsonl, adapter/, pipeline.yaml}``.
    """

    def __init__(self, config: JointConfig, output: str | Path, progress_bar: bool = True):
        self.config = config
        self.output = Path(output)
        self.progress_bar = progress_bar
        self.state_path = self.output / "state.json"
        self.metrics_path = self.output / "metrics.json"
        self.cache_path = str(self.output / "cache.sqlite")
        self._train: Collection | None = None
        self._eval: Collection | None = None
        self.state: dict[str, Any] = {"done": {}}
        self.metrics: list[dict[str, Any]] = []
        self._stores: dict[str, Any] = {}

    # -- bookkeeping ---------------------------------------------------------------------------------------
    def _load_state(self, resume: bool) -> None:
        self.output.mkdir(parents=True, exist_ok=True)
        if self.state_path.exists() and not resume:
            raise FileExistsError(f"--output {self.output} already holds a run (state.json); pass --resume to "
                                  f"continue it, or choose another folder. Nothing was changed.")
        if resume and self.state_path.exists():
            self.state = json.loads(self.state_path.read_text())
            old = self.state.get("config", {})
            new = self.config.to_dict()
            changed = sorted(k for k in new if k != "rounds" and old.get(k) != json.loads(json.dumps(new[k],
                                                                                                    default=str)))
            if changed:
                raise RunFolderError(f"--resume: the config differs from the run in {self.output} in {changed}; "
                                 f"only `rounds` may change on resume.")
            if self.metrics_path.exists():
                self.metrics = json.loads(self.metrics_path.read_text())
        self.state["config"] = json.loads(json.dumps(self.config.to_dict(), default=str))
        write_json_atomic(self.output / "config.json", self.state["config"])
        write_json_atomic(self.state_path, self.state)

    def _done(self, step: str) -> bool:
        return step in self.state["done"]

    def _main_only(self, step: str, work) -> None:
        """
        A generation/evaluation step: it runs on the main process only. Under `accelerate launch` / `torchrun` the
        other ranks poll `state.json` until the step is recorded (no collective call, so no NCCL timeout while
        rank 0 generates for hours). Training steps run on every rank (the trainers are distributed).
        """
        if self._done(step):
            return
        if is_main_process():
            work()
        else:
            self._wait_for(step)

    def _wait_for(self, step: str, poll_seconds: float = 10.0) -> None:
        while True:
            if self.state_path.exists():
                try:
                    state = json.loads(self.state_path.read_text())
                except json.JSONDecodeError:  # pragma: no cover - written atomically; a reader never sees half
                    state = {"done": {}}
                if step in state.get("done", {}):
                    self.state = state
                    if self.metrics_path.exists():
                        self.metrics = json.loads(self.metrics_path.read_text())
                    return
            time.sleep(poll_seconds)

    def _finish(self, step: str, **info: Any) -> None:
        self.state["done"][step] = {"at": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
        if is_main_process():
            write_json_atomic(self.state_path, self.state)
        logger.info("finished %s", step)

    def _record(self, round_: int, label: str, result: dict[str, dict[str, float]], series: str | None = None) -> None:
        self.metrics = [m for m in self.metrics if not (m["round"] == round_ and m["label"] == label)]
        for method, values in result.items():
            self.metrics.append({"round": round_, "label": label, "series": series, "method": method, **values})
        write_json_atomic(self.metrics_path, self.metrics)

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
            if (self._round_dir(k) / "adapter" / "adapter_config.json").exists():
                return str(self._round_dir(k) / "adapter")
        return None

    def _encoder(self, r: int) -> str | None:
        return self.config.encoder if r == 0 else str(self._round_dir(r) / "encoder")

    def _expander(self, r: int, **overrides: Any):
        from expandr_haystack.components.expander import LLMQueryExpander

        e = self.config.expansion
        kwargs = {"model": self.config.llm, "adapter": self._adapter(r), "n_expansions": e.n_expansions,
                      "temperature": e.temperature, "top_p": e.top_p, "max_new_tokens": e.max_new_tokens,
                      "batch_size": e.batch_size, "seed": self.config.seed, "cache": self.cache_path, "device": self._device(),
                      "progress_bar": self.progress_bar, "backend": self.config.llm_backend}
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
        from expandr_haystack.indexing import build_document_store

        key = str(encoder)
        if key not in self._stores:
            self._stores = {k: v for k, v in self._stores.items() if k in (str(self.config.encoder),)}
            self._stores[key] = build_document_store(self.train_data.documents(), model=encoder,
                                                     device=self._device(), progress_bar=self.progress_bar)
        return self._stores[key]

    # -- the run ---------------------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> list[dict[str, Any]]:
        """Run (or continue) every round; returns the metrics rows."""
        self._load_state(resume)
        if self.config.baselines:
            self._main_only("baselines.zero-shot", self._zero_shot)
            self._train_step("baselines.supervised", self._supervised_baseline)
            self._main_only("baselines.eval", self._supervised_eval)
        for r in range(1, self.config.rounds + 1):
            (self._round_dir(r)).mkdir(parents=True, exist_ok=True)
            self._main_only(f"round{r}.expand", lambda r=r: self._expand(r))
            self._train_step(f"round{r}.retriever", lambda r=r: self._train_retriever(r))
            self._main_only(f"round{r}.pairs", lambda r=r: self._pairs(r))
            self._train_step(f"round{r}.dpo", lambda r=r: self._dpo(r))
            self._main_only(f"round{r}.eval", lambda r=r: self._eval_round(r))
            self._main_only(f"round{r}.save", lambda r=r: self._save(r))
        if is_main_process():
            self._plot()
            print(self.summary())
        return self.metrics

    def _train_step(self, step: str, work) -> None:
        """A training step: every process trains (distributed trainers); the main one saves and records it."""
        if self._done(step):
            return
        from expandr_haystack.models import release_models

        release_models()  # the inference copies of the LLM / encoders are not needed while training
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:  # leftovers of a run killed inside a trainer
            for stale in [*self.output.glob("round_*/.dpo-*"), *self.output.glob("*/.train-*")]:
                shutil.rmtree(stale, ignore_errors=True)
        info = work() or {}
        if is_main_process():
            self._finish(step, **info)

    def _evaluate(self, encoder: str | None, methods, llm_round: int | None, store=None):
        from expandr_haystack.evaluation import evaluate

        expander = self._expander(llm_round) if llm_round is not None else None
        return evaluate(self.eval_data, methods=methods, encoder=encoder, expander=expander,
                        n_expansions=self.config.expansion.n_expansions,
                        progress_bar=self.progress_bar, store=store, device=self._device())

    @property
    def _methods(self) -> list[str]:
        return [m for m in self.config.eval_methods if m != "bm25"] or ["dense"]

    # -- baselines -------------------------------------------------------------------------------------------
    def _zero_shot(self) -> None:
        c = self.config
        methods = list(c.eval_methods)  # bm25 is encoder-independent: reported once, here
        self._record(0, "zero-shot (untrained LLM)", self._evaluate(c.encoder, methods, 0, self._store(c.encoder))
                     .metrics)
        self._finish("baselines.zero-shot")

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
        self._record(0, "supervised, no expansion", {"dense": result.metrics["dense"]})
        self._finish("baselines.eval")

    # -- round steps -------------------------------------------------------------------------------------------
    def _expand(self, r: int) -> None:
        """1. Expand the training queries with LLM_{r-1}."""
        train_ids = list(self.train_data.queries)
        expansions = self._expander(r - 1).expand([self.train_data.queries[q] for q in train_ids])
        write_json_atomic(self._round_dir(r) / "expansions.json", dict(zip(train_ids, expansions)))
        self._finish(f"round{r}.expand")

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
        self._finish(f"round{r}.pairs", kept=stats.kept, seen=stats.queries_seen)

    def _dpo(self, r: int) -> dict[str, Any]:
        """4. LoRA DPO on the pairs -> LLM_r (continues LLM_{r-1}'s adapter)."""
        from expandr_haystack.training.dpo import train_dpo

        kept = self.state["done"][f"round{r}.pairs"].get("kept", 0)
        if kept == 0:
            logger.warning("Round %d: no DPO pair was kept; LLM_%d = LLM_%d.", r, r, r - 1)
            return {"pairs": 0}
        rdir = self._round_dir(r)
        work = Path(tempfile.mkdtemp(prefix=".dpo-", dir=rdir))
        try:
            adapter = train_dpo(self.config.llm, rdir / "pairs.jsonl", work, self.config.dpo,
                                adapter=self._adapter(r - 1))
            if is_main_process():
                _replace_dir(adapter, rdir / "adapter")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return {"pairs": kept}

    def _eval_round(self, r: int) -> None:
        """5. encoder_r with LLM_r's expansions, with LLM_{r-1}'s, and without expansion."""
        store = self._store(self._encoder(r))
        now = self._evaluate(self._encoder(r), self._methods, r, store)
        self._record(r, f"round {r}: encoder_{r} + LLM_{r}", now.metrics, series="LLM_r")
        expand_methods = [m for m in self._methods if m != "dense"]
        if expand_methods and self._adapter(r) != self._adapter(r - 1):
            before = self._evaluate(self._encoder(r), expand_methods, r - 1, store)
            self._record(r, f"round {r}: encoder_{r} + LLM_{r - 1}", before.metrics, series="LLM_r-1")
        self._plot()
        self._finish(f"round{r}.eval")

    def _save(self, r: int) -> None:
        """6. A ready YAML search pipeline for round r's models."""
        self._save_pipeline(r)
        self._finish(f"round{r}.save")

    def _save_pipeline(self, r: int) -> None:
        from haystack import Pipeline
        from haystack.document_stores.in_memory import InMemoryDocumentStore

        from expandr_haystack.components.retriever import ExpandRRetriever

        rdir = self._round_dir(r)
        adapter = str(Path(self._adapter(r)).resolve()) if self._adapter(r) else None
        p = Pipeline()
        p.add_component("expander", self._expander(r, adapter=adapter, cache=str(Path(self.cache_path).resolve()),
                                                   progress_bar=False, device=None))
        p.add_component("retriever", ExpandRRetriever(document_store=InMemoryDocumentStore(
            index=f"expandr-round-{r}", embedding_similarity_function="cosine"), model=str((rdir / "encoder").resolve()), top_k=10))
        p.connect("expander.query", "retriever.query")
        p.connect("expander.expansions", "retriever.expansions")
        tmp = rdir / ".pipeline.yaml.tmp"
        encoder = str((rdir / "encoder").resolve())
        tmp.write_text(f"# Search pipeline of round {r}: index documents with SentenceTransformersDocumentEmbedder("
                       f"model={encoder!r}), then run this.\n{p.dumps()}")
        os.replace(tmp, rdir / "pipeline.yaml")

    # -- reporting ---------------------------------------------------------------------------------------------
    def summary(self) -> str:
        """A table of nDCG@10 / Recall@100 by round and method."""
        lines = [f"{'round':<6}{'setting':<40}{'method':<12}{'nDCG@10':>9}{'R@100':>9}"]
        for m in self.metrics:
            lines.append(f"{m['round']:<6}{m['label'][:39]:<40}{m['method']:<12}{100 * m['ndcg@10']:>9.2f}"
                         f"{100 * m['recall@100']:>9.2f}")
        return "\n".join(lines)

    def _plot(self) -> None:
        if not self.metrics:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.2))
        colors = iter(["0.45", "tab:purple", "tab:brown", "tab:olive"])
        for m in self.metrics:
            if m["round"] == 0:
                supervised = m["label"].startswith("supervised")
                ax.axhline(100 * m["ndcg@10"], linestyle="--" if supervised else ":",
                           color="black" if supervised else next(colors, "0.6"), label=f"{m['label']}: {m['method']}")
        series: dict[str, list[tuple[int, float]]] = {}
        for m in self.metrics:
            if m["round"] > 0:
                name = "encoder_r, no expansion" if m["method"] == "dense" else f"encoder_r + {m['series']} ({m['method']})"
                if m["method"] == "dense" and m["series"] != "LLM_r":
                    continue
                series.setdefault(name, []).append((m["round"], 100 * m["ndcg@10"]))
        for name, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xlabel("round")
        ax.set_ylabel(f"nDCG@10 x100 ({self.config.eval_split})")
        ax.set_title(f"ExpandR joint training on {self.config.data}")
        ax.set_xticks(sorted({m["round"] for m in self.metrics if m["round"] > 0}) or [1])
        ax.legend(fontsize=7)
        fig.tight_layout()
        tmp = self.output / ".metrics.png.tmp.png"
        fig.savefig(tmp, dpi=120)
        plt.close(fig)
        os.replace(tmp, self.output / "metrics.png")


def _replace_dir(source: Path, target: Path) -> None:
    """Put `source` at `target` atomically (stage next to the target, then rename)."""
    staging = target.with_name(f".{target.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.move(str(source), str(staging))
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
