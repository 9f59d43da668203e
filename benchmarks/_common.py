"""Shared helpers of the benchmarks: environment, timing of interleaved runs, machine description."""

from __future__ import annotations

import os

os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import platform
import statistics
import time
from collections.abc import Callable


def machine() -> str:
    """One line describing the machine (CPU count, torch threads, load average)."""
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    return (f"{platform.machine()} {os.cpu_count()} CPU cores, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, load average at start {load[0]:.2f}, python {platform.python_version()}")


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """
    Wall-clock seconds of each function over `repeats` rounds, the functions alternating within a round (and the
    order reversed every other round), so that background load hits all of them alike.
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            started = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - started)
    return times


def summary(times: list[float]) -> str:
    """`median (min .. max)` in seconds."""
    return f"{statistics.median(times):.3f} s (min {min(times):.3f}, max {max(times):.3f})"


def median(times: list[float]) -> float:
    return statistics.median(times)


def verdict(ok: bool) -> str:
    return "goal met" if ok else "GOAL MISSED"
