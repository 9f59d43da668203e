"""
Every training setting, validated before any model loads: `PairConfig` (DPO pair construction), `DPOSettings`
(one DPO + LoRA round), `RetrieverSettings`, `ExpansionSettings`, and `JointConfig` (a joint-training run, which
holds one of each).

Each dataclass has `validate()`, built on `expandr_haystack.checks`; a bad value is a `ConfigError` (a ValueError)
naming the key (``pairs.n_candidates`` inside a `JointConfig`) and what was expected. This module imports no
training code, so reading a config never loads a model or a trainer.

Usage:
```python
from expandr_haystack.training.config import ConfigError, JointConfig, PairConfig

config = JointConfig.from_yaml("training/configs/tiny-cpu.yaml", {"rounds": 1})
config.pairs.n_candidates                      # 4
PairConfig(n_candidates=1)                     # ConfigError: `n_candidates` must be an integer >= 2; got 1. ...
```
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from expandr_haystack.checks import check_choice, check_int, check_model_name, check_number


class ConfigError(ValueError):
    """A training configuration is invalid; the message names the key and what was expected."""


# -- one validation style -------------------------------------------------------------------------------------------
def _key(section: str, name: str) -> str:
    return f"{section}.{name}" if section else name


def _fail(key: str, expected: str, value: Any) -> None:
    """Raise the `ConfigError` of a rule `expandr_haystack.checks` has no helper for, in the same wording."""
    raise ConfigError(f"`{key}` must be {expected}; got {value!r}.")


def _checked(check, value: Any, key: str, *args: Any, hint: str = "", **kwargs: Any) -> Any:
    """``check(value, key, *args)`` (a `expandr_haystack.checks` helper); its error as a `ConfigError` + `hint`."""
    try:
        return check(value, key, *args, **kwargs)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise ConfigError(f"{exc} {hint}".strip()) from None


def _check_steps(value: Any, key: str) -> None:
    if value != -1 and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        _fail(key, "-1 (no limit) or an integer >= 1", value)


def _check_fraction(value: Any, key: str) -> None:  # [0, 1)
    _checked(check_number, value, key, 0.0, 1.0)
    if value >= 1:
        _fail(key, "a number in [0, 1)", value)


#: Experiment trackers transformers' Trainer reports to (`report_to`), besides "none" and "all", as of transformers
#: 5.2x; `report_to_trackers()` asks the installed transformers (its list differs between releases).
REPORT_TO = ("azure_ml", "clearml", "codecarbon", "comet_ml", "dagshub", "dvclive", "flyte", "kubeflow", "mlflow",
             "neptune", "swanlab", "tensorboard", "trackio", "wandb")


def report_to_trackers() -> tuple[str, ...]:
    """The trackers the installed transformers knows (`REPORT_TO` where transformers is not installed)."""
    try:
        from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK
    except ImportError:
        return REPORT_TO
    return tuple(sorted(INTEGRATION_TO_CALLBACK))


def _check_report_to(value: Any, key: str) -> None:
    """"none", "all", one tracker of `report_to_trackers()`, or a non-empty list of them (transformers' `report_to`)."""
    trackers = report_to_trackers()
    expected = f'"none", "all", one of {list(trackers)} or a list of them'
    if isinstance(value, str):
        if value not in ("none", "all") + trackers:
            _fail(key, expected, value)
    elif isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v in trackers for v in value):
        return
    else:
        _fail(key, expected, value)


#: The packages a tracker of `report_to` needs (any one of them), checked when a `JointConfig` is validated so that a
#: missing one is named before any model loads (transformers would only fail when the trainer is built).
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",),
                    "trackio": ("trackio",), "comet_ml": ("comet_ml",), "neptune": ("neptune",),
                    "clearml": ("clearml",), "swanlab": ("swanlab",), "dvclive": ("dvclive",),
                    "codecarbon": ("codecarbon",)}


def missing_tracker(value: str | list[str] | tuple[str, ...]) -> str | None:
    """The first tracker named by `report_to` whose package is not installed (None when all are, or for "none" and
    "all": transformers' "all" takes what is installed)."""
    import importlib.util

    for name in [value] if isinstance(value, str) else list(value):
        packages = TRACKER_PACKAGES.get(name, ())
        if packages and not any(importlib.util.find_spec(p) is not None for p in packages):
            return name
    return None


def report_to_value(value: str | list[str] | tuple[str, ...]) -> str | list[str]:
    """A validated `report_to` setting as transformers' `TrainingArguments(report_to=...)` takes it."""
    return value if isinstance(value, str) else list(value)


def checkpointing_kwarg(config_cls: type, enabled: bool) -> dict[str, bool]:
    """
    ``{name: enabled}`` for the activation-checkpointing switch of `config_cls` (a `TrainingArguments` dataclass such
    as `trl.DPOConfig`): ``activation_checkpointing`` where the class has that field (newer transformers 5.x, where
    ``gradient_checkpointing`` is a deprecated alias), else ``gradient_checkpointing`` (transformers 5.0-5.17).

    Usage:
    ```python
    from trl import DPOConfig
    DPOConfig(output_dir="out", **checkpointing_kwarg(DPOConfig, True))
    ```
    """
    names = {f.name for f in dataclasses.fields(config_cls)}
    for name in ("activation_checkpointing", "gradient_checkpointing"):
        if name in names:
            return {name: bool(enabled)}
    raise TypeError(f"{config_cls.__name__} has neither `activation_checkpointing` nor `gradient_checkpointing`: "
                    f"not a transformers TrainingArguments class?")


# -- pair construction ----------------------------------------------------------------------------------------------
@dataclass
class PairConfig:
    """
    Settings of pair construction (ExpandR paper defaults where it has them).

    :param n_candidates: Candidate expansions sampled per query.
    :param temperatures: Sample i uses temperatures[i % len(temperatures)].
    :param threshold: Minimum of max_e (cos_doc + cos_answer) (max_e cos_doc when `use_answer` is False).
    :param max_new_tokens: Length limit of a candidate expansion (the paper uses 512; 96 is CPU-friendly).
    :param answer_max_new_tokens: Length limit of the q2a answer.
    :param top_p: Nucleus mass for the candidates.
    :param chunk_size: Queries generated, scored and saved together (progress is saved after each chunk).
    :param batch_size: Rows the LLM generates at once.
    :param seed: Base seed of the candidates (each row's seed derives from it, the query and the sample index).
    :param use_answer: False = document-only reward (an ablation of the paper's reward); no answers are generated.
    """

    n_candidates: int = 8
    temperatures: tuple[float, ...] = (0.8, 0.9, 1.0, 1.1)
    threshold: float = 0.6
    max_new_tokens: int = 96
    answer_max_new_tokens: int = 96
    top_p: float = 0.9
    chunk_size: int = 16
    batch_size: int = 16
    seed: int = 42
    use_answer: bool = True

    def __post_init__(self):
        try:
            self.temperatures = tuple(float(t) for t in self.temperatures)
        except (TypeError, ValueError):
            pass  # `validate` names it
        self.validate()

    def validate(self, section: str = "") -> None:
        """
        Raise a `ConfigError` naming the first bad setting.

        :param section: Prefix of the keys in messages (``pairs`` inside a `JointConfig`).
        """
        for name in ("max_new_tokens", "answer_max_new_tokens", "chunk_size", "batch_size"):
            _checked(check_int, getattr(self, name), _key(section, name))
        _checked(check_int, self.n_candidates, _key(section, "n_candidates"), 2, hint="Two candidates form a pair.")
        key = _key(section, "temperatures")
        if not isinstance(self.temperatures, tuple) or not self.temperatures:
            _fail(key, "a non-empty list of numbers >= 0", self.temperatures)
        for i, t in enumerate(self.temperatures):
            _checked(check_number, t, f"{key}[{i}]", 0.0)
        _checked(check_number, self.threshold, _key(section, "threshold"))
        _checked(check_number, self.top_p, _key(section, "top_p"), 0.0, 1.0, low_open=True)
        _checked(check_int, self.seed, _key(section, "seed"), 0)
        if not isinstance(self.use_answer, bool):
            _fail(_key(section, "use_answer"), "true or false", self.use_answer)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (temperatures as a list), as in ``<pairs>.stats.json``."""
        d = asdict(self)
        d["temperatures"] = list(self.temperatures)
        return d


# -- DPO ------------------------------------------------------------------------------------------------------------
@dataclass
class DPOSettings:
    """
    DPO + LoRA settings (ExpandR paper defaults).

    :param device: "cpu", "cuda", "cuda:0", ... or None (CUDA when available). Inside a `JointConfig`, None = the
        config's top-level `device` (set this only to train DPO somewhere else than the other steps).
    :param bf16: bfloat16 mixed precision; None = on when training on a CUDA GPU that supports it.
    :param max_length: Tokens of prompt + completion (longer pairs are truncated at the end).
    :param max_steps: Stop after this many optimizer steps (-1 = run `num_train_epochs`).
    :param gradient_checkpointing: Activation checkpointing: saves memory, ~20% slower.
    :param warmup_steps: An integer (steps) or a float in [0, 1) (fraction of all steps).
    :param logging_steps: Log the trainer's metrics (loss, rewards/margins, ...) every this many steps (cut to the
        run's length, so a short run logs at least once).
    :param report_to: Where the trainer also reports them, as transformers' `report_to`: "none" (default; the log
        history is still saved), "tensorboard", "wandb", "all", ... or a list. TensorBoard event files go to
        ``round_<r>/logs/dpo`` of a joint-training run (`TENSORBOARD_LOGGING_DIR` overrides).
    """

    beta: float = 0.1
    learning_rate: float = 2e-5
    num_train_epochs: float = 2.0
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_length: int = 512
    max_steps: int = -1
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    seed: int = 42
    device: str | None = None
    bf16: bool | None = None
    gradient_checkpointing: bool = False
    logging_steps: int = 10
    warmup_steps: float = 0
    report_to: str | list[str] = "none"

    def validate(self, section: str = "") -> None:
        """
        Raise a `ConfigError` naming the first bad setting.

        :param section: Prefix of the keys in messages (``dpo`` inside a `JointConfig`).
        """
        for name in ("beta", "learning_rate", "num_train_epochs"):
            _checked(check_number, getattr(self, name), _key(section, name), 0.0, low_open=True)
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "lora_r",
                     "lora_alpha", "logging_steps"):
            _checked(check_int, getattr(self, name), _key(section, name))
        _check_steps(self.max_steps, _key(section, "max_steps"))
        _check_fraction(self.lora_dropout, _key(section, "lora_dropout"))
        _checked(check_number, self.warmup_steps, _key(section, "warmup_steps"), 0.0)
        if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            _fail(_key(section, "target_modules"), "a non-empty list of module names", self.target_modules)
        _checked(check_int, self.seed, _key(section, "seed"), 0)
        _check_report_to(self.report_to, _key(section, "report_to"))
        if self.device is not None and (not isinstance(self.device, str) or not self.device.strip()):
            _fail(_key(section, "device"), "a device name such as 'cpu' or 'cuda:0', or null", self.device)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d


# -- joint training -------------------------------------------------------------------------------------------------
@dataclass
class RetrieverSettings:
    """
    Encoder training on fused queries (FusedInfoNCELoss) through sentence-transformers' trainer.

    :param temperature: InfoNCE temperature tau (paper 0.02).
    :param hard_negatives: Negatives per example mined with the current encoder from ranks
        [`hard_negative_skip`, `hard_negative_depth`) of the fused query's ranking, judged documents excluded.
    :param query_weight: w of the fused query vector in training (the loss and hard-negative mining), and in
        evaluation when there is no validation split (`validation_queries`) to choose w on.
    :param restart_each_round: Train every round from the base encoder (so every round, and the no-expansion
        baseline, gets the same budget and a round's gain comes from its LLM); False continues from the previous
        round.
    :param max_steps: Stop after this many optimizer steps (-1 = run `epochs`).
    :param logging_steps: Log the trainer's loss every this many steps.
    :param report_to: Where the trainer reports, as transformers' `report_to`: "none" (default), "tensorboard",
        "wandb", "all", ... or a list. TensorBoard event files go to ``round_<r>/logs/retriever`` (and
        ``baseline/logs/retriever``) of a joint-training run (`TENSORBOARD_LOGGING_DIR` overrides).
    :param gradient_checkpointing: Activation checkpointing in the encoder: a batch of 16 rows with 4 expansions, a
        document and a negative keeps ~2 GB of activations at 256 tokens without it; ~25% slower.
    """

    learning_rate: float = 2e-5
    epochs: float = 1.0
    batch_size: int = 32
    temperature: float = 0.02
    max_length: int = 256
    hard_negatives: int = 1
    hard_negative_skip: int = 3
    hard_negative_depth: int = 30
    warmup_ratio: float = 0.1
    query_weight: float = 0.5
    max_positives_per_query: int = 4
    restart_each_round: bool = True
    bf16: bool = False
    max_steps: int = -1
    logging_steps: int = 10
    report_to: str | list[str] = "none"
    gradient_checkpointing: bool = False

    def validate(self, section: str = "retriever") -> None:
        """Raise a `ConfigError` naming the first bad setting (keys prefixed with `section`)."""
        for name in ("temperature", "learning_rate"):
            _checked(check_number, getattr(self, name), _key(section, name), 0.0, low_open=True)
        _check_steps(self.max_steps, _key(section, "max_steps"))
        _checked(check_number, self.epochs, _key(section, "epochs"), 0.0)
        if self.epochs == 0 and self.max_steps < 1:
            _fail(_key(section, "epochs"), "> 0 (or max_steps > 0)", self.epochs)
        _checked(check_int, self.batch_size, _key(section, "batch_size"), 2,
                 hint="A batch needs two rows for in-batch negatives.")
        for name in ("max_length", "max_positives_per_query", "hard_negative_depth", "logging_steps"):
            _checked(check_int, getattr(self, name), _key(section, name))
        _checked(check_int, self.hard_negatives, _key(section, "hard_negatives"), 0)
        _checked(check_int, self.hard_negative_skip, _key(section, "hard_negative_skip"), 0)
        if self.hard_negative_skip >= self.hard_negative_depth:
            _fail(_key(section, "hard_negative_skip"), f"in [0, hard_negative_depth) = [0, {self.hard_negative_depth})",
                  self.hard_negative_skip)
        _checked(check_number, self.query_weight, _key(section, "query_weight"), 0.0, 1.0)
        _check_fraction(self.warmup_ratio, _key(section, "warmup_ratio"))
        _check_report_to(self.report_to, _key(section, "report_to"))


#: Expansion modes of training: the paper's query-to-document prompt, or the grounded prompt that reads the top hits
#: of a first dense pass (`expandr_haystack.core.text.GROUNDED_PROMPT`).
EXPANSION_MODES = ("q2d", "grounded")
#: The evaluation method of each expansion mode (`expandr_haystack.evaluation.runner.METHODS`).
MODE_METHODS = {"q2d": "expand", "grounded": "grounded"}


@dataclass
class ExpansionSettings:
    """
    How queries are expanded for the retriever step and for evaluation (the DPO candidates use the same prompt).

    :param n_expansions: Expansions per query. The retriever is trained on w * q^ + (1 - w) * mean of the n
        expansion embeddings (`FusedInfoNCELoss`), and every evaluation averages n samples; the paper uses 1.
    :param temperature: Sampling temperature of these expansions (0 = greedy); the DPO candidates use
        `pairs.temperatures` instead.
    :param top_p: Nucleus mass.
    :param max_new_tokens: Length limit of an expansion.
    :param batch_size: Rows the LLM generates at once.
    :param mode: "q2d" (the paper's query-to-document prompt) or "grounded" (`GROUNDED_PROMPT`: the LLM also reads
        the top `passages_k` hits of a first dense pass, in training, in the DPO candidates and in evaluation).
    :param passages_k: First-pass hits shown to a grounded prompt.
    :param passage_words: Words kept of each of those hits.
    """

    n_expansions: int = 1
    temperature: float = 1.0
    top_p: float = 0.9
    max_new_tokens: int = 96
    batch_size: int = 16
    mode: str = "q2d"
    passages_k: int = 3
    passage_words: int = 50

    @property
    def method(self) -> str:
        """The evaluation method of this mode: "expand" (q2d) or "grounded"."""
        return MODE_METHODS[self.mode]

    def validate(self, section: str = "expansion") -> None:
        """Raise a `ConfigError` naming the first bad setting (keys prefixed with `section`)."""
        _checked(check_int, self.n_expansions, _key(section, "n_expansions"))
        _checked(check_number, self.temperature, _key(section, "temperature"), 0.0)
        _checked(check_number, self.top_p, _key(section, "top_p"), 0.0, 1.0, low_open=True)
        _checked(check_int, self.max_new_tokens, _key(section, "max_new_tokens"))
        _checked(check_int, self.batch_size, _key(section, "batch_size"))
        _checked(check_choice, self.mode, _key(section, "mode"), EXPANSION_MODES)
        _checked(check_int, self.passages_k, _key(section, "passages_k"))
        _checked(check_int, self.passage_words, _key(section, "passage_words"))


#: The sections of a `JointConfig` and their settings classes.
SECTIONS = {"expansion": ExpansionSettings, "retriever": RetrieverSettings, "pairs": PairConfig, "dpo": DPOSettings}


def _set_dotted(raw: dict[str, Any], key: str, value: Any, source: str) -> None:
    """Set `raw["a"]["b"] = value` for the override key "a.b" (a top-level key has no dot)."""
    *sections, leaf = key.split(".")
    node = raw
    for section in sections:
        child = node.setdefault(section, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: --set {key}: {section!r} is not a section of the config.")
        node = child
    node[leaf] = value


@dataclass
class JointConfig:
    """
    One joint-training run: data, models, rounds, and the settings of each step.

    `data` is a BEIR-layout folder, or `cranfield` for the bundled collection. Training reads only
    `train_split`; evaluation only `eval_split` (they must differ).

    :param validation_queries: Queries carved out of `train_split` (`Collection.split_validation` with `seed`) on
        which every evaluation chooses its fusion settings (w of the expansion methods, PRF's k and f); an integer
        (a number of queries) or a fraction in (0, 1). They are never used to train the retriever or for DPO pairs;
        `max_train_queries` then limits the remaining training queries. 0 or null = no validation split: the
        evaluations use `retriever.query_weight` and PRF's k = 3, f = 0.7.
    :param eval_seeds: Expansion seeds of every evaluation: each expansion method is evaluated once per seed and
        reported as mean, standard deviation and per-seed values; null = one evaluation with `seed`.
    :param eval_methods: Methods evaluated besides those every report has (round 0: bm25, dense, prf, expand and
        grounded; each round: dense, prf and the ExpandR method of `expansion.mode`), e.g. expand-rrf.
    """

    data: str = "cranfield"
    train_split: str = "train"
    eval_split: str = "test"
    max_train_queries: int | None = None
    max_eval_queries: int | None = None
    max_corpus_documents: int | None = None
    rounds: int = 2
    encoder: str | None = None
    llm: str | None = None
    llm_backend: str = "auto"
    device: str | None = None
    seed: int = 42
    eval_methods: tuple[str, ...] = ("dense", "expand")
    baselines: bool = True
    validation_queries: int | float | None = None
    eval_seeds: list[int] | None = None
    expansion: ExpansionSettings = field(default_factory=ExpansionSettings)
    retriever: RetrieverSettings = field(default_factory=RetrieverSettings)
    pairs: PairConfig = field(default_factory=PairConfig)
    dpo: DPOSettings = field(default_factory=DPOSettings)

    # -- loading -------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> JointConfig:
        """Build and validate; unknown keys and wrong types are `ConfigError`s naming the key."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping of settings; got {type(raw).__name__}.")
        kwargs: dict[str, Any] = {}
        for key, value in raw.items():
            kwargs[key] = _build(SECTIONS[key], value, f"{source}: {key}") if key in SECTIONS else value
        config = _build(cls, kwargs, source)
        config.validate(source)
        return config

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> JointConfig:
        """Read a YAML config file (plus `overrides`, e.g. from the command line)."""
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"--config: no file at {path}.")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc}).") from exc
        if isinstance(raw, dict):
            for key, value in (overrides or {}).items():
                if value is not None:
                    _set_dotted(raw, key, value, str(path))
        return cls.from_dict(raw, str(path))

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for `config.json` in the run folder and for resume checks)."""
        return dataclasses.asdict(self)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """`to_dict` of the default config: the values a run folder written before a key existed ran with."""
        return dataclasses.asdict(cls())

    @property
    def validation_size(self) -> int | float | None:
        """`validation_queries` as `Collection.split_validation`'s size, or None when there is no validation split."""
        return self.validation_queries or None

    @property
    def seeds(self) -> list[int]:
        """The expansion seeds of every evaluation (`eval_seeds`, or `[seed]`)."""
        return list(self.eval_seeds) if self.eval_seeds else [self.seed]

    def validate(self, source: str = "config") -> None:
        """Raise `ConfigError` for impossible values (before any model loads); the message starts with `source`."""
        try:
            self._validate()
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    def _validate(self) -> None:
        from expandr_haystack.evaluation.data import DataError, resolve_collection_path
        from expandr_haystack.evaluation.runner import parse_methods
        from expandr_haystack.generation import BACKENDS

        _checked(check_int, self.rounds, "rounds")
        if self.train_split == self.eval_split:
            _fail("eval_split", f"different from train_split ({self.train_split!r})", self.eval_split)
        for key in ("max_train_queries", "max_eval_queries", "max_corpus_documents"):
            if getattr(self, key) is not None:
                _checked(check_int, getattr(self, key), key, hint="Use null for no limit.")
        _checked(check_int, self.seed, "seed", 0)
        if not isinstance(self.baselines, bool):
            _fail("baselines", "true or false", self.baselines)
        v = self.validation_queries
        if v is not None and v != 0:
            if isinstance(v, float):
                if not 0 < v < 1:
                    _fail("validation_queries", "an integer >= 0, a fraction in (0, 1), or null", v)
            else:
                _checked(check_int, v, "validation_queries", 0, hint="Use a fraction in (0, 1), or 0/null for none.")
        if self.eval_seeds is not None:
            if isinstance(self.eval_seeds, (str, bytes)) or not isinstance(self.eval_seeds, (list, tuple)) \
                    or not self.eval_seeds:
                _fail("eval_seeds", "a non-empty list of integers >= 0, or null (one seed: `seed`)", self.eval_seeds)
            for i, s in enumerate(self.eval_seeds):
                _checked(check_int, s, f"eval_seeds[{i}]", 0)
            if len(set(self.eval_seeds)) != len(self.eval_seeds):
                _fail("eval_seeds", "distinct seeds", self.eval_seeds)
        for key in ("data", "train_split", "eval_split", "device"):
            value = getattr(self, key)
            if (value is not None or key != "device") and (not isinstance(value, str) or not value.strip()):
                _fail(key, "a non-empty string" + (" or null" if key == "device" else ""), value)
        _checked(check_choice, self.llm_backend, "llm_backend", BACKENDS)
        self.expansion.validate("expansion")
        self.retriever.validate("retriever")
        self.pairs.validate("pairs")
        self.dpo.validate("dpo")
        try:
            parse_methods(self.eval_methods)
        except ValueError as exc:
            raise ConfigError(f"`eval_methods`: {exc}") from None
        try:
            root = resolve_collection_path(self.data)
        except DataError as exc:
            raise ConfigError(f"`data`: {exc}") from None
        for split in (self.train_split, self.eval_split):
            if not (root / "qrels" / f"{split}.tsv").exists():
                raise ConfigError(f"split {split!r}: no file {root / 'qrels' / f'{split}.tsv'}.")
        for key in ("encoder", "llm"):  # hub ids pass; a local-looking path must exist
            _checked(check_model_name, getattr(self, key), key)
        # what the machine offers, last, so that the data, the models and every setting above are named the same
        # way on any machine: the trackers, the device, then the vLLM backend (which needs a GPU too)
        for section in ("retriever", "dpo"):
            tracker = missing_tracker(getattr(self, section).report_to)
            if tracker is not None:
                raise ConfigError(f"`{section}.report_to` names {tracker!r} but its package is not installed: "
                                  f"pip install {TRACKER_PACKAGES[tracker][0]} (or set report_to: none).")
        if self.device and str(self.device).startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ConfigError(f"`device` is {self.device!r} but this machine has no CUDA GPU (torch "
                                  f"{torch.__version__}); this config is meant for GPU machines. Use "
                                  f"training/configs/tiny-cpu.yaml here, or set device: cpu.")
        if self.llm_backend == "vllm":
            from expandr_haystack.generation.vllm import vllm_unavailable_reason

            reason = vllm_unavailable_reason()
            if reason is not None:
                raise ConfigError(f"`llm_backend` is 'vllm' but {reason}; this setting is meant for GPU machines. "
                                  f"Use llm_backend: auto here.")


def _build(cls, values: Any, where: str):
    """An instance of the dataclass `cls` from a mapping, with YAML-friendly conversions; errors name the key."""
    if isinstance(values, cls):
        return values
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping; got {type(values).__name__}.")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(names)}.")
    converted = {}
    for k, v in values.items():
        default = names[k].default
        if isinstance(default, tuple) and isinstance(v, (list, str)):
            v = tuple(x.strip() for x in v.split(",")) if isinstance(v, str) else tuple(v)
            if default and isinstance(default[0], float):
                try:
                    v = tuple(float(x) for x in v)
                except (TypeError, ValueError):
                    raise ConfigError(f"{where}: `{k}` must be a list of numbers; got {values[k]!r}.") from None
        elif isinstance(default, bool) and not isinstance(v, bool):
            raise ConfigError(f"{where}: `{k}` must be true or false; got {v!r}.")
        elif isinstance(default, float) and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        elif isinstance(default, (int, float)) and not isinstance(default, bool) and not isinstance(v, (int, float)):
            raise ConfigError(f"{where}: `{k}` must be a number; got {v!r}.")
        converted[k] = v
    try:
        return cls(**converted)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


__all__ = [
    "EXPANSION_MODES",
    "MODE_METHODS",
    "REPORT_TO",
    "SECTIONS",
    "TRACKER_PACKAGES",
    "ConfigError",
    "DPOSettings",
    "ExpansionSettings",
    "JointConfig",
    "PairConfig",
    "RetrieverSettings",
    "checkpointing_kwarg",
    "missing_tracker",
    "report_to_trackers",
    "report_to_value",
]
