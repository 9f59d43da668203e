"""
A fast float32 CPU decoder for Llama-architecture causal LMs (SmolLM2, Llama 2/3, TinyLlama, ...).

Same float32 math as ``transformers``' ``LlamaForCausalLM`` (logits agree to ~1e-5), so sampling with the same
per-row seeds gives the same text except where a draw falls within float rounding of a nucleus boundary. The speed
comes from doing less, not from lower precision:

* weights prepacked once for oneDNN (``torch.ops.mkldnn._reorder_linear_weight``), the layout ``torch.compile``'s
  freezing pass uses, instead of re-laying them out on every matmul;
* fused projections: one ``q|k|v`` matmul and one ``gate|up`` matmul per layer instead of five;
* a preallocated KV cache written in place (no ``torch.cat`` per step), rotary tables computed once per batch, the
  attention mask turned into its additive bias once per step for all layers;
* each RMSNorm applied by the linear layer after it (`make_linear`'s ``scale``/``eps``; the same ops as
  ``transformers``' in float32), activations kept 2-D ([tokens, hidden]) between the layers;
* grouped-query attention without ``repeat_kv``: at decode the query heads sharing a KV head are laid out as that
  head's query "positions", so one ``scaled_dot_product_attention`` call covers them;
* a prompt shared by several rows (several samples of one query) is prefilled once and its KV copied;
* the layers compiled by TorchScript (`script_body`): a decode step is ~2,000 small tensor ops, and the Python
  between them was ~30% of it; compiled, the same ops run bit for bit without it (decode step 69 vs 82 ms in
  float32, 38 vs 56 ms in int8, 16 rows, 2 cores). Where TorchScript cannot compile them they run in Python.

Weight precision (``precision=``, issue 15). At batch 16 a decode step is memory-bound: it streams every weight once
per token (~540 MB in float32 for SmolLM2-135M, the 113 MB vocabulary head included), so smaller weights are faster
weights:

* ``"float32"`` (default): the exact path above;
* ``"int8"``: every projection and the vocabulary head hold int8 weights with one symmetric scale per output channel
  (``w ~ s_n * q_n``, ``s_n = max|w_n| / 127``), multiplied by FBGEMM's int8 kernel
  (``torch.ops.quantized.linear_dynamic``: 4x fewer weight bytes, integer dot products on 8-bit inputs). Two things
  keep the 8-bit inputs from being the large error:

  - **smoothing** (SmoothQuant, Xiao et al. 2023): a few input channels of a Llama carry activations 10-100x the
    others', so one 8-bit grid per row rounds the rest to a handful of levels. Each linear layer ``y = x W^T`` is
    rewritten exactly as ``y = (x / c) (W * c)^T`` with, per input channel ``j``,
    ``c_j = max|x_j|^alpha / max|W_{:,j}|^(1-alpha)`` (``alpha`` = `SMOOTHING_ALPHA`), the activation maxima
    ``max|x_j|`` read from the float32 model on a few natural prompts (`calibration`, `input_maxima`); ``1 / c``
    is folded into the RMSNorm weight before ``q|k|v``, ``gate|up`` and the head, into the ``up`` rows before
    ``down`` (``down``'s input is ``silu(gate) * up``), and applied at run time before ``o`` only;
  - **one grid per row**: FBGEMM quantizes its whole input with one range, which would couple the rows of a batch.
    Each row is passed over its own ``max|x|`` (so it lies in [-1, 1]), with a constant sentinel row
    ``[-1, 1, 0, ...]`` that pins the range to exactly [-1, 1] whatever the batch (`int8_row_input`): each row's
    codes are its own, and the result is rescaled by the row's maximum;
  - **norms in the row scale**: RMSNorm multiplies a row by one factor, which leaves the row's codes unchanged, so
    a layer after a norm quantizes ``norm weight * x`` and multiplies its output's row scale by the norm's factor
    (`rms_factor`); the residual add is fused with that rescaling (``addcmul``): ~250 fewer ops a step.

  Measured on SmolLM2-135M-Instruct (AVX-512 VNNI, 2 cores): next-token KL 0.014 nats to float32 and the greedy
  token float32's 97% of the time (8 prompts x 24 teacher-forced steps; 0.017 before the norms moved into the row
  scales, 0.038 without smoothing, 0.004 for the two-level inputs this path used before, which made it slower than
  float32); **5.25x** raw ``generate``'s tokens/s, 1.72x the float32 packed decoder's; expand nDCG@10 on Cranfield
  test 33.47 ± 1.90 vs float32's 32.55 ± 1.51 (3 seeds, +0.92, p 0.38: no measurable loss). Text differs from
  float32 text wherever a draw falls near a boundary, so int8 texts are cached apart (`LocalSampler.engine`).
  Needs AVX512-VNNI: without it FBGEMM's inputs are 7-bit (KL 0.044 where 8 bits gave 0.017, both measured before
  the norms moved into the row scales), so int8 is refused there;
* ``"bfloat16"``: weights and activations rounded to bfloat16 through oneDNN, only on CPUs with native bfloat16
  dot products (AVX512-BF16 or AMX, detected at run time; on AVX2/AVX-512 without them oneDNN emulates bfloat16
  and it is 3-5x slower than float32, so it is refused there);
* ``"auto"``: `resolve_precision` - the fastest precision measured faster than float32 end to end on this kind of
  CPU with retrieval quality unchanged: int8 on CPUs with AVX512-VNNI (1.72x float32's tokens/s), float32
  elsewhere.

Usage (``LocalSampler`` picks it by itself for a float32 Llama model on CPU):
```python
from expandr_haystack.generation.local import LocalSampler
from expandr_haystack.generation.packed_llama import PackedLlamaDecoder

sampler = LocalSampler(model, tokenizer, decoder=PackedLlamaDecoder(model))
fast = LocalSampler(model, tokenizer, precision="int8")  # calibrated on the tokenizer's prompts; or "auto"
```
"""

import functools
import logging
import warnings

import torch
import torch.nn.functional as F

from expandr_haystack.checks import check_choice

logger = logging.getLogger(__name__)

#: Prompt tokens prefilled at once (whole prompts, at least one): bounds the prefill's activations, not its speed
#: (the prompts' common prefix is one pass of its own before).
PREFILL_TOKENS = 1024

#: SmoothQuant's migration strength: how much of an input channel's range moves into the weights (0.5 measured
#: best of 0.3-0.8 on SmolLM2: KL 0.014 vs 0.020-0.032).
SMOOTHING_ALPHA = 0.5

#: Weight precisions of the packed decoder (`LocalSampler(precision=...)`, `LLMQueryExpander(precision=...)`).
PRECISIONS = ("auto", "float32", "int8", "bfloat16")


def unsupported_reason(model) -> str | None:
    """Why `model` cannot use the packed decoder (None when it can)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) != "llama":
        return f"model_type {getattr(config, 'model_type', None)!r} is not 'llama'"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "projections with bias"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r} is not 'silu'"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        return f"rope_type {rope.get('rope_type', rope.get('type'))!r} (only the default rotary embedding)"
    parameter = next(model.parameters())
    if parameter.device.type != "cpu":
        return f"device {parameter.device} (the packed decoder is for CPU)"
    if parameter.dtype != torch.float32:
        return f"dtype {parameter.dtype} (the packed decoder is float32)"
    return None


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


def int8_unsupported_reason() -> str | None:
    """
    Why the int8 path cannot run here (None when it can): it needs FBGEMM (x86) and AVX512-VNNI integer dot
    products. FBGEMM's kernels are AVX512-VNNI, AVX-512 or AVX2 ones (no AVX-VNNI set); without AVX512-VNNI its
    u8 x s8 pair sums saturate int16 unless the inputs use 7 bits (`reduce_range`), and 7-bit inputs lose too
    much: next-token KL 0.044 vs 0.017 on SmolLM2.
    """
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return "this torch build has no FBGEMM int8 kernels"
    if "avx512_vnni" not in cpu_flags():
        return ("the CPU has no AVX512-VNNI: FBGEMM would need 7-bit inputs there, too coarse (KL 0.044 to "
                "float32 vs 0.017 with 8 bits)")
    return None


def bfloat16_unsupported_reason() -> str | None:
    """Why the bfloat16 path is refused here (None when the CPU has native bfloat16: AVX512-BF16 or AMX-BF16)."""
    flags = cpu_flags()
    if not ({"avx512_bf16", "amx_bf16"} & flags):
        return "the CPU has no native bfloat16 (AVX512-BF16 or AMX-BF16); emulated, it is 3-5x slower than float32"
    if not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "this torch build has no oneDNN bfloat16 support"
    return None


def resolve_precision(precision: str) -> str:
    """
    The weight precision `precision` runs in on this machine. "auto" = the fastest precision whose exactness is
    acceptable: "int8" where it runs (FBGEMM with AVX512-VNNI: measured 1.72x the packed float32 decoder's
    tokens/s, 5.25x raw ``generate``, with expand nDCG@10 not measurably different over 3 seeds, +0.92 p 0.38;
    docs/benchmarks.md "Expansion at int8"), else "float32" (bfloat16 is unmeasured where native). An explicit
    precision the machine cannot run is a ValueError naming the argument.
    """
    check_choice(precision, "precision", PRECISIONS)
    if precision == "auto":
        return "int8" if int8_unsupported_reason() is None else "float32"
    reason = {"int8": int8_unsupported_reason, "bfloat16": bfloat16_unsupported_reason}.get(precision,
                                                                                          lambda: None)()
    if reason is not None:
        raise ValueError(f"`precision`={precision!r} cannot run here: {reason}. Use 'float32' or 'auto'.")
    return precision


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 weights, one scale per output channel (row): ``weight ~ scales[:, None] * q`` with
    ``scales = max|row| / 127`` (1 for an all-zero row) and ``q = round(weight / scales)`` in [-127, 127]."""
    weight = weight.detach().to(torch.float32)
    scales = weight.abs().amax(dim=1) / 127.0
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    return torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


def fbgemm_input_grid() -> tuple[float, int, int]:
    """
    ``(scale, zero point, largest code)`` of the uint8 grid FBGEMM's dynamic linear (8-bit inputs, no
    `reduce_range`) quantizes an input whose range is exactly [-1, 1] to (its ``ChooseQuantizationParams`` over
    codes 0..255): ``scale = 2 / 255``, zero point ``nearbyint(127.5) = 128`` (half to even). Tested against the
    kernel.
    """
    return 2.0 / 255, 128, 255


def int8_row_input(x: torch.Tensor, sentinel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """
    `x` [rows, k] laid out for a kernel that quantizes its whole input to 8 bits with one range (FBGEMM's dynamic
    linear), so that each row is quantized on its own scale and does not depend on its neighbours: the rows
    ``x / a`` with ``a = max|x|`` per row (every row in [-1, 1], its largest entry at +-1), then `sentinel` [1, k],
    the row ``[-1, 1, 0, ...]``, so the input's range is exactly [-1, 1] whatever the batch (`fbgemm_input_grid`).
    Returns ``(packed [rows + 1, k], a [rows, 1])``: ``x W^T ~ a K(packed)[:rows]``, each input rounded to half a
    grid step (1/255) of its row's largest value.
    """
    # abs + amax: 2x faster than aminmax at 16 rows and 4x at 640 (vector_norm(inf) is slower still)
    a = x.abs().amax(dim=-1, keepdim=True).clamp_min_(1.1754943508222875e-38)  # float32's tiny: 0 rows stay 0
    return torch.cat((x / a, sentinel)), a


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
    the token id lists `calibration` (natural prompts; random tokens calibrate worse: KL 0.022 vs 0.014 for
    Cranfield queries, 0.017 for the built-in texts): keys ``(layer, "qkv" | "o" | "gate_up" | "down")`` and
    ``(-1, "head")``. The hooks sit on `model` for the duration: do not run the same model in another thread
    meanwhile (`local.default_decoder` builds decoders under a lock).
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
    try:
        for ids in calibration:
            model(input_ids=torch.tensor([ids]), use_cache=False)
    finally:
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


# The layers are torch.nn.Modules written for TorchScript (`script_body`): attributes that may be None are declared
# on the class (TorchScript reads these annotations; the module has no `from __future__ import annotations` for it).


class _Int8Linear(torch.nn.Module):
    """
    A bias-free linear layer with per-output-channel int8 weights, run by FBGEMM on one 8-bit grid per input row
    (see the module docstring), on ``scale * x`` or, with `eps`, on ``scale * RMSNorm(x)``: RMSNorm multiplies each
    row by one factor (`rms_factor`), which leaves the row's 8-bit codes as they are, so it is applied to the
    output's row scale instead of the input (one [rows, 1] product instead of three ops on the whole input).
    """

    scale: torch.Tensor | None
    eps: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor | None = None, eps: float | None = None):
        super().__init__()
        q, scales = quantize_per_channel(weight)
        with warnings.catch_warnings():  # quantized tensors are deprecated in recent torch, still the FBGEMM API
            warnings.simplefilter("ignore")
            quantized = torch._make_per_channel_quantized_tensor(q, scales.double(),
                                                                 torch.zeros(len(scales), dtype=torch.long), 0)
            self.packed = torch.ops.quantized.linear_prepack(quantized, None)
        self.sentinel = torch.zeros(1, weight.shape[1])
        self.sentinel[0, 0], self.sentinel[0, -1] = -1.0, 1.0
        self.scale, self.eps = scale, None if eps is None else torch.tensor(eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``linear(x)`` for `x` [rows, in], plus `residual` [rows, out] when given (one fused op)."""
        scale, eps = self.scale, self.eps
        packed, a = int8_row_input(x if scale is None else x * scale, self.sentinel)
        if eps is not None:
            a = a * rms_factor(x, eps)
        y = torch.ops.quantized.linear_dynamic(packed, self.packed, False)[: x.shape[0]]  # 8-bit inputs
        return y.mul_(a) if residual is None else torch.addcmul(residual, y, a)


class _Bfloat16Linear(torch.nn.Module):
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


class _Linear(torch.nn.Module):
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
                eps: float | None = None) -> torch.nn.Module:
    """
    The linear layer of `weight` [out, in] in a resolved `precision` ("float32", "int8" or "bfloat16"), applied to
    ``scale * x`` (a per-input-channel `scale`: an RMSNorm weight, a smoothing divisor's inverse), with `eps` to
    ``scale * RMSNorm(x)``. Called as ``linear(x [rows, in], residual=None)``; the result plus `residual` when
    given.
    """
    return {"float32": _Linear, "int8": _Int8Linear, "bfloat16": _Bfloat16Linear}[precision](weight, scale, eps)


class _Layer(torch.nn.Module):
    """
    One decoder layer, packed for `precision`, each RMSNorm folded into the linear layer after it. With `maxima`
    (`input_maxima` of this layer) the layer is smoothed (`smoothing_scales`): exact in float32 up to rounding, what
    keeps int8's 8-bit inputs accurate.
    """

    def __init__(self, layer, config, precision: str = "float32", maxima: dict[str, torch.Tensor] | None = None):
        super().__init__()
        attention, mlp = layer.self_attn, layer.mlp
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.half = config.intermediate_size
        eps = config.rms_norm_eps
        input_norm = layer.input_layernorm.weight.detach().float()
        post_attention_norm = layer.post_attention_layernorm.weight.detach().float()
        qkv = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]).detach().float()
        o = attention.o_proj.weight.detach().float()
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach().float()
        down = mlp.down_proj.weight.detach().float()
        o_scale = None
        if maxima is not None:
            c = smoothing_scales(maxima["qkv"], qkv)  # x / c folded into the norm before q|k|v
            qkv, input_norm = qkv * c, input_norm / c
            c = smoothing_scales(maxima["gate_up"], gate_up)
            gate_up, post_attention_norm = gate_up * c, post_attention_norm / c
            c = smoothing_scales(maxima["down"], down)  # down's input silu(gate) * up: 1 / c folded into up's rows
            down = down * c
            gate_up[mlp.gate_proj.weight.shape[0] :] /= c[:, None]  # the up rows
            c = smoothing_scales(maxima["o"], o)  # attention's output: scaled by 1 / c at run time
            o, o_scale = o * c, 1.0 / c
        linear = functools.partial(make_linear, precision=precision)
        self.qkv = linear(qkv, scale=input_norm, eps=eps)
        self.o = linear(o, scale=o_scale)
        self.gate_up = linear(gate_up, scale=post_attention_norm, eps=eps)
        self.down = linear(down)

    def forward(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, rows: int,
                cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """The layer on `x` [rows * steps, hidden] (a row's steps together) whose tokens fill cache slots
        ``start .. start+steps`` of this layer's `keys`/`values` [rows, kv_heads, capacity, head_dim]; `bias`
        [rows, 1, steps, end] is the attention's additive mask."""
        heads, kv_heads, dim = self.heads, self.kv_heads, self.dim
        steps = x.shape[0] // rows
        end, qk_width = start + steps, (heads + kv_heads) * dim
        qkv = self.qkv(x)  # the input norm folded in
        qk = qkv[:, :qk_width].view(rows, steps, heads + kv_heads, dim)
        qk = qk * cos + qk.roll([dim // 2], [-1]) * sin  # rotary embedding of queries and keys at once
        keys[:, :, start:end] = qk[:, :, heads:].transpose(1, 2)
        values[:, :, start:end] = qkv[:, qk_width:].view(rows, steps, kv_heads, dim).transpose(1, 2)
        if steps == 1:  # one new token: the query heads of a KV group act as that group's query positions
            attended = F.scaled_dot_product_attention(qk[:, 0, :heads].reshape(rows, kv_heads, heads // kv_heads, dim),
                                                      keys[:, :, :end], values[:, :, :end], attn_mask=bias)
        else:
            attended = F.scaled_dot_product_attention(qk[:, :, :heads].transpose(1, 2), keys[:, :, :end],
                                                      values[:, :, :end], attn_mask=bias,
                                                      enable_gqa=True).transpose(1, 2)
        x = self.o(attended.reshape(rows * steps, heads * dim), x)
        gate_up = self.gate_up(x)  # the post-attention norm folded in
        return self.down(F.silu(gate_up[:, : self.half]).mul_(gate_up[:, self.half :]), x)


class _Body(torch.nn.Module):
    """The decoder layers (`_Layer`), one call for all of them: what `script_body` compiles."""

    def __init__(self, layers: list[_Layer]):
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], start: int,
                rows: int, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """
        The layers on `x` [rows * steps, hidden] (row-major: a row's steps together) whose tokens fill cache slots
        ``start .. start+steps``; `keys`/`values` are per-layer caches [rows, kv_heads, capacity, head_dim], `mask`
        [rows, 1, steps, end] says which cache slots each new token attends to (True = attend).
        """
        # the mask as the additive bias attention applies, built once for all layers (SDPA converts a bool mask
        # on every call)
        bias = torch.zeros(mask.shape).masked_fill_(~mask, float("-inf"))
        for i, layer in enumerate(self.layers):
            x = layer(x, keys[i], values[i], start, rows, cos, sin, bias)
        return x


def script_body(body: _Body) -> torch.nn.Module:
    """
    `body` compiled by TorchScript, or `body` itself where compiling fails (with a warning: e.g. a torch without
    TorchScript or without the oneDNN ops). The compiled body runs the same ATen ops in the same order, so its
    results are equal bit for bit (tested at prefill and every decode step; this holds while TorchScript's CPU fusion
    is off, as it is in torch's CPU wheels), without Python between them: a decode step is ~2,000 small ops, and the
    Python among them cost 16% of a float32 step and 32% of an int8 one (69 vs 82 ms and 38 vs 56 ms, 16 rows, 2
    cores). ``torch.jit.script`` is deprecated in recent torch but works; its deprecation warning is silenced.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.script(body)
    except Exception as error:  # noqa: BLE001 - a torch without TorchScript, or code it cannot compile: eager
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        logger.warning("TorchScript could not compile the packed decoder's layers (%s: %s); running them in "
                       "Python (slower, same results).", type(error).__name__, first_line)
        return body


class _State:
    """KV cache and bookkeeping of one batch being decoded."""

    def __init__(self, keys, values, key_mask, cos, sin, length):
        self.keys, self.values = keys, values  # per layer [rows, kv_heads, capacity, head_dim]
        self.key_mask = key_mask  # [rows, capacity] bool, True = a real token
        self.cos, self.sin = cos, sin  # [rows, capacity, 1, head_dim] rotary tables by cache slot
        self.length = length  # cache slots filled so far


class PackedLlamaDecoder:
    """
    Prefill / decode steps of a Llama model with prepacked weights (see the module docstring).

    :param precision: Weight precision: "float32" (exact), "int8", "bfloat16" (CPUs with native bfloat16 only) or
        "auto" (`resolve_precision`); weights are converted once, here. `self.precision` is the resolved one.
    :param calibration: Token id lists of a few natural prompts (`local.calibration_ids(tokenizer)`, which
        `LocalSampler` passes itself): the activation ranges the layers are smoothed by (`input_maxima`,
        `smoothing_scales`). Needed for int8 (unsmoothed, its 8-bit inputs lose more: KL 0.038 vs 0.017); in
        float32 or bfloat16 smoothing is exact up to rounding and only applied when given.
    :param script: Run the layers compiled by TorchScript (`script_body`: the same ops, equal results; a decode
        step 16% (float32) to 32% (int8) shorter); False runs them in Python.
    """

    def __init__(self, model, precision: str = "float32", calibration: list[list[int]] | None = None,
                 script: bool = True):
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"PackedLlamaDecoder cannot run this model: {reason}.")
        self.precision = resolve_precision(precision)
        if self.precision == "int8" and calibration is None:
            raise ValueError(f"`calibration` is required for precision {precision!r} (int8 on this CPU): token id "
                             "lists of a few natural "
                             "prompts, e.g. `expandr_haystack.generation.local.calibration_ids(tokenizer)` "
                             "(LocalSampler passes them itself).")
        maxima = input_maxima(model, calibration) if calibration is not None else None
        config = model.config
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        rope = getattr(config, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim))
        body = model.model
        self.embed = body.embed_tokens.weight.detach().float()
        self.layers = [_Layer(layer, config, self.precision, None if maxima is None else
                              {kind: value for (i, kind), value in maxima.items() if i == index})
                       for index, layer in enumerate(body.layers)]
        self.body = script_body(_Body(self.layers)) if script else _Body(self.layers)
        final_norm = body.norm.weight.detach().float()
        head = model.lm_head.weight.detach().float()
        if maxima is not None:  # the head's input is the final norm's output: 1 / c folded into its weight
            c = smoothing_scales(maxima[(-1, "head")], head)
            head, final_norm = head * c, final_norm / c
        self.lm_head = make_linear(head, self.precision, scale=final_norm, eps=self.eps)  # the final norm folded in

    def _rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary tables [rows, steps, 1, head_dim] for `positions` [rows, steps]; the sine carries the sign of
        ``rotate_half`` so that a rotation is ``x * cos + roll(x, head_dim / 2) * sin``."""
        freqs = positions[..., None].float() * self.inv_freq
        angles = torch.cat([freqs, freqs], dim=-1)
        half = self.head_dim // 2
        sign = torch.cat([-torch.ones(half), torch.ones(half)])
        return angles.cos()[:, :, None], (angles.sin() * sign)[:, :, None]

    def _cache(self, rows: int, capacity: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        shape = (rows, self.kv_heads, capacity, self.head_dim)
        return [torch.empty(shape) for _ in self.layers], [torch.empty(shape) for _ in self.layers]

    def prefill(self, prompts: list[list[int]], select: torch.Tensor, max_new_tokens: int):
        """
        Run the unique token lists `prompts` and return the next-token logits of every row [rows, vocab] with the
        decoding state; row ``i`` continues prompt ``select[i]``.

        The prompts' common prefix (a chat template's system turn and the instruction) is computed once. Cache
        layout per row: ``[common prefix | padding | rest of the prompt | generated tokens]``; padding slots are
        masked and rotary positions count real tokens only, so each row sees exactly its own prompt.
        """
        lengths = [len(p) for p in prompts]
        shared = 0  # common prefix length; every row keeps at least its last token to compute itself
        limit = min(lengths) - 1
        while shared < limit and all(p[shared] == prompts[0][shared] for p in prompts):
            shared += 1
        width = max(lengths) - shared  # the "rest" region, left-padded
        unique, rows, span = len(prompts), len(select), shared + width
        rest = torch.zeros(unique, width, dtype=torch.long)
        valid = torch.zeros(unique, span, dtype=torch.bool)
        positions = torch.zeros(unique, span, dtype=torch.long)
        valid[:, :shared] = True
        positions[:, :shared] = torch.arange(shared)
        for r, p in enumerate(prompts):
            tail = p[shared:]
            rest[r, width - len(tail) :] = torch.tensor(tail, dtype=torch.long)
            valid[r, span - len(tail) :] = True
            positions[r, span - len(tail) :] = torch.arange(shared, len(p))
        capacity = span + max_new_tokens
        # one row per prompt, in order (one sample each): the prefill's cache is the decoding cache (no second copy)
        in_place = select.tolist() == list(range(unique))
        keys, values = self._cache(unique, capacity if in_place else span)
        if shared:
            cos, sin = self._rotary(positions[:1, :shared])
            causal = torch.ones(shared, shared, dtype=torch.bool).tril()
            self.body(F.embedding(torch.tensor(prompts[0][:shared]), self.embed), [k[:1] for k in keys],
                      [v[:1] for v in values], 0, 1, cos, sin, causal[None, None])
            for k, v in zip(keys, values):
                k[1:, :, :shared] = k[:1, :, :shared]
                v[1:, :, :shared] = v[:1, :, :shared]
        cos, sin = self._rotary(positions[:, shared:])
        causal = torch.ones(width, span, dtype=torch.bool).tril(diagonal=shared)
        # a padding slot's query attends to itself only (its output is never used; avoids an all-masked softmax)
        itself = torch.zeros(width, span, dtype=torch.bool)
        itself[:, shared:] = torch.eye(width, dtype=torch.bool)
        mask = (causal[None] & valid[:, None, :]) | itself[None]
        # the prompts in groups of about PREFILL_TOKENS tokens: each group's activations are freed before the next
        # group's (32 grounded prompts at once held ~0.8 GB of them), the cache is written in place either way
        group = max(1, PREFILL_TOKENS // max(width, 1))
        last = []
        for first in range(0, unique, group):
            part = slice(first, first + group)
            tokens = rest[part]
            x = self.body(F.embedding(tokens.flatten(), self.embed), [k[part] for k in keys],
                          [v[part] for v in values], shared, len(tokens), cos[part], sin[part], mask[part, None])
            last.append(x[width - 1 :: width])  # each row's last position
        logits = self.lm_head(torch.cat(last)).index_select(0, select)

        if in_place:
            state_keys, state_values = keys, values
        else:  # each unique prompt's cache copied to its rows, layer by layer (the prefill's copy freed as it goes)
            state_keys, state_values = [], []
            for caches, targets in ((keys, state_keys), (values, state_values)):
                for i in range(len(caches)):
                    target = torch.empty((rows, self.kv_heads, capacity, self.head_dim))
                    target[:, :, :span] = caches[i].index_select(0, select)
                    caches[i] = None
                    targets.append(target)
        key_mask = torch.zeros(rows, capacity, dtype=torch.bool)
        key_mask[:, :span] = valid.index_select(0, select)
        row_positions = positions.index_select(0, select)
        all_positions = torch.cat([row_positions, row_positions[:, -1:] + torch.arange(1, max_new_tokens + 1)], 1)
        cos, sin = self._rotary(all_positions)
        return logits, _State(state_keys, state_values, key_mask, cos, sin, span)

    def decode(self, state: _State, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row and return the next-token logits [rows, vocab]."""
        start = state.length
        state.key_mask[:, start] = True
        cos = state.cos[:, start : start + 1]
        sin = state.sin[:, start : start + 1]
        x = self.body(F.embedding(tokens, self.embed), state.keys, state.values, start, len(tokens), cos, sin,
                      state.key_mask[:, None, None, : start + 1])
        state.length += 1
        return self.lm_head(x)  # the final norm folded in
