"""
Argument checks shared by components, configs and command lines: one wording for each rule, naming the argument.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def check_int(value: Any, argument: str, minimum: int = 1) -> int:
    """`value` as an int >= `minimum` (bools refused), else a ValueError naming `argument`."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"`{argument}` must be an integer >= {minimum}; got {value!r}.")
    return value


def check_number(value: Any, argument: str, low: float | None = None, high: float | None = None,
                 low_open: bool = False) -> float:
    """`value` as a finite float in [low, high] (or (low, high] with `low_open`), else a ValueError naming it."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        if low is not None and high is not None:
            expected = f"a number in {'(' if low_open else '['}{low:g}, {high:g}]"
        elif low is not None:
            expected = f"a number {'>' if low_open else '>='} {low:g}"
        else:
            expected = "a finite number"
        raise ValueError(f"`{argument}` must be {expected}; got {value!r}.")
    return float(value)


def check_choice(value: Any, argument: str, choices: tuple[str, ...]) -> str:
    """`value` if it is one of `choices`, else a ValueError listing them."""
    if value not in choices:
        raise ValueError(f"`{argument}` must be one of {', '.join(map(repr, choices))}; got {value!r}.")
    return value


def looks_like_local_path(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else with a path shape is meant as a local directory."""
    return name.startswith((".", "/", "~")) or name.count("/") >= 2 or "\\" in name


def check_model_name(model: Any, argument: str = "model") -> None:
    """None (bundled default), a hub id, or an existing local directory; a missing local path names `argument`."""
    if model is None:
        return
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"`{argument}` must be None (bundled default), a Hugging Face model id or a local path; "
                         f"got {model!r}.")
    if looks_like_local_path(model) and not Path(model).expanduser().exists():
        raise FileNotFoundError(f"`{argument}`: no model directory at {model!r}.")


def is_adapter_dir(path: str | Path | None) -> bool:
    """Whether `path` is a PEFT adapter folder (it holds ``adapter_config.json``)."""
    return path is not None and (Path(path).expanduser() / "adapter_config.json").exists()


def check_adapter_dir(adapter: Any, argument: str = "adapter") -> None:
    """None, or a PEFT adapter folder; anything else is a FileNotFoundError naming `argument`."""
    if adapter is not None and not is_adapter_dir(adapter):
        raise FileNotFoundError(f"`{argument}`: {adapter!r} is not a PEFT adapter directory "
                                f"(no adapter_config.json there).")


__all__ = ["check_adapter_dir", "check_choice", "check_int", "check_model_name", "check_number", "is_adapter_dir",
           "looks_like_local_path"]
