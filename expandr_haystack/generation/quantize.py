"""
Weight precisions of the packed decoder (`packed_llama.PackedLlamaDecoder`): which precision runs on this CPU, int8
quantization with SmoothQuant smoothing, and the bias-free linear layers in each precision (`make_linear`).

At batch 16 a decode step is memory-bound: it streams every weight once per token (~540 MB in float32 for
SmolLM2-135M, the 113 MB vocabulary head included), so smaller weights are faster weights:

* ``"float32"`` (default): weights prepacked once for oneDNN (`_Linear`), the same float32 math as ``transformers``;
* ``"int8"``: every projection and the vocabulary head hold int8 weights with one symmetric scale per output channel
  (``w ~ s_n * q_n``, ``s_n = max|w_n| / 127``, `quantize_per_channel`), multiplied by FBGEMM's int8 kernel
  (``torch.ops.quantized.linear_dynamic``: 4x fewer weight bytes, integer dot products on 8-bit inputs; `_Int8Linear`).
  What keeps the 8-bit inputs accurate, and the extra work small:

  - **smoothing** (SmoothQuant, Xiao et al. 2023): a few input channels of a Llama carry activations 10-100x the
    others', so one 8-bit grid per row rounds the rest to a handful of levels. Each linear layer ``y = x W^T`` is
    rewritten exactly as ``y = (x / c) (W * c)^T`` with, per input channel ``j``,
    ``c_j = max|x_j|^alpha / max|W_{:,j}|^(1-alpha)`` (``alpha`` = `SMOOTHING_ALPHA`, `smoothing_scales`), the
    activation maxima ``max|x_j|`` read from the float32 model on a few natural prompts (`calibration`,
    `input_maxima`); ``1 / c`` is folded into the RMSNorm weight before ``q|k|v``, ``gate|up`` and the head, into
    the ``up`` rows before ``down`` (``down``'s input is ``silu(gate) * up``), and applied at run time before ``o``
    only (`packed_llama._Layer`);
  - **one grid per row**: FBGEMM's dynamic linear quantizes its whole input with one range, which would couple the
    rows of a batch. Each row is passed over its own ``max|x|`` (so it lies in [-1, 1], `int8_row_input`) to
    FBGEMM's linear with a *given* input grid, the one for exactly [-1, 1] (`fbgemm_input_grid`;
    ``quantized.linear_with_input_q_dq_qweight_dq_output_fp32``, the same kernel without the range search): each
    row's codes are its own, and the result is rescaled by the row's maximum;
  - **norms in the row scale**: RMSNorm multiplies a row by one factor, which leaves the row's codes unchanged, so
    a layer after a norm quantizes ``norm weight * x`` and multiplies its output's row scale by the norm's factor
    (`rms_factor`); the residual add is fused with that rescaling (``addcmul``).

  - **7-bit weights without VNNI**: FBGEMM's AVX2 and AVX-512 kernels (CPUs without AVX512-VNNI, FBGEMM's
    ``FBGEMM_ENABLE_INSTRUCTIONS`` set to one of them) multiply uint8 input codes by int8 weights in adjacent pairs
    summed into int16 (``vpmaddubsw``), which saturates above 32,767: with 8-bit weights a pair reaches
    ``255 * 127 * 2 = 64,770`` and rows come out up to ~9% wrong. There the weights use 64 levels instead of 127
    (``s_n = max|w_n| / 64``, `int8_weight_levels`): a pair is at most ``255 * 64 * 2 = 32,640``, so the integer
    product is exact again and the inputs keep their 8 bits (FBGEMM's own remedy, `reduce_range`, takes the bit
    from the inputs instead, which costs far more accuracy: next-token KL 0.044 against 0.027 for 7-bit weights and
    0.014 for 8-bit weights with VNNI, docs/benchmarks.md "int8 without VNNI").

  - **oneDNN's kernel with AMX**: on CPUs with AMX-INT8 (`onednn_int8_unsupported_reason`) each layer also holds
    its int8 weights for oneDNN (``onednn::qlinear_pointwise`` on the same uint8 input codes, given FBGEMM's one
    scale per output) and multiplies there from the row count where a product reaches `ONEDNN_MIN_MULTIPLY_ADDS`
    (the prompt tails of a prefill, hundreds of rows; gate|up and the head at batch 16): the same products as
    FBGEMM's bit for bit (checked per layer when it is built, on random rows and on the grid's midpoints,
    `grid_midpoint_rows`; a layer where they differ keeps FBGEMM alone), so a row's text does not depend on the
    batch it was drawn in; ~2x faster at hundreds of rows, slower at a few.

  - **The kernels' own product**: with the fused kernels, a layer multiplies in ``expandr::int8_product``
    (`kernels`; `_OwnInt8Linear`) instead of FBGEMM: VNNI's or AVX2's integer sums of the same uint8 codes and int8
    weights and FBGEMM's epilogue, so FBGEMM's products bit for bit (checked per layer when it is built, else the
    layer keeps FBGEMM), with the weights streamed from memory ~1.9x faster at a decode step's 16 rows; its copy of
    the weights (`pack_product_weights`) replaces FBGEMM's.

  On SmolLM2-135M-Instruct with AVX512-VNNI int8 is ~1.7x the float32 packed decoder's tokens/s with expand
  nDCG@10 not measurably different (docs/benchmarks.md, "Expansion at int8"). Text differs from float32 text
  wherever a draw falls near a boundary, so int8 texts are cached apart (`LocalSampler.engine`), and 7-bit-weight
  texts apart from 8-bit ones. Needs FBGEMM: x86 CPUs with AVX2 (`int8_unsupported_reason`);
* ``"bfloat16"``: weights and activations rounded to bfloat16 through oneDNN (`_Bfloat16Linear`), only on CPUs with
  native bfloat16 dot products (AVX512-BF16 or AMX, detected at run time; on AVX2/AVX-512 without them oneDNN
  emulates bfloat16 and it is 3-5x slower than float32, so it is refused there: `bfloat16_unsupported_reason`);
* ``"auto"``: `resolve_precision` - the fastest precision measured faster than float32 end to end on this kind of
  CPU with retrieval quality unchanged: int8 where FBGEMM runs, float32 elsewhere.

The linear layers are ``torch.nn.Module``s that `packed_llama.script_body` compiles with TorchScript as part of the
decoder's layers, which is why this module, like `packed_llama`, has no ``from __future__ import annotations``
(TorchScript reads the class annotations).
"""

import functools
import os
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from expandr_haystack.checks import check_choice
from expandr_haystack.options import WEIGHT_PRECISIONS

#: SmoothQuant's migration strength: how much of an input channel's range moves into the weights (0.5: the most
#: accurate of 0.3-0.8 on SmolLM2, docs/benchmarks.md).
SMOOTHING_ALPHA = 0.5

#: Weight precisions of the packed decoder (`LocalSampler(weight_precision=...)`, `SamplerOptions.weight_precision`).
PRECISIONS = WEIGHT_PRECISIONS


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as the kernel reports them (``/proc/cpuinfo``; empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


#: `FBGEMM_ENABLE_INSTRUCTIONS` values that hold FBGEMM to kernels without VNNI on any CPU (FBGEMM's own switch;
#: "AVX512_E1" and "AVX512_E1_256" are its VNNI sets, anything else is ignored by it).
NO_VNNI_SETTINGS = ("AVX2", "AVX512", "AVX512_256")


def fbgemm_has_vnni() -> bool:
    """Whether FBGEMM runs its AVX512-VNNI int8 kernels here: the CPU has AVX512-VNNI and FBGEMM's switch
    ``FBGEMM_ENABLE_INSTRUCTIONS`` does not hold it to AVX2/AVX-512 (how the AVX2 path is run on a VNNI CPU)."""
    setting = os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS", "").strip().upper()
    return "avx512_vnni" in cpu_flags() and setting not in NO_VNNI_SETTINGS


def int8_weight_levels() -> int:
    """Weight levels per sign of the int8 path on this CPU: 127 with FBGEMM's VNNI kernels (exact 32-bit sums),
    else 64, so that FBGEMM's int16 pair sums of uint8 codes times weights cannot saturate (``255 * 64 * 2 <=
    32,767``; the module docstring)."""
    return 127 if fbgemm_has_vnni() else 64


def int8_unsupported_reason() -> str | None:
    """
    Why the int8 path cannot run here (None when it can): it needs FBGEMM, torch's x86 int8 kernels, which need
    AVX2 (no ARM CPU has them). Without AVX512-VNNI it runs with 7-bit weights (`int8_weight_levels`).
    """
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return "this torch build has no FBGEMM int8 kernels"
    if "avx2" not in cpu_flags():
        return "the CPU has no AVX2, which FBGEMM's int8 kernels need (x86 only)"
    return None


#: Where oneDNN has AMX (`onednn_int8_unsupported_reason`), `_Int8Linear` multiplies with oneDNN's int8 kernel
#: instead of FBGEMM's from the row count at which a product takes `ONEDNN_MIN_MULTIPLY_ADDS` (rows x out x in), and
#: `ONEDNN_MIN_ROWS` at least: oneDNN's calls cost more to start and stream faster. For these shapes: q|k|v from 51
#: rows, o from 85, gate|up from 16, down from 32, the head from 8. Measured on SmolLM2-135M's shapes
#: (2-vCPU Xeon with AMX; ms for 30 products, FBGEMM / oneDNN): q|k|v 960 x 576 at 16 rows 1.41 / 1.75, at 48 rows
#: 2.60 / 2.30; gate|up 3072 x 576 at 8 rows 2.67 / 2.78, at 16 rows 3.82 / 3.03; down 576 x 1536 at 24 rows
#: 2.24 / 2.35, at 32 rows 2.86 / 2.52; the head 49152 x 576 (one product) at 8 rows 0.94 / 0.80, at 16 rows
#: 1.52 / 0.90; at one row oneDNN is slower on every shape (docs/benchmarks.md, "oneDNN's int8 product with AMX").
ONEDNN_MIN_MULTIPLY_ADDS = 28_000_000
ONEDNN_MIN_ROWS = 8


def onednn_int8_unsupported_reason() -> str | None:
    """
    Why `_Int8Linear` keeps to FBGEMM here (None when it also packs its weights for oneDNN's int8 kernel): oneDNN is
    the faster of the two for the larger products (`ONEDNN_MIN_MULTIPLY_ADDS`) only with AMX (AMX-INT8 tiles that
    the OS enables, oneDNN not held below them by its ``ONEDNN_MAX_CPU_ISA`` switch); with AVX512-VNNI alone it is no
    faster in the decoder (the same step time at batch 16, 2026-12-06), under AVX2 it is 3x slower.
    """
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.onednn, "qlinear_pointwise"):
        return "this torch build has no oneDNN int8 linear"
    if "amx_int8" not in cpu_flags():
        return "the CPU has no AMX-INT8"
    is_amx_tile_supported = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if is_amx_tile_supported is not None and not is_amx_tile_supported():
        return "the OS does not enable AMX tiles for this process"
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if isa not in ("", "ALL", "DEFAULT") and "AMX" not in isa:
        return f"ONEDNN_MAX_CPU_ISA={isa} holds oneDNN below AMX"
    return None


def bfloat16_unsupported_reason() -> str | None:
    """Why the bfloat16 path is refused here (None when the CPU has native bfloat16: AVX512-BF16 or AMX-BF16)."""
    flags = cpu_flags()
    if not ({"avx512_bf16", "amx_bf16"} & flags):
        return "the CPU has no native bfloat16 (AVX512-BF16 or AMX-BF16); emulated, it is 3-5x slower than float32"
    if not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "this torch build has no oneDNN bfloat16 support"
    return None


def auto_precision() -> tuple[str, str]:
    """
    What ``"auto"`` resolves to on this machine, and why, in words for a log line: "int8" where FBGEMM runs (x86 with
    AVX2: ~1.7x the packed float32 decoder's tokens/s with AVX512-VNNI, expand nDCG@10 not measurably different with
    8-bit or 7-bit weights; docs/benchmarks.md "Expansion at int8" and "int8 without VNNI"), else "float32"
    (bfloat16 is unmeasured where native).
    """
    reason = int8_unsupported_reason()
    if reason is not None:
        return "float32", f"int8 cannot run here ({reason})"
    kernels = ("FBGEMM's AVX512-VNNI kernels, 8-bit weights" if fbgemm_has_vnni() else
               "FBGEMM's kernels without VNNI, 7-bit weights")
    if onednn_int8_unsupported_reason() is None:
        kernels += "; oneDNN's AMX kernels for the larger products"
    return "int8", f"the fastest precision that runs here ({kernels}), with expansion quality measured unchanged"


def resolve_precision(precision: str) -> str:
    """
    The weight precision `precision` runs in on this machine: "auto" = `auto_precision`'s choice; an explicit
    precision the machine cannot run is a ValueError naming the argument.
    """
    check_choice(precision, "weight_precision", PRECISIONS)
    if precision == "auto":
        return auto_precision()[0]
    reason = {"int8": int8_unsupported_reason, "bfloat16": bfloat16_unsupported_reason}.get(precision,
                                                                                          lambda: None)()
    if reason is not None:
        raise ValueError(f"`weight_precision`={precision!r} cannot run here: {reason}. Use 'float32' or 'auto'.")
    return precision


def quantize_per_channel(weight: torch.Tensor, levels: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 weights, one scale per output channel (row): ``weight ~ scales[:, None] * q`` with
    ``scales = max|row| / levels`` (1 for an all-zero row) and ``q = round(weight / scales)`` in [-levels, levels]
    (`levels` 127, or 64 for FBGEMM's kernels without VNNI: `int8_weight_levels`)."""
    weight = weight.detach().to(torch.float32)
    scales = weight.abs().amax(dim=1) / float(levels)
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.empty(weight.shape, dtype=torch.int8)
    for start in range(0, len(weight), 4096):  # in row blocks: the vocabulary head's float temporaries were 450 MB
        rows = slice(start, start + 4096)
        q[rows] = torch.round(weight[rows] / scales[rows, None]).clamp_(-levels, levels)
    return q, scales


def fbgemm_input_grid() -> tuple[float, int, int]:
    """
    ``(scale, zero point, largest code)`` of the uint8 grid for inputs in exactly [-1, 1] (8-bit inputs, no
    `reduce_range`): the grid FBGEMM's dynamic linear chooses for that range (its ``ChooseQuantizationParams`` over
    codes 0..255), ``scale = 2 / 255``, zero point ``nearbyint(127.5) = 128`` (half to even), which `_Int8Linear`
    gives its kernel. Tested against the kernel.
    """
    return 2.0 / 255, 128, 255


def grid_midpoint_rows(rows: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """
    Rows [rows, width] in [-1, 1] whose largest magnitude is 1 (so `int8_row_input` leaves them as they are) and whose
    other values are the midpoints between neighbouring codes of the input grid (`fbgemm_input_grid`) and the float32
    values just either side of them, drawn at random: the inputs on which two ways of rounding to the grid disagree,
    if they disagree at all (on random inputs ~1 value in 50,000 is that close).
    """
    scale, zero_point, largest = fbgemm_input_grid()
    midpoints = ((torch.arange(largest, dtype=torch.float64) + 0.5 - zero_point) * scale).float()
    values = torch.cat([torch.nextafter(midpoints, torch.tensor(-2.0)), midpoints,
                        torch.nextafter(midpoints, torch.tensor(2.0))])
    values = values[values.abs() <= 1]  # (the lowest midpoint is -1 itself)
    x = values[torch.randint(len(values), (rows, width), generator=generator)]
    x[:, 0] = 1.0
    return x


def int8_row_input(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """
    `x` [rows, k] laid out for an 8-bit kernel with one fixed grid for [-1, 1] (`fbgemm_input_grid`), so that each row
    is quantized on its own scale and does not depend on its neighbours: ``(x / a, a)`` with ``a = max|x|`` per row
    [rows, 1] (every row in [-1, 1], its largest entry at +-1): ``x W^T ~ a K(x / a)``, each input rounded to half a
    grid step (1/255) of its row's largest value.
    """
    # abs + amax: 2x faster than aminmax at 16 rows and 4x at 640 (vector_norm(inf) is slower still)
    a = x.abs().amax(dim=-1, keepdim=True).clamp_min_(1.1754943508222875e-38)  # float32's tiny: 0 rows stay 0
    return x / a, a


def rms_factor(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """RMSNorm's per-row factor ``1 / sqrt(mean(x^2) + eps)`` of `x` [rows, k] as [rows, 1], in three calls (`eps`
    a 0-d tensor)."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return torch.rsqrt(torch.addcmul(eps, norm, norm, value=1.0 / x.shape[-1]))


def smoothing_scales(input_max: torch.Tensor, weight: torch.Tensor, alpha: float = SMOOTHING_ALPHA) -> torch.Tensor:
    """
    SmoothQuant's per-input-channel scales ``c_j = max|x_j|^alpha / max_n |W_nj|^(1 - alpha)`` for a linear layer
    `weight` [out, in] whose inputs reach ``max|x_j|`` = `input_max` [in]: ``x W^T = (x / c) (W * c)^T`` exactly,
    and both ``x / c`` and ``W * c`` have flatter channel ranges than ``x`` and ``W`` (equal at alpha 0.5).
    Channels never seen active (or all-zero weight columns) get scales clamped to 1e-5, never 0 or inf.
    """
    floor = 1e-5
    scales = input_max.clamp_min(floor) ** alpha / weight.abs().amax(dim=0).clamp_min(floor) ** (1.0 - alpha)
    return scales.clamp_min(floor)


@torch.inference_mode()
def input_maxima(model, calibration: list[list[int]]) -> dict[tuple[int, str], torch.Tensor]:
    """
    ``max|x_j|`` per input channel of every linear layer of the Llama `model`, over the float32 forward passes of
    the token id lists `calibration` (natural prompts: random tokens calibrate worse, docs/benchmarks.md): keys
    ``(layer, "qkv" | "o" | "gate_up" | "down")`` and ``(-1, "head")``. The hooks sit on `model` for the duration:
    do not run the same model in another thread meanwhile (`local.default_decoder` builds decoders under a lock).

    The passes run on one thread (torch's thread count is restored after): the float32 kernels round differently with
    the number of threads, the int8 weights follow the maxima, and so the int8 text would depend on the process's
    thread count (a `torchrun` worker with ``OMP_NUM_THREADS=1`` wrote other expansions than a 2-thread process).
    """
    if not calibration or not all(calibration):
        raise ValueError("`calibration` must be a non-empty list of non-empty token id lists (the int8 path's "
                         f"smoothing is measured on them); got {calibration!r:.80}.")
    maxima: dict[tuple[int, str], torch.Tensor] = {}

    def record(key):
        def hook(module, args):
            seen = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(dim=0).float()
            maxima[key] = torch.maximum(maxima[key], seen) if key in maxima else seen
        return hook

    body = model.model
    modules = {(-1, "head"): model.lm_head}
    for i, layer in enumerate(body.layers):
        modules.update({(i, "qkv"): layer.self_attn.q_proj, (i, "o"): layer.self_attn.o_proj,
                        (i, "gate_up"): layer.mlp.gate_proj, (i, "down"): layer.mlp.down_proj})
    hooks = [module.register_forward_pre_hook(record(key)) for key, module in modules.items()]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for ids in calibration:
            model(input_ids=torch.tensor([ids]), use_cache=False)
    finally:
        torch.set_num_threads(threads)
        for hook in hooks:
            hook.remove()
    return maxima


def rms_norm(x: torch.Tensor, eps: float | None, scale: torch.Tensor | None) -> torch.Tensor:
    """A linear layer's float input: ``scale * (x / sqrt(mean(x^2) + eps))`` (Llama's RMSNorm, the same ops in the
    same order as ``transformers``' ``LlamaRMSNorm``), either part skipped when None."""
    if eps is not None:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x if scale is None else scale * x


def onednn_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """oneDNN's linear on a weight prepacked by ``torch.ops.mkldnn._reorder_linear_weight``, no bias, no post-op."""
    no_scalars = torch.jit.annotate(list[float | int | complex | None], [])  # typed for TorchScript
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", no_scalars, "")


# The layers are torch.nn.Modules written for TorchScript (`packed_llama.script_body`): attributes that may be None
# are declared on the class (TorchScript reads these annotations; the module has no `from __future__ import
# annotations` for it).


class _LinearLayer(torch.nn.Module):
    """What the packed layers call besides ``forward(x, residual=None)``: ``gated``."""

    def gated(self, gate_up: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``linear(silu(gate) * up, residual)`` for `gate_up` [rows, 2 * in] = [gate | up] (the MLP's down
        projection)."""
        half = gate_up.shape[1] // 2
        return self.forward(F.silu(gate_up[:, :half]).mul_(gate_up[:, half:]), residual)


class _Int8Linear(_LinearLayer):
    """
    A bias-free linear layer with per-output-channel int8 weights, run by FBGEMM on one 8-bit grid per input row
    (see the module docstring), on ``scale * x`` or, with `eps`, on ``scale * RMSNorm(x)``: RMSNorm multiplies each
    row by one factor (`rms_factor`), which leaves the row's 8-bit codes as they are, so it is applied to the
    output's row scale instead of the input (one [rows, 1] product instead of three ops on the whole input).
    `levels`: the weights' levels per sign (None = `int8_weight_levels`, what this CPU's FBGEMM kernels take exactly).
    `onednn`: also hold the weights for oneDNN's int8 kernel and multiply there from `onednn_min_rows` rows (None =
    where `onednn_int8_unsupported_reason` allows it); dropped again, FBGEMM alone, if oneDNN's products are not
    FBGEMM's bit for bit (`onednn_equals_fbgemm`) or oneDNN fails on them.
    """

    scale: torch.Tensor | None
    eps: torch.Tensor | None
    levels: int
    input_scale: float
    input_zero_point: int
    onednn: torch.Tensor | None
    onednn_min_rows: int

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor | None = None, eps: float | None = None,
                 levels: int | None = None, onednn: bool | None = None):
        super().__init__()
        self.levels = int8_weight_levels() if levels is None else levels
        q, scales = quantize_per_channel(weight, self.levels)
        with warnings.catch_warnings():  # quantized tensors are deprecated in recent torch, still the FBGEMM API
            warnings.simplefilter("ignore")
            quantized = torch._make_per_channel_quantized_tensor(q, scales.double(),
                                                                 torch.zeros(len(scales), dtype=torch.long), 0)
            self.packed = torch.ops.quantized.linear_prepack(quantized, None)
        self.scale, self.eps = scale, None if eps is None else torch.tensor(eps)
        self.input_scale, self.input_zero_point = fbgemm_input_grid()[:2]
        # oneDNN's copy of the same int8 weights (AMX CPUs, `onednn_int8_unsupported_reason`), for products of
        # `onednn_min_rows` rows and more (`ONEDNN_MIN_MULTIPLY_ADDS`); kept only where its products equal FBGEMM's
        # bit for bit (checked here), so the text does not depend on which kernel ran
        self.onednn, self.onednn_min_rows = None, max(ONEDNN_MIN_ROWS, -(-ONEDNN_MIN_MULTIPLY_ADDS // q.numel()))
        # oneDNN is given FBGEMM's one float scale per output (input scale x weight scale, rounded once) and input
        # scale 1: it then rounds as FBGEMM does, on its AMX and its AVX512-VNNI kernels alike (given the two scales,
        # its VNNI kernels' products differ from FBGEMM's in the last bit)
        self.output_scales = torch.tensor(self.input_scale, dtype=torch.float32) * scales.float()
        self.weight_zero_points = torch.zeros(len(scales), dtype=torch.int32)
        if onednn is None:
            onednn = onednn_int8_unsupported_reason() is None
        if onednn:
            try:
                self.onednn = torch.ops.onednn.qlinear_prepack(q, None)
                if not self.onednn_equals_fbgemm(q.shape[1]):
                    self.onednn = None
            except RuntimeError:  # a oneDNN that cannot run this product here: FBGEMM alone
                self.onednn = None

    def onednn_equals_fbgemm(self, in_features: int) -> bool:
        """Whether oneDNN's product equals FBGEMM's bit for bit (`agrees_with_fbgemm`) at row counts around the ones
        it gets (the smallest it may get, a decode batch, odd counts over one and several 16-row tiles, the layer's
        own threshold); ~0.6 s for the bundled model's 121 products, once, when the decoder is built."""
        counts = sorted({ONEDNN_MIN_ROWS, 13, 16, 37, 100, min(self.onednn_min_rows, 512)})
        return self.agrees_with_fbgemm(lambda x: self.product(x, True), in_features, counts, midpoint_rows=37, seed=0)

    def agrees_with_fbgemm(self, product: Callable[[torch.Tensor], torch.Tensor], in_features: int,
                           counts: list[int], midpoint_rows: int, seed: int) -> bool:
        """Whether `product` of rows in [-1, 1] (each with an entry at +-1, as `int8_row_input` makes them) equals
        FBGEMM's bit for bit, on fixed pseudo-random rows of each of `counts` rows and on `midpoint_rows` rows of the
        grid's midpoints (`grid_midpoint_rows`: where another kernel's codes would show)."""
        generator = torch.Generator().manual_seed(seed)
        inputs = [int8_row_input(torch.rand(rows, in_features, generator=generator) * 2 - 1)[0] for rows in counts]
        inputs.append(grid_midpoint_rows(midpoint_rows, in_features, generator))
        return all(torch.equal(product(x), self.product(x, False)) for x in inputs)

    def product(self, rows: torch.Tensor, onednn: bool) -> torch.Tensor:
        """The int8 product of `rows` [rows, in] already in [-1, 1] (`int8_row_input`), on the fixed input grid
        (`fbgemm_input_grid`): by oneDNN (`onednn`, where it holds the weights) or FBGEMM."""
        if onednn and self.onednn is not None:
            return self.onednn_product(torch.quantize_per_tensor(rows, self.input_scale, self.input_zero_point,
                                                                 torch.quint8).int_repr())
        # FBGEMM's dynamic linear with its input grid given (no min/max pass): 8-bit inputs
        return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(rows, self.input_scale,
                                                                                 self.input_zero_point, self.packed)

    def onednn_product(self, codes: torch.Tensor) -> torch.Tensor:
        """oneDNN's int8 product of the uint8 input `codes` [rows, in] (where it holds the weights)."""
        packed = self.onednn
        assert packed is not None
        return onednn_codes_product(codes, packed, self.input_zero_point, self.output_scales, self.weight_zero_points)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``linear(x)`` for `x` [rows, in], plus `residual` [rows, out] when given (one fused op)."""
        scale, eps = self.scale, self.eps
        rows, a = int8_row_input(x if scale is None else x * scale)
        if eps is not None:
            a = a * rms_factor(x, eps)
        return self.scaled_product(rows, a, residual)

    def scaled_product(self, rows: torch.Tensor, a: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """``a * K(rows)`` (`rows` in [-1, 1], `a` their row scales [rows, 1]), plus `residual` when given."""
        return scaled_rows(self.product(rows, rows.shape[0] >= self.onednn_min_rows), a, residual)


def onednn_codes_product(codes: torch.Tensor, packed: torch.Tensor, zero_point: int, scales: torch.Tensor,
                         zero_points: torch.Tensor) -> torch.Tensor:
    """oneDNN's int8 product of uint8 input `codes` [rows, in] with zero point `zero_point` by the weights `packed`
    (``onednn::qlinear_prepack``), given FBGEMM's one scale per output `scales` and input scale 1, so that it rounds as
    FBGEMM does (given the two scales, its VNNI kernels' products differ from FBGEMM's in the last bit)."""
    no_scalars = torch.jit.annotate(list[float | int | complex | None], [])  # typed for TorchScript
    return torch.ops.onednn.qlinear_pointwise(codes, 1.0, zero_point, packed, scales, zero_points, None, 1.0, 0,
                                              torch.float32, "none", no_scalars, "")


def scaled_rows(y: torch.Tensor, a: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """``a * y`` (`a` the row scales [rows, 1], `y` scaled in place), or ``residual + a * y`` in one op."""
    return y.mul_(a) if residual is None else torch.addcmul(residual, y, a)


def pack_product_weights(q: torch.Tensor, block: int) -> torch.Tensor:
    """The int8 weights `q` [out, in] in ``expandr::int8_product``'s layout: [out / block, in / 4, block, 4], the
    four inputs of one output adjacent, `block` outputs side by side (16 for AVX512-VNNI, 8 for AVX2)."""
    out_features, in_features = q.shape
    return q.reshape(out_features // block, block, in_features // 4, 4).permute(0, 2, 1, 3).contiguous()


class _FusedInt8Linear(_Int8Linear):
    """`_Int8Linear` whose input is prepared by one fused kernel (`kernels`: ``expandr::row_input``, and
    ``expandr::gated_row_input`` for the MLP's ``silu(gate) * up``) instead of six to nine torch ops: the same math,
    other rounding in the RMSNorm factor and silu. `make_linear` hands it to `_OwnInt8Linear` where the kernels' own
    product gives FBGEMM's products (`own_product_weights`)."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.onednn is not None and x.shape[0] >= self.onednn_min_rows:  # oneDNN's input: the uint8 codes at once
            codes, a = torch.ops.expandr.row_codes(x, self.scale, self.eps, self.input_scale, self.input_zero_point)
            return scaled_rows(self.onednn_product(codes), a, residual)
        rows, a = torch.ops.expandr.row_input(x, self.scale, self.eps)
        return self.scaled_product(rows, a, residual)

    def onednn_equals_fbgemm(self, in_features: int) -> bool:
        """`_Int8Linear.onednn_equals_fbgemm`, and the fused kernel's uint8 codes equal `quantize_per_tensor`'s on
        the same inputs (what that check's oneDNN products were given)."""
        if not _Int8Linear.onednn_equals_fbgemm(self, in_features):
            return False
        generator = torch.Generator().manual_seed(1)
        for rows in (ONEDNN_MIN_ROWS, 37):
            x = torch.randn(rows, in_features, generator=generator) * torch.rand(rows, 1, generator=generator) * 10
            if rows == 37:  # the grid's midpoints (x 4: the division by the row's largest value stays exact), where
                x = grid_midpoint_rows(rows, in_features, generator) * 4  # a rounding other than FBGEMM's shows
            codes, _ = torch.ops.expandr.row_codes(x, None, None, self.input_scale, self.input_zero_point)
            rows_in, _ = int8_row_input(x)
            expected = torch.quantize_per_tensor(rows_in, self.input_scale, self.input_zero_point, torch.quint8)
            if not torch.equal(codes, expected.int_repr()):
                return False
        return True

    def gated(self, gate_up: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """(For a layer without `scale` and `eps`, as the down projection is: smoothing folds into up's rows.)"""
        rows, a = torch.ops.expandr.gated_row_input(gate_up)
        return self.scaled_product(rows, a, residual)

    def own_product_weights(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This layer's weights for ``expandr::int8_product`` (`pack_product_weights`) and the zero point's share of
        each output (zero point x the output's weight sum), where the kernel gives FBGEMM's products bit for bit here
        (random rows and the grid's midpoints, 1 to 23 rows); None where it does not, or the shape does not fit its
        blocks, or the AVX2 kernel would meet 8-bit weights (it sums input pairs in int16: exact within +-64, FBGEMM's
        own limit there)."""
        block = int(torch.ops.expandr.int8_product_block())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = self.packed.unpack()[0].int_repr()
        out_features, in_features = q.shape
        if not block or out_features % block or in_features % 4 or (block != 16 and self.levels > 64):
            return None
        weights = pack_product_weights(q, block)
        offsets = (self.input_zero_point * q.sum(1, dtype=torch.int32)).to(torch.int32)

        def own(x: torch.Tensor) -> torch.Tensor:
            codes, _ = torch.ops.expandr.row_codes(x, None, None, self.input_scale, self.input_zero_point)
            return torch.ops.expandr.int8_product(codes, weights, offsets, self.output_scales)

        agrees = self.agrees_with_fbgemm(own, in_features, [1, 7, 16], midpoint_rows=23, seed=2)
        return (weights, offsets) if agrees else None


class _OwnInt8Linear(_LinearLayer):
    """
    A `_FusedInt8Linear` that multiplies with the kernels' own int8 product (``expandr::int8_product``: VNNI's or
    AVX2's integer sums of the same uint8 codes and int8 weights, FBGEMM's epilogue, so FBGEMM's products bit for bit,
    checked by `_FusedInt8Linear.own_product_weights`) instead of FBGEMM's, whose copy of the weights it drops; and
    with oneDNN's from `onednn_min_rows` rows where the layer holds oneDNN's (AMX). 121 products of SmolLM2-135M's
    shapes, their weights streamed from memory, ms (2-vCPU Xeon, 2026-12-06; FBGEMM, or oneDNN where it runs / this
    kernel): VNNI alone at 1, 4, 16, 32, 64 rows 12.1 / 12.6, 15.5 / 11.2, 19.7 / 10.4, 26.4 / 17.3, 43.6 / 33.4;
    with AMX 11.7 / 11.8, 14.4 / 10.9, 18.3 / 9.7, 25.4 / 18.0, 30.7 / 33.0; AVX2 (7-bit weights) at 1, 4, 16, 32
    rows 13.3 / 10.4, 14.9 / 9.9, 24.8 / 18.5, 38.1 / 33.1 (docs/benchmarks.md, "An int8 product for few rows";
    the one-row figures predate its fix there: in the decoder one row now takes 6.8-7.1 ms a step against 8.3).
    """

    scale: torch.Tensor | None
    eps: torch.Tensor | None
    onednn: torch.Tensor | None
    onednn_min_rows: int
    input_scale: float
    input_zero_point: int

    def __init__(self, fused: _FusedInt8Linear, weights: torch.Tensor, offsets: torch.Tensor):
        super().__init__()
        self.scale, self.eps, self.levels = fused.scale, fused.eps, fused.levels
        self.input_scale, self.input_zero_point = fused.input_scale, fused.input_zero_point
        self.onednn, self.onednn_min_rows = fused.onednn, fused.onednn_min_rows
        self.output_scales, self.weight_zero_points = fused.output_scales, fused.weight_zero_points
        self.product_weights, self.product_offsets = weights, offsets

    def product(self, codes: torch.Tensor) -> torch.Tensor:
        """The int8 product of the uint8 input `codes` [rows, in]: oneDNN's from its threshold where it holds the
        weights, else the kernels' own."""
        onednn = self.onednn
        if onednn is not None and codes.shape[0] >= self.onednn_min_rows:
            return onednn_codes_product(codes, onednn, self.input_zero_point, self.output_scales,
                                        self.weight_zero_points)
        return torch.ops.expandr.int8_product(codes, self.product_weights, self.product_offsets, self.output_scales)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        codes, a = torch.ops.expandr.row_codes(x, self.scale, self.eps, self.input_scale, self.input_zero_point)
        return scaled_rows(self.product(codes), a, residual)

    def gated(self, gate_up: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """`_FusedInt8Linear.gated`, on codes: the gated rows' largest magnitude is already 1 (x / x is exactly 1),
        so their codes are the ones FBGEMM would make of them."""
        rows, a = torch.ops.expandr.gated_row_input(gate_up)
        codes, _ = torch.ops.expandr.row_codes(rows, None, None, self.input_scale, self.input_zero_point)
        return scaled_rows(self.product(codes), a, residual)


class _Bfloat16Linear(_LinearLayer):
    """A bias-free linear layer with bfloat16 weights prepacked for oneDNN (activations rounded to bfloat16), on
    ``rms_norm(x, eps, scale)``."""

    scale: torch.Tensor | None
    eps: float | None

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor | None = None, eps: float | None = None):
        super().__init__()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(torch.bfloat16).contiguous())
        self.scale, self.eps = scale, eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        h = rms_norm(x, self.eps, self.scale).to(torch.bfloat16)
        y = onednn_linear(h, self.packed).float()
        return y if residual is None else residual + y


class _Linear(_LinearLayer):
    """
    A bias-free float32 linear layer on ``rms_norm(x, eps, scale)`` whose weight is prepacked for oneDNN (plain
    ``F.linear`` where oneDNN is absent).
    """

    scale: torch.Tensor | None
    eps: float | None
    weight: torch.Tensor | None
    packed: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor | None = None, eps: float | None = None):
        super().__init__()
        self.weight = weight.detach().to(torch.float32).contiguous()
        self.scale, self.eps = scale, eps
        self.packed = None
        if torch.backends.mkldnn.is_available():
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight)
                self.weight = None  # the packed copy is all that is used (fused weights are not kept twice)
            except (RuntimeError, AttributeError):
                self.packed = None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        h = rms_norm(x, self.eps, self.scale)
        packed, weight = self.packed, self.weight
        if packed is not None:
            y = onednn_linear(h, packed)
        else:
            assert weight is not None
            y = F.linear(h, weight)
        return y if residual is None else residual + y


def make_linear(weight: torch.Tensor, precision: str = "float32", scale: torch.Tensor | None = None,
                eps: float | None = None, fused: bool = False) -> torch.nn.Module:
    """
    The linear layer of `weight` [out, in] in a resolved `precision` ("float32", "int8" or "bfloat16"), applied to
    ``scale * x`` (a per-input-channel `scale`: an RMSNorm weight, a smoothing divisor's inverse), with `eps` to
    ``scale * RMSNorm(x)``. Called as ``linear(x [rows, in], residual=None)``; the result plus `residual` when
    given; ``linear.gated(gate_up, residual=None)`` is ``linear(silu(gate) * up, residual)``. `fused`: int8's input
    prepared by the fused kernels (`kernels`, loaded by the caller).
    """
    if fused and precision == "int8":
        layer = _FusedInt8Linear(weight, scale, eps)
        own = layer.own_product_weights()
        return layer if own is None else _OwnInt8Linear(layer, *own)
    return {"float32": _Linear, "int8": _Int8Linear, "bfloat16": _Bfloat16Linear}[precision](weight, scale, eps)
