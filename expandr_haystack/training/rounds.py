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
from expandr_haystack.training.config import ConfigError, JointConfig
from expandr_haystack.training.runfiles import RunFolder, RunFolderError, is_main_process, replace_dir

logger = logging.getLogger(__name__)

#: Labels of the round-0 rows in ``metrics.json``.
ZERO_SHOT = "zero-shot (untrained LLM)"
SUPERVISED = "supervised, no expansion"
#: What every round-0 report evaluates with the base encoder and the untrained LLM (plus `eval_methods`).
BASELINE_METHODS = ("bm25", "dense", "prf", "expand", "grounded")
#: What every round evaluates with its encoder (plus the ExpandR method of `expansion.mode`, and `eval_methods`).
ROUND_METHODS = ("dense", "prf")
#: Rocchio settings of `prf` when there is no validation split (`evaluation.runner.evaluate`'s defaults).
DEFAULT_FEEDBACK = {"feedback_k": 3, "feedback_weight": 0.7}


#: The init parameters that hold model, adapter or cache paths, rewritten relative to the run folder in a round's
#: ``pipeline.yaml`` (at any depth: nested query embedders and retrievers too).
PATH_KEYS = ("model", "adapter", "cache")
#: The pipeline ``metadata`` key of a round's ``pipeline.yaml``: the folder its ``./`` paths are relative to, itself
#: relative to the YAML file's folder (".." = the run folder, the parent of ``round_<r>/``).
PATHS_BASE_KEY = "expandr_paths_relative_to"


def _is_relative_marker(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(("./", "../"))


def _rewrite_paths(node: Any, rewrite) -> Any:
    """A copy of `node` (a pipeline dict) with `rewrite(value)` applied to the string values of `PATH_KEYS`."""
    if isinstance(node, dict):
        return {k: (rewrite(v) if k in PATH_KEYS and isinstance(v, str) else _rewrite_paths(v, rewrite))
                for k, v in node.items()}
    if isinstance(node, list):
        return [_rewrite_paths(v, rewrite) for v in node]
    return node


def relative_pipeline_paths(data: dict[str, Any], base: str | Path) -> dict[str, Any]:
    """
    `data` (a `Pipeline.to_dict()`) with every model/adapter/cache path inside `base` written as ``./<path relative
    to base>`` (POSIX separators); other values (hub ids, paths outside `base`, None) unchanged. The ``./`` prefix
    keeps them local paths for the components (``round_1/encoder`` alone would read as a Hugging Face id).
    """
    base = Path(base).resolve()

    def rewrite(value: str) -> str:
        path = Path(value).expanduser()
        if not path.is_absolute():
            return value
        try:
            return "./" + path.resolve().relative_to(base).as_posix()
        except ValueError:  # outside the run folder (the base LLM, say): kept as it is
            return value

    return _rewrite_paths(data, rewrite)


def resolve_pipeline_paths(data: dict[str, Any], base: str | Path) -> dict[str, Any]:
    """The inverse of `relative_pipeline_paths`: every ``./`` or ``../`` model/adapter/cache path made absolute
    against `base`."""
    base = Path(base).expanduser().resolve()
    return _rewrite_paths(data, lambda v: str((base / v).resolve()) if _is_relative_marker(v) else v)


def load_round_pipeline(path: str | Path, base: str | Path | None = None):
    """
    Load a round's ``pipeline.yaml`` from wherever its run folder now lives (moved or copied folders included).

    The YAML names the round's encoder, adapter and the run's expansion cache by paths relative to the run folder
    (``./round_1/encoder``); its ``metadata`` says where that folder is from the YAML's own folder (``..``). This
    reads the file, makes those paths absolute against that folder (or `base`) and builds the pipeline, so it loads
    from any working directory. (Plain ``Pipeline.loads(text)`` works too when run from inside the run folder.)
    A YAML written before these relative paths existed (absolute paths) loads unchanged.

    Usage:
    ```python
    from expandr_haystack.training import load_round_pipeline

    pipeline = load_round_pipeline("runs/tiny-cpu/round_2/pipeline.yaml")
    encoder = pipeline.get_component("retriever").model    # index documents with this encoder
    ```

    :param path: The ``pipeline.yaml`` file.
    :param base: The folder the ``./`` paths are relative to (default: from the YAML's metadata, else the YAML's
        folder).
    :returns: A `haystack.Pipeline`.
    """
    from haystack import Pipeline
    from haystack.marshal import YamlMarshaller

    import expandr_haystack  # noqa: F401 - registers the package with Haystack's deserialization allow-list

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"`path`: no pipeline YAML at {str(path)!r}.")
    data = YamlMarshaller().unmarshal(path.read_text())
    if base is None:
        relative = (data.get("metadata") or {}).get(PATHS_BASE_KEY, ".")
        base = path.parent / relative
    return Pipeline.from_dict(resolve_pipeline_paths(data, base))


def round_pipeline_yaml(round_: int, expander, encoder: str | Path, query_weight: float = 0.5,
                        top_k: int = 10, base: str | Path | None = None) -> str:
    """
    The YAML of a ready search pipeline for one round's models: `expander` -> `ExpandRRetriever(encoder)` over an
    in-memory store (index the documents with `SentenceTransformersDocumentEmbedder(model=encoder)`, as the header
    comment says). A grounded `expander` (`GROUNDED_PROMPT`) gets a first pass: `ExpandRRetriever(encoder,
    top_k=expander.passages_k)` over the same store, its documents wired to the expander.

    Usage:
    ```python
    text = round_pipeline_yaml(1, LLMQueryExpander(adapter="runs/x/round_1/adapter"), "runs/x/round_1/encoder",
                               base="runs/x")    # paths relative to runs/x: ./round_1/encoder, ./round_1/adapter
    Pipeline.loads(text)                         # from inside runs/x; anywhere: load_round_pipeline(<file>)
    ```

    :param round_: The round (names the store's index and the header comment).
    :param expander: An `LLMQueryExpander` (serialised with its settings: model, adapter, cache, ...).
    :param encoder: The round's encoder folder.
    :param query_weight: w of the fused query vector (the round's, chosen on validation).
    :param top_k: Documents the retriever returns.
    :param base: The run folder: model, adapter and cache paths inside it are written as ``./<relative path>``
        (`relative_pipeline_paths`), and the pipeline's metadata records it as ``..`` (the YAML goes to
        ``<base>/round_<r>/pipeline.yaml``; `load_round_pipeline` reads it). None = absolute paths.
    :returns: A comment header (how to load, index and run it), then the pipeline's YAML.
    """
    from haystack import Pipeline
    from haystack.document_stores.in_memory import InMemoryDocumentStore
    from haystack.marshal import YamlMarshaller

    from expandr_haystack.components.retriever import ExpandRRetriever

    encoder = str(Path(encoder).resolve())
    p = Pipeline(metadata={PATHS_BASE_KEY: ".."} if base is not None else None)
    store = InMemoryDocumentStore(index=f"expandr-round-{round_}", embedding_similarity_function="cosine")

    inputs = '{"expander": {"query": q}}'
    if expander.grounded:
        p.add_component("first_pass", ExpandRRetriever(document_store=store, model=encoder,
                                                       top_k=expander.passages_k))
        inputs = '{"first_pass": {"query": q}, "expander": {"query": q}}'
    p.add_component("expander", expander)
    p.add_component("retriever", ExpandRRetriever(document_store=store, model=encoder, top_k=top_k,
                                                  query_weight=query_weight))
    if expander.grounded:
        p.connect("first_pass.documents", "expander.documents")
    p.connect("expander.query", "retriever.query")
    p.connect("expander.expansions", "retriever.expansions")
    if base is None:
        return (f"# Search pipeline of round {round_}: index documents with SentenceTransformersDocumentEmbedder("
                f"model={encoder!r}), then run this with inputs {inputs}.\n{p.dumps()}")
    data = relative_pipeline_paths(p.to_dict(), base)
    shown = relative_pipeline_paths({"model": encoder}, base)["model"]
    return (f"# Search pipeline of round {round_}: paths are relative to the run folder; load it with\n"
            f"# expandr_haystack.training.load_round_pipeline(<this file>) from anywhere (or Pipeline.loads from inside "
            f"the run folder),\n# index documents with SentenceTransformersDocumentEmbedder(model=<the run folder>/"
            f"{shown[2:]}), then run it with inputs {inputs}.\n"
            f"{YamlMarshaller().marshal(data)}")


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

    Output folder: ``config.json``, ``state.json``, ``metrics.json`` (one row per round, setting and method: the
    metrics' mean over `eval_seeds`, ``<metric>_sd``, ``per_seed``, ``seeds``, the fusion ``settings`` it ran with
    and, for ExpandR, ``comparisons`` and ``dpo``), ``metrics.png``, ``cache.sqlite`` (all generated text),
    ``baseline/{encoder/, zero-shot.json, supervised.json}``, ``round_<r>/{expansions.json, encoder/, pairs.jsonl,
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
        self.progress_bar = progress_bar
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
        c = self.config
        if c.validation_size is None:
            self._train = load_collection(c.data, c.train_split, c.max_train_queries)
            self._validation = None
        else:  # the validation split comes from the whole train split; max_train_queries limits the rest
            try:
                rest, self._validation = load_collection(c.data, c.train_split).split_validation(c.validation_size,
                                                                                                 seed=c.seed)
            except ValueError as exc:
                raise ConfigError(f"`validation_queries`: {exc}") from None
            ids = list(rest.queries)[: c.max_train_queries] if c.max_train_queries else list(rest.queries)
            self._train = rest.subset(ids)
        self._eval = load_collection(c.data, c.eval_split, c.max_eval_queries)
        if c.max_corpus_documents is not None:  # judged documents of the chosen queries + the first N others
            splits = [s for s in (self._train, self._eval, self._validation) if s is not None]
            keep = {d for col in splits for j in col.qrels.values() for d in j}
            keep.update(list(self._train.corpus)[: c.max_corpus_documents])
            corpus = {d: v for d, v in self._train.corpus.items() if d in keep}
            for col in splits:
                col.corpus = corpus

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
        kwargs = {"model": self.config.llm, "adapter": self._adapter(r), "n_expansions": e.n_expansions,
                  "temperature": e.temperature, "top_p": e.top_p, "max_new_tokens": e.max_new_tokens,
                  "batch_size": e.batch_size, "seed": self.config.seed, "cache": self.cache_path,
                  "device": self._device(), "progress_bar": self.progress_bar, "backend": self.config.llm_backend,
                  "passages_k": e.passages_k, "passage_words": e.passage_words}
        kwargs.update(overrides)
        return LLMQueryExpander(**kwargs)

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

    def _torch_device(self) -> str:
        from expandr_haystack.models import resolve_device

        return resolve_device(self._device())

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
        retriever = ExpandRRetriever(self._store(encoder), model=encoder, top_k=k, device=self._device(),
                                     progress_bar=False)
        return retriever.retrieve(queries, None, top_k=k)

    # -- the run ---------------------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> list[dict[str, Any]]:
        """Run (or continue) every round; returns the metrics rows."""
        self.folder.open(self.config.to_dict(), resume, defaults=JointConfig.defaults())
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
        release_models()  # the trainer's activations and optimizer state are garbage now: give the pages back
        if is_main_process():
            self.folder.finish(step, **info)

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
        without an LLM), ``queries``, the ``settings`` the method ran with (and how they were chosen), and `extra`.
        """
        from expandr_haystack.evaluation.metrics import METRICS
        from expandr_haystack.evaluation.runner import EXPANSION_METHODS

        rows = {}
        for method, row in report.rows.items():
            values: dict[str, Any] = {m: row[m] for m in METRICS}
            values["queries"] = len(self.eval_data.queries)
            values.update({f"{m}_sd": row[f"{m}_sd"] for m in METRICS})
            values["seeds"] = list(self.config.seeds) if method in EXPANSION_METHODS else []
            values["per_seed"] = row["per_seed"]
            values["settings"] = self._method_settings(method, report, settings)
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
        expansions (settings chosen on validation with these models)."""
        c = self.config
        store = self._store(c.encoder)
        methods = self._baseline_methods
        settings = self._settings(c.encoder, 0, methods, store)
        report = self._evaluate(c.encoder, methods, 0, store, settings)
        self._record(0, ZERO_SHOT, report, settings)
        self._report_file(self.output / "baseline" / "zero-shot.json", settings, report)
        self.folder.finish("baselines.zero-shot", settings=settings)

    def _supervised_baseline(self) -> dict[str, Any]:
        from expandr_haystack.training.retriever import mine_hard_negatives, train_encoder, training_examples

        c = self.config
        train_ids = list(self.train_data.queries)
        negatives = mine_hard_negatives(self.train_data, train_ids, None, self._store(c.encoder), c.encoder,
                                        c.retriever, self._device())
        # the same queries, positives, loss, temperature, budget and seed as round 1's encoder training
        rows = training_examples(self.train_data, train_ids, None, negatives, c.retriever, c.seed + 1)
        train_encoder(c.encoder, rows, self.output / "baseline" / "encoder", c.retriever, fused=False, seed=c.seed + 1,
                      device=self._torch_device(), progress_bar=self.progress_bar,
                      **self._tracking(self.output / "baseline", "baseline-retriever"))
        return {"examples": len(rows)}

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
        """2. Mine hard negatives with the starting encoder, train on fused queries -> encoder_r."""
        from expandr_haystack.training.retriever import mine_hard_negatives, train_encoder, training_examples

        c = self.config
        start = c.encoder if c.retriever.restart_each_round else self._encoder(r - 1)
        train_ids = list(self.train_data.queries)
        by_id = json.loads((self._round_dir(r) / "expansions.json").read_text())
        expansions = [by_id[q] for q in train_ids]
        negatives = mine_hard_negatives(self.train_data, train_ids, expansions, self._store(start), start,
                                        c.retriever, self._device())
        rows = training_examples(self.train_data, train_ids, expansions, negatives, c.retriever, c.seed + r,
                                 n_expansions=c.expansion.n_expansions)
        train_encoder(start, rows, self._round_dir(r) / "encoder", c.retriever, fused=True, seed=c.seed + r,
                      device=self._torch_device(), progress_bar=self.progress_bar,
                      **self._tracking(self._round_dir(r), f"round{r}-retriever"))
        return {"examples": len(rows)}

    def _pairs(self, r: int) -> None:
        """3. DPO pairs: candidates and answers from LLM_{r-1}, rewards from encoder_r (grounded: the candidates
        read encoder_r's first-pass hits)."""
        from expandr_haystack.core.text import EXPANSION_PROMPT, GROUNDED_PROMPT
        from expandr_haystack.training.pairs import build_pairs, make_components

        c = self.config
        expander, answerer, scorer = make_components(c.pairs, llm=c.llm, adapter=self._adapter(r - 1),
                                                     encoder=self._encoder(r), cache=self.cache_path,
                                                     device=self._device(), progress_bar=self.progress_bar,
                                                     backend=c.llm_backend,
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
        from expandr_haystack.training.dpo import LOG_HISTORY, final_dpo_metrics, train_dpo

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
                replace_dir(adapter, rdir / "adapter")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return info

    def _tracking(self, folder: Path, step: str) -> dict[str, Any]:
        """A trainer's `logging_dir` (TensorBoard event files: ``<folder>/logs/<retriever|dpo>``) and `run_name`
        (``<run folder name>-<step>``) for the trackers of `report_to`."""
        return {"logging_dir": folder / "logs" / step.rsplit("-", 1)[-1], "run_name": f"{self.output.name}-{step}"}

    def _dpo_settings(self):
        """`dpo` settings with the run's top-level `device` where `dpo.device` is unset, so DPO trains where every
        other step runs (`device: cpu` on a GPU machine stays on the CPU; `cuda:1` is GPU 1)."""
        import dataclasses

        dpo = self.config.dpo
        return dpo if dpo.device is not None else dataclasses.replace(dpo, device=self.config.device)

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

    def _save(self, r: int) -> None:
        """6. A ready YAML search pipeline for round r's models (paths relative to the run folder), with the w chosen
        for ExpandR in round r; our section in the model cards of the round's encoder and adapter."""
        info = self.folder.state["done"].get(f"round{r}.eval", {})
        weights = info.get("settings", {}).get("query_weight", {})
        w = weights.get(self._mode_method, self.config.retriever.query_weight)
        adapter = str(Path(self._adapter(r)).resolve()) if self._adapter(r) else None
        expander = self._mode_expander(r, model=_absolute_if_local(self.config.llm), adapter=adapter,
                                       cache=str(Path(self.cache_path).resolve()), progress_bar=False, device=None)
        rdir = self._round_dir(r)
        # paths inside the run folder are written relative to it (a moved or copied run folder still loads)
        atomic_write_text(rdir / "pipeline.yaml", round_pipeline_yaml(r, expander, rdir / "encoder", w,
                                                                      base=self.output))
        self._write_model_cards(r, w)
        self.folder.finish(f"round{r}.save", query_weight=w)

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

    # -- reporting ---------------------------------------------------------------------------------------------
    def summary(self) -> str:
        """
        A table of nDCG@10 (mean ± sd over the expansion seeds) and Recall@100 by round, setting and method, with
        each method's fusion setting; then each round's paired tests and DPO figures.
        """
        lines = [f"{'round':<6}{'setting':<36}{'method':<11}{'nDCG@10':>9}{'± sd':>7}{'R@100':>8}  setting"]
        notes = []
        for m in self.metrics:
            sd = m.get("ndcg@10_sd")
            sd_text = f"{100 * sd:>7.2f}" if sd is not None and m.get("seeds") else f"{'':>7}"
            lines.append(f"{m['round']:<6}{m['label'][:35]:<36}{m['method']:<11}{100 * m['ndcg@10']:>9.2f}{sd_text}"
                         f"{100 * m['recall@100']:>8.2f}  {_setting_text(m.get('settings') or {})}")
            for c in m.get("comparisons") or []:
                notes.append(f"round {m['round']}: {c['method']} vs {c['baseline']}: {c['delta_ndcg@10']:+.2f} "
                             f"nDCG@10, paired randomization p = {c['p_randomization']:.4f}")
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


def _absolute_if_local(model: str | None) -> str | None:
    """An existing local model path made absolute (a relative one would only load from today's working directory);
    hub ids, bundled names and None unchanged."""
    from expandr_haystack.checks import looks_like_local_path

    if model is not None and looks_like_local_path(model) and Path(model).expanduser().exists():
        return str(Path(model).expanduser().resolve())
    return model


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


__all__ = ["BASELINE_METHODS", "PATHS_BASE_KEY", "PATH_KEYS", "ROUND_METHODS", "SUPERVISED", "ZERO_SHOT",
           "JointTrainer", "RunFolderError", "load_round_pipeline", "relative_pipeline_paths", "resolve_pipeline_paths",
           "round_pipeline_yaml"]
