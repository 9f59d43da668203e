"""
How a training setting is checked and read (`expandr_haystack.training.config` uses these; they raise `ConfigError`):
one validation style for every settings class (`checked`, `fail`, ...; a bad value is named by its key, such as
``pairs.n_candidates``, and what was expected), the conversion of a YAML mapping into a settings dataclass
(`build_settings`, `set_dotted` for command-line overrides), and the checks of a whole run (`check_run`: its values,
each section's, then the data, the models and what the machine offers). Imports no training code.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

from expandr_haystack.checks import check_choice, check_int, check_model_name, check_number
from expandr_haystack.training.compat import TRACKER_PACKAGES, missing_tracker, report_to_trackers


class ConfigError(ValueError):
    """A training configuration is invalid; the message names the key and what was expected."""


# -- one validation style -------------------------------------------------------------------------------------------
def setting_key(section: str, name: str) -> str:
    return f"{section}.{name}" if section else name


def fail(key: str, expected: str, value: Any) -> None:
    """Raise the `ConfigError` of a rule `expandr_haystack.checks` has no helper for, in the same wording."""
    raise ConfigError(f"`{key}` must be {expected}; got {value!r}.")


def checked(check, value: Any, key: str, *args: Any, hint: str = "", **kwargs: Any) -> Any:
    """``check(value, key, *args)`` (a `expandr_haystack.checks` helper); its error as a `ConfigError` + `hint`."""
    try:
        return check(value, key, *args, **kwargs)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise ConfigError(f"{exc} {hint}".strip()) from None


def check_steps(value: Any, key: str) -> None:
    if value != -1 and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        fail(key, "-1 (no limit) or an integer >= 1", value)


def check_fraction(value: Any, key: str) -> None:  # [0, 1)
    checked(check_number, value, key, 0.0, 1.0)
    if value >= 1:
        fail(key, "a number in [0, 1)", value)


def check_bool(value: Any, key: str) -> None:
    if not isinstance(value, bool):
        fail(key, "true or false", value)


def check_optional_bool(value: Any, key: str) -> None:
    if value is not None and not isinstance(value, bool):
        fail(key, "true, false or null", value)


def check_numbers(value: Any, key: str) -> None:
    """A non-empty tuple of numbers >= 0 (e.g. sampling temperatures)."""
    if not isinstance(value, tuple) or not value:
        fail(key, "a non-empty list of numbers >= 0", value)
    for i, number in enumerate(value):
        checked(check_number, number, f"{key}[{i}]", 0.0)


def check_names(value: Any, key: str) -> None:
    if not value or not isinstance(value, (tuple, list)) or not all(isinstance(m, str) and m for m in value):
        fail(key, "a non-empty list of module names", value)


def check_optional_device(value: Any, key: str) -> None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        fail(key, "a device name such as 'cpu' or 'cuda:0', or null", value)


def check_report_to(value: Any, key: str) -> None:
    """"none", "all", one tracker of `report_to_trackers()`, or a non-empty list of them (transformers' `report_to`)."""
    trackers = report_to_trackers()
    expected = f'"none", "all", one of {list(trackers)} or a list of them'
    if isinstance(value, str):
        if value not in ("none", "all") + trackers:
            fail(key, expected, value)
    elif isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v in trackers for v in value):
        return
    else:
        fail(key, expected, value)


# -- settings dataclasses -------------------------------------------------------------------------------------------
def setting(default: Any, check: Callable[..., Any] | None = None, *args: Any, hint: str = "", **kwargs: Any):
    """
    A field of a settings dataclass: its default and the rule its value follows, ``check(value, key, *args,
    **kwargs)`` (a `expandr_haystack.checks` helper, or one of this module's ``check_*``), checked by
    `Settings.validate` with the key named as in the config (``pairs.n_candidates``) and `hint` added to the message.
    """
    rule = None if check is None else (lambda value, key: checked(check, value, key, *args, hint=hint, **kwargs))
    return dataclasses.field(default=default, metadata={"rule": rule})


class Settings:
    """What every training settings dataclass does: check each field by its `setting` rule (then the rules that
    relate fields, `check_together`), and write plain data."""

    def validate(self, section: str = "") -> None:
        """
        Raise a `ConfigError` naming the first bad setting.

        :param section: Prefix of the keys in messages (e.g. ``pairs`` inside a `JointConfig`).
        """
        for f in dataclasses.fields(self):
            rule = f.metadata.get("rule")
            if rule is not None:
                rule(getattr(self, f.name), setting_key(section, f.name))
        self.check_together(section)

    def check_together(self, section: str) -> None:
        """The rules that relate two settings (none by default)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain data (tuples as lists), as in ``config.json`` and ``<pairs>.stats.json``."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def help(cls) -> dict[str, str]:
        """Each field's ``:param name:`` text of the class docstring (one line), e.g. for command-line help."""
        text = re.sub(r"\s+", " ", cls.__doc__ or "")
        return {m.group(1): m.group(2).strip() for m in re.finditer(r":param (\w+): (.*?)(?=:param |$)", text)}


# -- reading a mapping ----------------------------------------------------------------------------------------------
def set_dotted(raw: dict[str, Any], key: str, value: Any, source: str) -> None:
    """Set `raw["a"]["b"] = value` for the override key "a.b" (a top-level key has no dot)."""
    *sections, leaf = key.split(".")
    node = raw
    for section in sections:
        child = node.setdefault(section, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: --set {key}: {section!r} is not a section of the config.")
        node = child
    node[leaf] = value


def build_settings(cls, values: Any, where: str):
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


# -- a whole run ----------------------------------------------------------------------------------------------------
def check_run(config) -> None:
    """The checks of a `JointConfig` (`JointConfig.validate` adds the source to the message): its own values, each
    section's `validate`, the methods, the data and its splits, the models, then what the machine offers."""
    from expandr_haystack.evaluation.data import DataError, resolve_collection_path
    from expandr_haystack.evaluation.runner import parse_methods
    from expandr_haystack.options import ENGINES, WEIGHT_PRECISIONS

    checked(check_int, config.rounds, "rounds")
    if config.train_split == config.eval_split:
        fail("eval_split", f"different from train_split ({config.train_split!r})", config.eval_split)
    for key in ("max_train_queries", "max_eval_queries", "max_corpus_documents"):
        if getattr(config, key) is not None:
            checked(check_int, getattr(config, key), key, hint="Use null for no limit.")
    checked(check_int, config.seed, "seed", 0)
    if not isinstance(config.baselines, bool):
        fail("baselines", "true or false", config.baselines)
    v = config.validation_queries
    if v is not None and v != 0:
        if isinstance(v, float):
            if not 0 < v < 1:
                fail("validation_queries", "an integer >= 0, a fraction in (0, 1), or null", v)
        else:
            checked(check_int, v, "validation_queries", 0, hint="Use a fraction in (0, 1), or 0/null for none.")
    if config.eval_seeds is not None:
        if isinstance(config.eval_seeds, (str, bytes)) or not isinstance(config.eval_seeds, (list, tuple)) \
                or not config.eval_seeds:
            fail("eval_seeds", "a non-empty list of integers >= 0, or null (one seed: `seed`)", config.eval_seeds)
        for i, s in enumerate(config.eval_seeds):
            checked(check_int, s, f"eval_seeds[{i}]", 0)
        if len(set(config.eval_seeds)) != len(config.eval_seeds):
            fail("eval_seeds", "distinct seeds", config.eval_seeds)
    for key in ("data", "train_split", "eval_split", "device"):
        value = getattr(config, key)
        if (value is not None or key != "device") and (not isinstance(value, str) or not value.strip()):
            fail(key, "a non-empty string" + (" or null" if key == "device" else ""), value)
    checked(check_choice, config.llm_engine, "llm_engine", ENGINES)
    checked(check_choice, config.llm_weight_precision, "llm_weight_precision", WEIGHT_PRECISIONS)
    try:
        config.sampler()  # the engine's own rules (llm_engine_kwargs: a mapping, vLLM only)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"`llm_engine_kwargs`: {exc}") from None
    config.expansion.validate("expansion")
    config.retriever.validate("retriever")
    config.pairs.validate("pairs")
    config.dpo.validate("dpo")
    try:
        parse_methods(config.eval_methods)
    except ValueError as exc:
        raise ConfigError(f"`eval_methods`: {exc}") from None
    try:
        root = resolve_collection_path(config.data)
    except DataError as exc:
        raise ConfigError(f"`data`: {exc}") from None
    for split in (config.train_split, config.eval_split):
        if not (root / "qrels" / f"{split}.tsv").exists():
            raise ConfigError(f"split {split!r}: no file {root / 'qrels' / f'{split}.tsv'}.")
    for key in ("encoder", "llm"):  # hub ids pass; a local-looking path must exist
        checked(check_model_name, getattr(config, key), key)
    # what the machine offers, last, so that the data, the models and every setting above are named the same
    # way on any machine: the trackers, the device, then the vLLM backend (which needs a GPU too)
    for section in ("retriever", "dpo"):
        tracker = missing_tracker(getattr(config, section).report_to)
        if tracker is not None:
            raise ConfigError(f"`{section}.report_to` names {tracker!r} but its package is not installed: "
                              f"pip install {TRACKER_PACKAGES[tracker][0]} (or set report_to: none).")
    from expandr_haystack.training.distributed import world_size

    if world_size() > 1 and config.retriever.batch_size % world_size():
        fail("retriever.batch_size", f"divisible by the {world_size()} processes of this launch (the global batch is "
             f"split evenly)", config.retriever.batch_size)
    if config.device and str(config.device).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"`device` is {config.device!r} but this machine has no CUDA GPU (torch "
                              f"{torch.__version__}); this config is meant for GPU machines. Use "
                              f"training/configs/tiny-cpu.yaml here, or set device: cpu.")
    if config.llm_engine == "vllm":
        from expandr_haystack.generation.vllm import vllm_unavailable_reason

        reason = vllm_unavailable_reason()
        if reason is not None:
            raise ConfigError(f"`llm_engine` is 'vllm' but {reason}; this setting is meant for GPU machines. "
                              f"Use llm_engine: auto here.")


__all__ = ["ConfigError", "Settings", "build_settings", "check_bool", "check_fraction", "check_names", "check_numbers",
           "check_optional_bool", "check_optional_device", "check_report_to", "check_run", "check_steps", "checked",
           "fail", "set_dotted", "setting", "setting_key"]
