"""Shared helpers of the benchmarks: environment, timing of interleaved runs, machine description."""

from __future__ import annotations

import os

os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib.util
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def machine() -> str:
    """One line describing the machine (CPU count, torch threads, load average)."""
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    return (f"{platform.machine()} {os.cpu_count()} CPU cores, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, load average at start {load[0]:.2f}, python {platform.python_version()}")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo; the platform's processor string elsewhere)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def simd_flags() -> str:
    """The CPU's SIMD flags (avx*, amx*, sse4*, fma, vnni) as the kernel reports them."""
    from expandr_haystack.generation.quantize import cpu_flags

    return " ".join(sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "sse4", "fma", "vnni")))) or "unknown"


#: Each library's switch that holds it to a narrower instruction set than the CPU has: set together (e.g. all to
#: AVX2) they run the kernels an AVX2-only CPU gets on a wider one (an emulation: caches and clocks stay this CPU's).
ISA_SWITCHES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "FBGEMM_ENABLE_INSTRUCTIONS",
                "CT2_FORCE_CPU_ISA")


def cpu_line() -> str:
    """One line naming the CPU and its SIMD flags, and any `ISA_SWITCHES` in force: every speed figure says which
    CPU, and which kernels, gave it."""
    limits = " ".join(f"{name}={os.environ[name]}" for name in ISA_SWITCHES if os.environ.get(name))
    return f"CPU: {cpu_model()}; flags: {simd_flags()}" + (f"; kernels held by {limits}" if limits else "")


def load_example(relative: str, name: str) -> ModuleType:
    """An example script (a path under examples/, which is not a package) as a module named `name`."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / relative)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # a dataclass in it looks its module up there
    spec.loader.exec_module(module)
    return module


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
