"""
The run folder of joint training, and the process-rank helpers of distributed runs.

`RunFolder` keeps the bookkeeping files of a run: ``config.json`` (the settings), ``state.json`` (the config and
every finished step, so a resumed run skips them) and ``metrics.json`` (one row per round, setting and method).
Every write is atomic (`expandr_haystack.files`), so a kill never leaves half a file. Under `accelerate launch` /
`torchrun` the main process opens the folder and writes; the other ranks take its outcome (`distributed.broadcast`)
and poll ``state.json`` while it works alone (`RunFolder.wait_for`). The rank helpers live in `distributed` (and are
re-exported here).

Usage:
```python
from expandr_haystack.training.runfiles import RunFolder, is_main_process

folder = RunFolder("runs/tiny-cpu")
folder.open(config.to_dict(), resume=True)   # RunFolderError when the config differs from the run's
if not folder.is_done("round1.expand"):
    ...                                        # do the step
    folder.finish("round1.expand")
folder.record(1, "round 1: encoder_1 + LLM_1", {"dense": {"ndcg@10": 0.31, "recall@100": 0.8}}, series="LLM_r")
```
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from expandr_haystack.files import atomic_write_json
from expandr_haystack.training.distributed import barrier, broadcast, is_main_process, rank, world_size

logger = logging.getLogger(__name__)


class RunFolderError(ValueError):
    """The output folder holds a run that cannot be resumed with this config."""


# -- folders ----------------------------------------------------------------------------------------------------------
def replace_dir(source: str | Path, target: str | Path) -> Path:
    """
    Put the folder `source` at `target`, replacing what is there: stage it next to the target, then rename.

    :param source: A finished folder (e.g. a trainer's saved model), moved away.
    :param target: Where it goes; an existing folder there is removed first.
    :returns: `target`.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.move(str(source), str(staging))
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    return target


def _plain(data: Any) -> Any:
    """`data` as it reads back from JSON (tuples become lists, other values strings), for comparisons."""
    return json.loads(json.dumps(data, default=str))


#: Settings that may change when a run resumes: the number of rounds, and how the trainers log (not what they train).
FREE_ON_RESUME = ("rounds", "retriever.logging_steps", "retriever.report_to", "dpo.logging_steps", "dpo.report_to")


def _without_free_keys(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of `config` without the `FREE_ON_RESUME` keys (dotted keys name a section's setting)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in config.items()}
    for key in FREE_ON_RESUME:
        *sections, leaf = key.split(".")
        node = out
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return out


def _with_defaults(saved: Any, defaults: Any) -> Any:
    """`saved` with the keys it lacks (at any depth) taken from `defaults`: a config written before they existed."""
    if not isinstance(saved, dict) or not isinstance(defaults, dict):
        return saved
    merged = {k: _with_defaults(v, defaults.get(k)) for k, v in saved.items()}
    for k, v in defaults.items():
        merged.setdefault(k, v)
    return merged


class RunFolder:
    """
    ``config.json``, ``state.json`` and ``metrics.json`` of one run folder.

    :param path: The run folder (created by `open`).
    """

    CONFIG = "config.json"
    STATE = "state.json"
    METRICS = "metrics.json"
    #: Work folders a trainer leaves behind when it is killed (removed before the next training step).
    STALE_WORK = ("round_*/.dpo-*", "*/.train-*")
    #: Seconds between reads of ``state.json`` while another process finishes a step.
    poll_seconds = 2.0

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.state: dict[str, Any] = {"done": {}}
        self.metrics: list[dict[str, Any]] = []

    @property
    def state_path(self) -> Path:
        return self.path / self.STATE

    @property
    def metrics_path(self) -> Path:
        return self.path / self.METRICS

    def open(self, config: dict[str, Any], resume: bool, defaults: dict[str, Any] | None = None,
             renamed: dict[str, str] | None = None) -> None:
        """
        Start a run in the folder, or continue the one there.

        :param config: The run's settings as plain data (`JointConfig.to_dict()`); only the `FREE_ON_RESUME` keys
            (``rounds`` and the trainers' logging) may differ from the saved run's on resume.
        :param resume: Continue the run in the folder (its finished steps and metrics are loaded).
        :param defaults: The default settings (`JointConfig.defaults()`): a key the saved config lacks (it was
            written before the key existed) counts as having its default, so such a run resumes as long as the new
            keys keep their defaults.
        :param renamed: Top-level keys of earlier versions and their new names (`JointConfig.RENAMED`): a saved run
            resumes under the new names.
        :raises FileExistsError: The folder holds a run and `resume` is False (nothing is changed).
        :raises RunFolderError: `resume` is True and the config differs from the run's in more than the
            `FREE_ON_RESUME` keys.

        Under `torchrun` / `accelerate launch` rank 0 opens (or refuses) the folder once; every rank then raises the
        same error, or reads the state rank 0 wrote.
        """
        if world_size() == 1:
            self._open(config, resume, defaults, renamed)
            return
        error = None
        if is_main_process():
            try:
                self._open(config, resume, defaults, renamed)
            except (FileExistsError, RunFolderError) as exc:
                error = exc
            except Exception as exc:  # noqa: BLE001 - any failure reaches every rank (none waits for ever)
                error = RuntimeError(f"rank 0 could not open the run folder {self.path}: {type(exc).__name__}: {exc}")
        error = broadcast(error)
        if error is not None:
            raise error
        if not is_main_process():
            self.state = json.loads(self.state_path.read_text())
            self._load_metrics()

    def _open(self, config: dict[str, Any], resume: bool, defaults: dict[str, Any] | None,
              renamed: dict[str, str] | None) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        if self.state_path.exists() and not resume:
            raise FileExistsError(f"--output {self.path} already holds a run (state.json); pass --resume to "
                                  f"continue it, or choose another folder. Nothing was changed.")
        config = _plain(config)
        if resume and self.state_path.exists():
            self.state = json.loads(self.state_path.read_text())
            saved = {(renamed or {}).get(k, k): v for k, v in self.state.get("config", {}).items()}
            old = _with_defaults(saved, _plain(defaults or {}))
            old, new = _without_free_keys(old), _without_free_keys(config)
            changed = sorted(k for k in new if old.get(k) != new[k])
            if changed:
                raise RunFolderError(f"--resume: the config differs from the run in {self.path} in {changed}; "
                                     f"only {', '.join(f'`{k}`' for k in FREE_ON_RESUME)} may change on resume.")
            self.state.setdefault("done", {})
            self._load_metrics()
        self.state["config"] = config
        atomic_write_json(self.path / self.CONFIG, config)
        atomic_write_json(self.state_path, self.state)

    def _load_metrics(self) -> None:
        if self.metrics_path.exists():
            self.metrics = json.loads(self.metrics_path.read_text())

    # -- steps ---------------------------------------------------------------------------------------------------
    def is_done(self, step: str) -> bool:
        """Whether `step` (e.g. ``round1.pairs``) is recorded as finished."""
        return step in self.state["done"]

    def step_info(self, step: str) -> dict[str, Any]:
        """What `finish` recorded for a finished step (``at`` and its `info`)."""
        return self.state["done"][step]

    def finish(self, step: str, **info: Any) -> None:
        """
        Record `step` as finished (on every rank); the main process writes ``state.json``.

        :param info: Extra values kept with the step (e.g. ``kept=12`` pairs), read back with `step_info`.
        """
        self.state["done"][step] = {"at": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
        if is_main_process():
            atomic_write_json(self.state_path, self.state)
        logger.info("finished %s", step)

    def run_on_main(self, step: str, work: Callable[[], Any]) -> None:
        """
        Run a generation/evaluation step on the main process only (unless it is finished). Under
        `accelerate launch` / `torchrun` the other ranks poll ``state.json`` until the step is recorded (no collective
        call, so no NCCL timeout while rank 0 generates for hours). `work` calls `finish` itself.
        """
        if self.is_done(step):
            return
        if is_main_process():
            work()
        else:
            self.wait_for(step)

    def wait_for(self, step: str, poll_seconds: float | None = None) -> None:
        """
        Block until another process records `step` in ``state.json``; then take its state and metrics.

        :param poll_seconds: Seconds between reads of ``state.json`` (default `RunFolder.poll_seconds`).
        """
        poll_seconds = self.poll_seconds if poll_seconds is None else poll_seconds
        while True:
            if self.state_path.exists():
                try:
                    state = json.loads(self.state_path.read_text())
                except json.JSONDecodeError:  # pragma: no cover - written atomically; a reader never sees half
                    state = {"done": {}}
                if step in state.get("done", {}):
                    self.state = state
                    self._load_metrics()
                    return
            time.sleep(poll_seconds)

    def remove_stale_work(self) -> None:
        """Remove the work folders of a trainer killed mid-step: rank 0 removes them before any rank starts the
        step (every rank calls this, at the start of each training step)."""
        if is_main_process():
            for pattern in self.STALE_WORK:
                for stale in self.path.glob(pattern):
                    shutil.rmtree(stale, ignore_errors=True)
        barrier()

    # -- metrics ---------------------------------------------------------------------------------------------------
    def record(self, round_: int, label: str, result: dict[str, dict[str, float]], series: str | None = None) -> None:
        """
        Replace the rows of (`round_`, `label`) in ``metrics.json`` by one row per method of `result`.

        :param round_: 0 for the baselines, else the round.
        :param label: The setting, e.g. ``"round 1: encoder_1 + LLM_1"``.
        :param result: ``{method: {"ndcg@10", "recall@100", ...}}`` (e.g. an `EvalResult`'s `metrics`).
        :param series: Which LLM's expansions (``"LLM_r"`` or ``"LLM_r-1"``), None for the baselines.
        """
        self.metrics = [m for m in self.metrics if not (m["round"] == round_ and m["label"] == label)]
        for method, values in result.items():
            self.metrics.append({"round": round_, "label": label, "series": series, "method": method, **values})
        atomic_write_json(self.metrics_path, self.metrics)


@contextlib.contextmanager
def tensorboard_logging_dir(path: str | Path | None) -> Iterator[None]:
    """
    Within the block, transformers' TensorBoard callback (made with the trainer) writes its event files to `path`
    (it reads ``TENSORBOARD_LOGGING_DIR``; transformers 5 has no ``logging_dir`` argument, and the trainers' own
    output folders are temporary). Nothing changes when `path` is None or the user set the variable.
    """
    key = "TENSORBOARD_LOGGING_DIR"
    if path is None or os.environ.get(key):
        yield
        return
    os.environ[key] = str(Path(path).expanduser())
    try:
        yield
    finally:
        os.environ.pop(key, None)


__all__ = ["FREE_ON_RESUME", "RunFolder", "RunFolderError", "is_main_process", "rank", "replace_dir", "tensorboard_logging_dir",
           "world_size"]
