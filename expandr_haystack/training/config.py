"""JointConfig: every setting of `training/joint.py`, validated before any model loads."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from expandr_haystack.training.dpo import DPOSettings
from expandr_haystack.training.pairs import PairConfig


class ConfigError(ValueError):
    """A training configuration is invalid; the message names the key and what was expected."""


@dataclass
class RetrieverSettings:
    """
    Encoder training on fused queries (FusedInfoNCELoss) through sentence-transformers' trainer.

    - `temperature`: InfoNCE temperature tau (paper 0.02).
    - `hard_negatives`: negatives per example mined with the current encoder from ranks
      [`hard_negative_skip`, `hard_negative_depth`) of the fused query's ranking, judged documents excluded.
    - `restart_each_round`: train every round from the base encoder (so every round, and the no-expansion baseline,
      gets the same budget and a round's gain comes from its LLM); False continues from the previous round.
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


@dataclass
class ExpansionSettings:
    """How training queries are expanded for the retriever step (and for evaluation)."""

    n_expansions: int = 1
    temperature: float = 1.0
    top_p: float = 0.9
    max_new_tokens: int = 96
    batch_size: int = 16


@dataclass
class JointConfig:
    """
    One joint-training run: data, models, rounds, and the settings of each step.

    `data` is a BEIR-layout folder, or `cranfield` for the bundled collection. Training reads only
    `train_split`; evaluation only `eval_split` (they must differ).
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
        sections = {"expansion": ExpansionSettings, "retriever": RetrieverSettings, "pairs": PairConfig,
                    "dpo": DPOSettings}
        kwargs: dict[str, Any] = {}
        for key, value in raw.items():
            if key in sections:
                kwargs[key] = _build(sections[key], value, f"{source}: {key}")
            else:
                kwargs[key] = value
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
        raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls.from_dict(raw, str(path))

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for `config.json` in the run folder and for resume checks)."""
        return dataclasses.asdict(self)

    def validate(self, source: str = "config") -> None:
        """Raise `ConfigError` for impossible values (before any model loads)."""
        from expandr_haystack.data import DataError, resolve_collection_path
        from expandr_haystack.evaluation import parse_methods

        def need(cond: bool, key: str, expected: str, value: Any) -> None:
            if not cond:
                raise ConfigError(f"{source}: `{key}` must be {expected}; got {value!r}.")

        need(isinstance(self.rounds, int) and self.rounds >= 1, "rounds", "an integer >= 1", self.rounds)
        need(self.train_split != self.eval_split, "eval_split", f"different from train_split ({self.train_split!r})",
             self.eval_split)
        for key in ("max_train_queries", "max_eval_queries", "max_corpus_documents"):
            v = getattr(self, key)
            need(v is None or (isinstance(v, int) and v >= 1), key, "null or an integer >= 1", v)
        r = self.retriever
        need(r.temperature > 0, "retriever.temperature", "> 0", r.temperature)
        need(r.learning_rate > 0, "retriever.learning_rate", "> 0", r.learning_rate)
        need(r.epochs > 0 or r.max_steps > 0, "retriever.epochs", "> 0 (or max_steps > 0)", r.epochs)
        need(isinstance(r.batch_size, int) and r.batch_size >= 2, "retriever.batch_size",
             "an integer >= 2 (in-batch negatives)", r.batch_size)
        need(isinstance(r.hard_negatives, int) and r.hard_negatives >= 0, "retriever.hard_negatives",
             "an integer >= 0", r.hard_negatives)
        need(0 <= r.hard_negative_skip < r.hard_negative_depth, "retriever.hard_negative_skip",
             "in [0, hard_negative_depth)", r.hard_negative_skip)
        need(0.0 <= r.query_weight <= 1.0, "retriever.query_weight", "in [0, 1]", r.query_weight)
        need(0.0 <= r.warmup_ratio < 1.0, "retriever.warmup_ratio", "in [0, 1)", r.warmup_ratio)
        for key in ("data", "encoder", "llm", "device"):
            v = getattr(self, key)
            need(v is None and key != "data" or isinstance(v, str) and v.strip() != "", key,
                 "a non-empty string" + ("" if key == "data" else " or null"), v)
        from expandr_haystack.components.expander import BACKENDS

        need(self.llm_backend in BACKENDS, "llm_backend", f"one of {', '.join(BACKENDS)}", self.llm_backend)
        if self.llm_backend == "vllm":
            from expandr_haystack.vllm_sampler import vllm_unavailable_reason

            reason = vllm_unavailable_reason()
            if reason is not None:
                raise ConfigError(f"{source}: `llm_backend` is 'vllm' but {reason}; this setting is meant for GPU "
                                  f"machines. Use llm_backend: auto here.")
        e = self.expansion
        need(e.n_expansions == 1, "expansion.n_expansions",
             "1 for training (the retriever is trained on one expansion per query, as in the paper; evaluate with "
             "more through `expandr eval --n-expansions`)", e.n_expansions)
        need(e.temperature >= 0, "expansion.temperature", ">= 0", e.temperature)
        need(isinstance(e.max_new_tokens, int) and e.max_new_tokens >= 1, "expansion.max_new_tokens",
             "an integer >= 1", e.max_new_tokens)
        try:
            self.pairs.validate()
            self.dpo.validate()
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{source}: {exc}") from exc
        try:
            parse_methods(self.eval_methods)
        except ValueError as exc:
            raise ConfigError(f"{source}: `eval_methods`: {exc}") from exc
        try:
            root = resolve_collection_path(self.data)
        except DataError as exc:
            raise ConfigError(f"{source}: `data`: {exc}") from exc
        for split in (self.train_split, self.eval_split):
            if not (root / "qrels" / f"{split}.tsv").exists():
                raise ConfigError(f"{source}: split {split!r}: no file {root / 'qrels' / f'{split}.tsv'}.")
        if self.device and str(self.device).startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ConfigError(f"{source}: `device` is {self.device!r} but this machine has no CUDA GPU (torch "
                                  f"{torch.__version__}); this config is meant for GPU machines. Use "
                                  f"training/configs/tiny-cpu.yaml here, or set device: cpu.")
        for key in ("encoder", "llm"):
            v = getattr(self, key)
            if v is not None and (str(v).startswith((".", "/", "~")) and not Path(v).expanduser().exists()):
                raise ConfigError(f"{source}: `{key}`: no model directory at {v!r}.")


def _build(cls, values: Any, where: str):
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
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc
