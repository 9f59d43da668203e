"""
What differs between transformers / TRL releases, asked of the installed ones: the experiment trackers `report_to`
may name (`report_to_trackers`) and the packages they need (`missing_tracker`), `report_to` as `TrainingArguments`
takes it (`report_to_value`), and the name of the activation-checkpointing switch (`checkpointing_kwarg`:
``activation_checkpointing`` or ``gradient_checkpointing``). No trainer or model is loaded here.

Usage:
```python
from trl import DPOConfig

from expandr_haystack.training.compat import checkpointing_kwarg, report_to_value

DPOConfig(output_dir="out", report_to=report_to_value(["tensorboard"]), **checkpointing_kwarg(DPOConfig, True))
```
"""

from __future__ import annotations

import dataclasses

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


__all__ = ["REPORT_TO", "TRACKER_PACKAGES", "checkpointing_kwarg", "missing_tracker", "report_to_trackers",
           "report_to_value"]
