"""
Fused CPU kernels for the int8 packed decoder (`kernels.cpp`), compiled for this machine on first use.

A decode step of `packed_llama.PackedLlamaDecoder` at 16 rows is ~1,200 tensor ops around 121 int8 products; most
of them are tiny, and each costs its dispatch, allocation and thread fork more than its arithmetic. Five kernels do
in one pass what took several, and a sixth multiplies few rows by int8 weights faster than FBGEMM
(`torch.ops.expandr.*`, used by `quantize._FusedInt8Linear` and `_OwnInt8Linear`, `packed_llama._FusedAttention`
and `local.sample_rows`):

- ``row_input(x, scale, eps)``: an int8 layer's input, ``scale * x`` divided by its per-row largest magnitude, and
  the row scale times RMSNorm's factor (`quantize.int8_row_input` and `quantize.rms_factor`: nine ops);
- ``row_codes(...)``: the same rows as the uint8 codes oneDNN's int8 kernel takes (eleven);
- ``gated_row_input(gate_up)``: the MLP's ``silu(gate) * up``, then the down projection's input the same way (six);
- ``decode_attention(...)``: one new token per row: rotary embedding, KV cache write and grouped-query attention
  (eight, and ``scaled_dot_product_attention``, whose CPU kernel is built for long sequences);
- ``sample_nucleus(...)``: temperature + nucleus sampling of every row (a softmax and a topk over the vocabulary,
  and ~10 more);
- ``int8_product(codes, packed, offsets, scales)``: the int8 products (`quantize._OwnInt8Linear`), VNNI's or AVX2's
  integer sums and FBGEMM's epilogue: FBGEMM's products bit for bit, the weights streamed ~1.9x faster at a decode
  step's rows (``int8_product_block()``: the weights' block width, 16 or 8).

The math is the same; the rounding is not (sums in another order, a polynomial ``exp``), so the text differs from the
unfused int8 path's where a draw falls near a boundary, as int8's differs from float32's: its cache name says so
(`local.LocalSampler.engine`) and its quality is measured like int8's (docs/benchmarks.md).

They are compiled by ``torch.utils.cpp_extension`` (a C++ compiler and ninja; ~10-20 s on 2 cores, once: the build is
kept in torch's extension directory, ``TORCH_EXTENSIONS_DIR``, under a name that includes the source, the flags, torch
and this CPU) with ``-march=native`` on x86 (``-mavx2 -mfma -mf16c`` where ``ATEN_CPU_CAPABILITY=avx2`` holds torch to
AVX2, so a benchmark that emulates an AVX2-only CPU gets AVX2 kernels too). Where that fails (no compiler, no
ninja, a build error) the decoder runs the torch ops, with a warning saying why. ``EXPANDR_KERNELS=0`` turns them off.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import threading
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.cpp")

#: The environment switch: "0" runs the torch ops instead of the fused kernels.
ENV_SWITCH = "EXPANDR_KERNELS"

_LOCK = threading.Lock()
_BUILT: dict[str, str | None] = {}  # "reason": None once loaded, else why not (one build attempt per process)


def compile_flags() -> list[str]:
    """The compiler flags for this CPU: the source vectorized for its instruction set (`-march=native` on x86;
    held to AVX2 or to the baseline where ``ATEN_CPU_CAPABILITY`` holds torch there)."""
    flags = ["-O3", "-fopenmp-simd"]
    if platform.system() == "Linux":  # ATen's parallel_for is OpenMP in torch's Linux wheels (their libgomp is used)
        flags.append("-fopenmp")
    if platform.machine().lower() in ("x86_64", "amd64"):
        capability = os.environ.get("ATEN_CPU_CAPABILITY", "").lower()
        flags += {"avx2": ["-mavx2", "-mfma", "-mf16c"], "default": []}.get(capability, ["-march=native"])
    return flags


def _cpu_fingerprint() -> str:
    """What `-march=native` compiles for: the CPU's model and flags (a build is never loaded on another CPU)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        wanted = [line for line in lines if line.startswith(("model name", "flags", "Features", "CPU part"))]
        return "\n".join(dict.fromkeys(wanted))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def build_name(flags: list[str]) -> str:
    """The extension's name: a digest of the source, the flags, torch's version and the CPU."""
    digest = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(flags), torch.__version__,
                                       _cpu_fingerprint()]).encode()).hexdigest()[:16]
    return f"expandr_kernels_{digest}"


def _build() -> str | None:
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} is not on PATH; set CXX to one)"
    if shutil.which("ninja") is None:  # torch runs `ninja` from PATH; the `ninja` package (a dependency) installs
        try:  # its binary beside the interpreter, which is not on PATH when a venv's python runs unactivated
            import ninja

            os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])
        except (ImportError, AttributeError):
            return "ninja is not installed (`pip install ninja`)"
    flags = compile_flags()
    started = time.perf_counter()
    logger.info("Loading the packed decoder's fused kernels (compiled once for this CPU, ~10-20 s, flags %s).",
                " ".join(flags))
    try:
        cpp_extension.load(build_name(flags), sources=[str(SOURCE)], extra_cflags=flags,
                           extra_ldflags=[flag for flag in flags if flag == "-fopenmp"], is_python_module=False,
                           verbose=False)
    except Exception as error:  # noqa: BLE001 - a failed compile or load of any kind: the torch ops run instead
        logger.debug("Building the fused kernels failed:\n%s", error)
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        first_error = next((line for line in lines if "error" in line.lower()), lines[-1] if lines else "")
        return f"building them failed ({type(error).__name__}: {first_error[:200]})"
    logger.info("Fused kernels ready in %.1f s.", time.perf_counter() - started)
    return None


def unavailable_reason() -> str | None:
    """None where the fused kernels are loaded (building them on the first call), else why they are not: the
    switch is off (``EXPANDR_KERNELS=0``), no compiler or ninja, or the build failed."""
    if os.environ.get(ENV_SWITCH, "1").strip() == "0":
        return f"{ENV_SWITCH}=0"
    with _LOCK:
        if "reason" not in _BUILT:
            _BUILT["reason"] = _build()
        return _BUILT["reason"]


def resolve_kernels(kernels: bool | None) -> bool:
    """Whether to run the fused kernels: `kernels` True (an error saying why where they cannot load), False, or None
    (where they load; a warning naming the reason where they do not)."""
    if kernels is False:
        return False
    reason = unavailable_reason()
    if reason is None:
        return True
    if kernels:
        raise ValueError(f"`kernels`=True, but the fused CPU kernels cannot run here: {reason}. Use kernels=None "
                         "(where they load) or False.")
    if not reason.startswith(ENV_SWITCH):
        logger.warning("The int8 decoder runs without its fused kernels (slower, the same math): %s.", reason)
    return False
