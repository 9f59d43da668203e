"""
Every training setting, validated before any model loads: `PairConfig` (DPO pair construction), `DPOSettings`
(one DPO + LoRA round), `RetrieverSettings`, `ExpansionSettings`, and `JointConfig` (a joint-training run, which
holds one of each).

Each dataclass has `validate()`, built on `expandr_haystack.checks`; a bad value is a `ConfigError` (a ValueError)
naming the key (``pairs.n_candidates`` inside a `JointConfig`) and what was expected; the rules, the conversion of
YAML values and the checks of a whole run are in `config_checks`, what differs between transformers releases in
`compat`. This module (and those) imports no training code, so reading a config never loads a model or a trainer.

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
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from expandr_haystack.checks import check_choice, check_int, check_number
from expandr_haystack.options import GenerationSettings
from expandr_haystack.training.config_checks import (
    ConfigError,
    Settings,
    build_settings,
    check_bool,
    check_fraction,
    check_names,
    check_numbers,
    check_optional_bool,
    check_optional_device,
    check_report_to,
    check_run,
    check_steps,
    fail,
    set_dotted,
    setting,
    setting_key,
)


# -- pair construction ----------------------------------------------------------------------------------------------
@dataclass
class PairConfig(Settings):
    """
    Settings of pair construction (ExpandR paper defaults where it has them).

    :param n_candidates: Candidate expansions sampled per query (>= 2: two candidates form a pair).
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

    n_candidates: int = setting(8, check_int, 2, hint="Two candidates form a pair.")
    temperatures: tuple[float, ...] = setting((0.8, 0.9, 1.0, 1.1), check_numbers)
    threshold: float = setting(0.6, check_number, None, 2.0, hint="A summed cosine is at most 2.")
    max_new_tokens: int = setting(96, check_int)
    answer_max_new_tokens: int = setting(96, check_int)
    top_p: float = setting(0.9, check_number, 0.0, 1.0, low_open=True)
    chunk_size: int = setting(16, check_int)
    batch_size: int = setting(16, check_int)
    seed: int = setting(42, check_int, 0)
    use_answer: bool = setting(True, check_bool)

    def __post_init__(self):
        try:
            self.temperatures = tuple(float(t) for t in self.temperatures)
        except (TypeError, ValueError):
            pass  # `validate` names it
        self.validate()

    def generation(self, progress_bar: bool = False) -> GenerationSettings:
        """What the candidates are sampled with (the first temperature; `expand` takes them all per sample)."""
        return GenerationSettings(temperature=self.temperatures[0], top_p=self.top_p,
                                  max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, seed=self.seed,
                                  progress_bar=progress_bar)


# -- DPO ------------------------------------------------------------------------------------------------------------
@dataclass
class DPOSettings(Settings):
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

    beta: float = setting(0.1, check_number, 0.0, low_open=True)
    learning_rate: float = setting(2e-5, check_number, 0.0, low_open=True)
    num_train_epochs: float = setting(2.0, check_number, 0.0, low_open=True)
    per_device_train_batch_size: int = setting(4, check_int)
    gradient_accumulation_steps: int = setting(1, check_int)
    max_length: int = setting(512, check_int)
    max_steps: int = setting(-1, check_steps)
    lora_r: int = setting(8, check_int)
    lora_alpha: int = setting(32, check_int)
    lora_dropout: float = setting(0.1, check_fraction)
    target_modules: tuple[str, ...] = setting(("q_proj", "v_proj"), check_names)
    seed: int = setting(42, check_int, 0)
    device: str | None = setting(None, check_optional_device)
    bf16: bool | None = None
    gradient_checkpointing: bool = False
    logging_steps: int = setting(10, check_int)
    warmup_steps: float = setting(0, check_number, 0.0)
    report_to: str | list[str] = setting("none", check_report_to)  # noqa: RUF009 - returns a field


# -- joint training -------------------------------------------------------------------------------------------------
@dataclass
class RetrieverSettings(Settings):
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
    :param batch_size: The global batch: under `torchrun` / `accelerate launch` each of N processes takes
        batch_size / N rows of it (N must divide it).
    :param gather_across_devices: The loss gathers every process's embeddings, so each query is contrasted with the
        whole global batch as on one device (sentence-transformers' `gather_across_devices`); None = on when there
        are several processes.
    """

    learning_rate: float = setting(2e-5, check_number, 0.0, low_open=True)
    epochs: float = setting(1.0, check_number, 0.0)
    batch_size: int = setting(32, check_int, 2, hint="A batch needs two rows for in-batch negatives.")
    temperature: float = setting(0.02, check_number, 0.0, low_open=True)
    max_length: int = setting(256, check_int)
    hard_negatives: int = setting(1, check_int, 0)
    hard_negative_skip: int = setting(3, check_int, 0)
    hard_negative_depth: int = setting(30, check_int)
    warmup_ratio: float = setting(0.1, check_fraction)
    query_weight: float = setting(0.5, check_number, 0.0, 1.0)
    max_positives_per_query: int = setting(4, check_int)
    restart_each_round: bool = True
    bf16: bool = False
    max_steps: int = setting(-1, check_steps)
    logging_steps: int = setting(10, check_int)
    report_to: str | list[str] = setting("none", check_report_to)  # noqa: RUF009 - returns a field
    gradient_checkpointing: bool = False
    gather_across_devices: bool | None = setting(None, check_optional_bool)

    def validate(self, section: str = "retriever") -> None:
        super().validate(section)

    def check_together(self, section: str) -> None:
        if self.epochs == 0 and self.max_steps < 1:
            fail(setting_key(section, "epochs"), "> 0 (or max_steps > 0)", self.epochs)
        if self.hard_negative_skip >= self.hard_negative_depth:
            fail(setting_key(section, "hard_negative_skip"),
                 f"in [0, hard_negative_depth) = [0, {self.hard_negative_depth})", self.hard_negative_skip)


#: Expansion modes of training: the paper's query-to-document prompt, or the grounded prompt that reads the top hits
#: of a first dense pass (`expandr_haystack.core.text.GROUNDED_PROMPT`).
EXPANSION_MODES = ("q2d", "grounded")
#: The evaluation method of each expansion mode (`expandr_haystack.evaluation.runner.METHODS`).
MODE_METHODS = {"q2d": "expand", "grounded": "grounded"}


@dataclass
class ExpansionSettings(Settings):
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

    n_expansions: int = setting(1, check_int)
    temperature: float = setting(1.0, check_number, 0.0)
    top_p: float = setting(0.9, check_number, 0.0, 1.0, low_open=True)
    max_new_tokens: int = setting(96, check_int)
    batch_size: int = setting(16, check_int)
    mode: str = setting("q2d", check_choice, EXPANSION_MODES)
    passages_k: int = setting(3, check_int)
    passage_words: int = setting(50, check_int)

    @property
    def method(self) -> str:
        """The evaluation method of this mode: "expand" (q2d) or "grounded"."""
        return MODE_METHODS[self.mode]

    def validate(self, section: str = "expansion") -> None:
        super().validate(section)

    def generation(self, seed: int, progress_bar: bool = False) -> GenerationSettings:
        """What these expansions are sampled with (`seed`: the run's)."""
        return GenerationSettings(temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens,
                                  batch_size=self.batch_size, seed=seed, progress_bar=progress_bar)


#: The sections of a `JointConfig` and their settings classes.
SECTIONS = {"expansion": ExpansionSettings, "retriever": RetrieverSettings, "pairs": PairConfig, "dpo": DPOSettings}


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
    :param llm_engine: The expander's generation engine (`SamplerOptions.engine`): "auto", "packed",
        "transformers" or "vllm" (GPU). Its old name `llm_backend` is still read, with a DeprecationWarning.
    :param llm_engine_kwargs: `SamplerOptions.engine_kwargs` of every expander (vLLM only), e.g.
        ``{tensor_parallel_size: 2}`` (part of the run's config: a resumed run keeps them).
    :param llm_weight_precision: `SamplerOptions.weight_precision` of every expander on the packed CPU decoder: "auto"
        (int8 where it runs), "float32" (the exact reference: texts that move only by rounding when the LLM's weights
        do, e.g. between runs whose DPO steps differ in the last bits; int8's 8-bit rounding can turn such a
        difference into other text), "int8" or "bfloat16".
    :param eval_methods: Methods evaluated besides those every report has (round 0: bm25, dense, prf, expand,
        grounded and haystack_multiquery; each round: dense, prf and the ExpandR method of `expansion.mode`), e.g.
        expand-rrf.
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
    llm_engine: str = "auto"
    llm_engine_kwargs: dict[str, Any] | None = None
    llm_weight_precision: str = "auto"
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

    #: Keys of earlier versions, read under their new names (old -> new).
    RENAMED: ClassVar[dict[str, str]] = {"llm_backend": "llm_engine"}

    # -- loading -------------------------------------------------------------------------------------------
    @classmethod
    def upgrade(cls, raw: dict[str, Any], source: str = "config") -> dict[str, Any]:
        """`raw` with the `RENAMED` keys under their new names (a DeprecationWarning naming both)."""
        old = [k for k in cls.RENAMED if k in raw]
        for key in old:
            if cls.RENAMED[key] in raw:
                raise ConfigError(f"{source}: both `{key}` and its new name `{cls.RENAMED[key]}` are set; keep "
                                  f"`{cls.RENAMED[key]}`.")
        if old:
            warnings.warn(f"{source}: {', '.join(f'`{k}` is now `{cls.RENAMED[k]}`' for k in old)}; the old name "
                          "will be removed.", DeprecationWarning, stacklevel=3)
        return {cls.RENAMED.get(k, k): v for k, v in raw.items()}

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> JointConfig:
        """Build and validate; unknown keys and wrong types are `ConfigError`s naming the key."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping of settings; got {type(raw).__name__}.")
        kwargs: dict[str, Any] = {}
        for key, value in cls.upgrade(raw, source).items():
            kwargs[key] = build_settings(SECTIONS[key], value, f"{source}: {key}") if key in SECTIONS else value
        config = build_settings(cls, kwargs, source)
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
                    set_dotted(raw, key, value, str(path))
        return cls.from_dict(raw, str(path))

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for `config.json` in the run folder and for resume checks)."""
        return dataclasses.asdict(self)

    def sampler(self, device=None):
        """The `SamplerOptions` of this run's expanders (`llm_engine` on `device`, a ComponentDevice or None, in
        `llm_weight_precision`)."""
        from expandr_haystack.options import SamplerOptions

        return SamplerOptions(engine=self.llm_engine, device=device, engine_kwargs=self.llm_engine_kwargs,
                              weight_precision=self.llm_weight_precision)

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
            check_run(self)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None


__all__ = ["EXPANSION_MODES", "MODE_METHODS", "SECTIONS", "ConfigError", "DPOSettings", "ExpansionSettings",
           "JointConfig", "PairConfig", "RetrieverSettings"]
