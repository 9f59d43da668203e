"""
A fast CPU decoder for Llama-architecture causal LMs (SmolLM2, Llama 2/3, TinyLlama, ...).

In float32 (the default) it is the same math as ``transformers``' ``LlamaForCausalLM`` (logits agree to ~1e-5), so
sampling with the same per-row seeds gives the same text except where a draw falls within float rounding of a
nucleus boundary. The speed comes from doing less, not from lower precision:

* weights prepacked once for oneDNN (``torch.ops.mkldnn._reorder_linear_weight``), the layout ``torch.compile``'s
  freezing pass uses, instead of re-laying them out on every matmul;
* fused projections: one ``q|k|v`` matmul and one ``gate|up`` matmul per layer instead of five;
* a preallocated KV cache written in place (no ``torch.cat`` per step; float16 with int8 weights, `KV_DTYPES`),
  rotary tables computed once per batch, the attention mask turned into its additive bias once per step for all
  layers;
* each RMSNorm applied by the linear layer after it (`quantize.make_linear`'s ``scale``/``eps``; the same ops as
  ``transformers``' in float32), activations kept 2-D ([tokens, hidden]) between the layers;
* grouped-query attention without ``repeat_kv``: at decode the query heads sharing a KV head are laid out as that
  head's query "positions", so one ``scaled_dot_product_attention`` call covers them;
* a prompt shared by several rows (several samples of one query) is prefilled once and its KV copied;
* at prefill the linear layers see the real tokens only: the left padding of the shorter prompts exists for the
  attention alone (zero keys and values, masked);
* the layers compiled by TorchScript (`script_body`): a decode step is ~2,000 small tensor ops, and compiled they
  run bit for bit the same without Python between them. Where TorchScript cannot compile them they run in Python.

Weight precision (``weight_precision=``): "float32" (default, exact), "int8" (int8 weights through FBGEMM on smoothed,
per-row 8-bit inputs; CPUs with AVX512-VNNI), "bfloat16" (CPUs with native bfloat16 only) or "auto"
(`quantize.resolve_precision`: int8 where it runs, else float32). The quantization and the linear layers of each
precision are in `expandr_haystack.generation.quantize`; measurements in docs/benchmarks.md.

Usage (``LocalSampler`` picks it by itself for a float32 Llama model on CPU):
```python
from expandr_haystack.generation.local import LocalSampler
from expandr_haystack.generation.packed_llama import PackedLlamaDecoder

sampler = LocalSampler(model, tokenizer, decoder=PackedLlamaDecoder(model))
fast = LocalSampler(model, tokenizer, weight_precision="int8")  # calibrated on the tokenizer's prompts; or "auto"
```
"""

import functools
import logging
import warnings

import torch
import torch.nn.functional as F

from expandr_haystack.generation.kernels import resolve_kernels
from expandr_haystack.generation.quantize import input_maxima, make_linear, resolve_precision, smoothing_scales

logger = logging.getLogger(__name__)

#: KV cache dtype per weight precision (float32 otherwise). int8 keeps keys and values in float16: attention reads the
#: whole cache of every layer at each step (as many bytes as the int8 weights at 16 rows and ~100 tokens), and half
#: of them is a decode step ~5% shorter (docs/benchmarks.md, "Decode step: what is left"); float16's 11-bit mantissa is
#: finer than the 8-bit inputs around it. float32 stays the exact reference.
KV_DTYPES = {"int8": torch.float16}

#: Prompt tokens prefilled at once (whole prompts, at least one): bounds the prefill's activations, not its speed
#: (the prompts' common prefix is one pass of its own before).
PREFILL_TOKENS = 1024


def interleave_rotary_halves(rows, heads: int):
    """
    A Llama q or k weight [heads * head_dim, ...] (torch or numpy) with each head's rows reordered from the two
    rotary halves (transformers' layout: ``rotate_half`` pairs dimension i with i + head_dim / 2) to the pairs
    interleaved (i, i + head_dim / 2, i + 1, ...): the layout where a rotation is a product of complex numbers, and
    the one llama.cpp's ``convert_hf_to_gguf.py`` gives q/k (its ``permute``).
    """
    shape = rows.shape
    return rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


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


# The layers are torch.nn.Modules written for TorchScript (`script_body`), as are the linear layers in them
# (`quantize.make_linear`): attributes that may be None are declared on the class (TorchScript reads these
# annotations; the module has no `from __future__ import annotations` for it).


class _Layer(torch.nn.Module):
    """
    One decoder layer, packed for `precision`, each RMSNorm folded into the linear layer after it. With `maxima`
    (`input_maxima` of this layer) the layer is smoothed (`smoothing_scales`): exact in float32 up to rounding, what
    keeps int8's 8-bit inputs accurate.
    """

    def __init__(self, layer, config, precision: str = "float32", maxima: dict[str, torch.Tensor] | None = None,
                 fused: bool = False):
        super().__init__()
        attention, mlp = layer.self_attn, layer.mlp
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        self.attention = (_FusedAttention if fused else _Attention)(heads, kv_heads, dim)
        eps = config.rms_norm_eps
        input_norm = layer.input_layernorm.weight.detach().float()
        post_attention_norm = layer.post_attention_layernorm.weight.detach().float()
        # q and k rows with each head's rotary halves interleaved (`interleave_rotary_halves`): a rotation is then one
        # complex product; dot products of queries and keys are unchanged (the same order on both)
        qkv = torch.cat([interleave_rotary_halves(attention.q_proj.weight, heads),
                         interleave_rotary_halves(attention.k_proj.weight, kv_heads),
                         attention.v_proj.weight]).detach().float()
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
        linear = functools.partial(make_linear, precision=precision, fused=fused)
        self.qkv = linear(qkv, scale=input_norm, eps=eps)
        self.o = linear(o, scale=o_scale)
        self.gate_up = linear(gate_up, scale=post_attention_norm, eps=eps)
        self.down = linear(down)

    def forward(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, rows: int, steps: int,
                rotation: torch.Tensor, bias: torch.Tensor, real: torch.Tensor | None, shared: int) -> torch.Tensor:
        """The layer on `x` [rows * steps, hidden] (a row's steps together) whose tokens fill cache slots
        ``start .. start+steps`` of this layer's `keys`/`values` [rows, kv_heads, capacity, head_dim]; `rotation`
        [rows, steps, 1, head_dim / 2] (complex) is the rotary embedding at each token's position; `bias`
        [rows, 1, steps, end] is the attention's additive mask. With `real` (the indices of the real tokens among
        the ``rows * steps`` slots), `x` holds those tokens only [len(real), hidden]: the linear layers skip the
        padding, whose slots get zero keys and values (masked out) for the attention. Cache slots below `shared`
        hold the same keys and values in every row (the prompts' common prefix)."""
        attended = self.attention(self.qkv(x), keys, values, start, rows, steps, rotation, bias, real,
                                  shared)  # the input norm folded into qkv
        x = self.o(attended, x)
        return self.down.gated(self.gate_up(x), x)  # the post-attention norm folded into gate_up


class _Attention(torch.nn.Module):
    """A layer's attention on its new tokens' fused q|k|v: rotary embedding, KV cache write, grouped-query
    attention (`_Layer.forward`'s arguments; returns the output [tokens, heads * head_dim], float32)."""

    def __init__(self, heads: int, kv_heads: int, dim: int):
        super().__init__()
        self.heads, self.kv_heads, self.dim = heads, kv_heads, dim

    def forward(self, qkv: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, rows: int, steps: int,
                rotation: torch.Tensor, bias: torch.Tensor, real: torch.Tensor | None, shared: int = 0) -> torch.Tensor:
        heads, kv_heads, dim = self.heads, self.kv_heads, self.dim
        end, qk_width = start + steps, (heads + kv_heads) * dim
        if real is not None:  # the padded layout of the attention
            qkv = torch.zeros(rows * steps, qkv.shape[1], dtype=qkv.dtype).index_copy_(0, real, qkv)
        # rotary embedding of queries and keys at once: each interleaved pair (x_i, x_i+dim/2) as one complex number
        # times e^(i theta) = (x_i cos - x_i+dim/2 sin, x_i+dim/2 cos + x_i sin), transformers' rotate_half
        pairs = torch.view_as_complex(qkv[:, :qk_width].view(rows, steps, heads + kv_heads, dim // 2, 2))
        qk = torch.view_as_real(pairs * rotation).view(rows, steps, heads + kv_heads, dim)
        keys[:, :, start:end] = qk[:, :, heads:].transpose(1, 2)  # in the cache's dtype (`_State`)
        values[:, :, start:end] = qkv[:, qk_width:].view(rows, steps, kv_heads, dim).transpose(1, 2)
        queries = qk[:, :, :heads].to(keys.dtype)
        if steps == 1:  # one new token: the query heads of a KV group act as that group's query positions
            attended = F.scaled_dot_product_attention(queries[:, 0].reshape(rows, kv_heads, heads // kv_heads, dim),
                                                      keys[:, :, :end], values[:, :, :end], attn_mask=bias)
        else:
            attended = F.scaled_dot_product_attention(queries.transpose(1, 2), keys[:, :, :end], values[:, :, :end],
                                                      attn_mask=bias, enable_gqa=True).transpose(1, 2)
        attended = attended.reshape(rows * steps, heads * dim)
        if real is not None:
            attended = attended.index_select(0, real)
        return attended.float()


class _FusedAttention(torch.nn.Module):
    """`_Attention` whose one-token steps run as one fused kernel (`kernels`: ``expandr::decode_attention``: rotary
    embedding, cache write and attention in one pass): decoding, and a prefill whose prompts have one token after
    their common prefix; longer prompts run `_Attention`'s ops."""

    def __init__(self, heads: int, kv_heads: int, dim: int):
        super().__init__()
        self.heads = heads
        self.prompt = _Attention(heads, kv_heads, dim)

    def forward(self, qkv: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, rows: int, steps: int,
                rotation: torch.Tensor, bias: torch.Tensor, real: torch.Tensor | None, shared: int = 0) -> torch.Tensor:
        if steps == 1 and real is None:  # the common prefix's keys and values read once for all rows (`shared`)
            return torch.ops.expandr.decode_attention(qkv, rotation, keys, values, start, bias, self.heads, shared)
        return self.prompt(qkv, keys, values, start, rows, steps, rotation, bias, real)


class _Body(torch.nn.Module):
    """The decoder layers (`_Layer`), one call for all of them: what `script_body` compiles."""

    def __init__(self, layers: list[_Layer]):
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], start: int,
                rows: int, rotation: torch.Tensor, mask: torch.Tensor,
                real: torch.Tensor | None = None, shared: int = 0) -> torch.Tensor:
        """
        The layers on `x` [rows * steps, hidden] (row-major: a row's steps together) whose tokens fill cache slots
        ``start .. start+steps``; `keys`/`values` are per-layer caches [rows, kv_heads, capacity, head_dim], `mask`
        [rows, 1, steps, end] says which cache slots each new token attends to (True = attend). With `real` (indices
        of the real tokens among the ``rows * steps`` slots) `x` holds only those tokens, in that order (`_Layer`);
        cache slots below `shared` hold the same keys and values in every row (the prompts' common prefix).
        """
        # the mask as the additive bias attention applies, built once for all layers (SDPA converts a bool mask
        # on every call), in the KV cache's dtype
        bias = torch.zeros(mask.shape, dtype=keys[0].dtype).masked_fill_(~mask, float("-inf"))
        steps = mask.shape[2]
        for i, layer in enumerate(self.layers):
            x = layer(x, keys[i], values[i], start, rows, steps, rotation, bias, real, shared)
        return x


def script_body(body: _Body) -> torch.nn.Module:
    """
    `body` compiled by TorchScript, or `body` itself where compiling fails (with a warning: e.g. a torch without
    TorchScript or without the oneDNN ops). The compiled body runs the same ATen ops in the same order, so its
    results are equal bit for bit (tested at prefill and every decode step; this holds while TorchScript's CPU fusion
    is off, as it is in torch's CPU wheels), without Python between them: a decode step is ~2,000 small ops, and
    compiled it is 16% (float32) to 32% (int8) shorter (docs/benchmarks.md). ``torch.jit.script`` is deprecated in
    recent torch but works; its deprecation warning is silenced.
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

    def __init__(self, keys, values, key_mask, rotation, length, shared=0):
        self.keys, self.values = keys, values  # per layer [rows, kv_heads, capacity, head_dim]
        self.shared = shared  # the first cache slots, the same in every row (the prompts' common prefix)
        self.key_mask = key_mask  # [rows, capacity] bool, True = a real token
        self.rotation = rotation  # [rows, capacity, 1, head_dim / 2] complex rotary table by cache slot
        self.length = length  # cache slots filled so far


class PackedLlamaDecoder:
    """
    Prefill / decode steps of a Llama model with prepacked weights (see the module docstring).

    :param precision: Weight precision: "float32" (exact), "int8", "bfloat16" (CPUs with native bfloat16 only) or
        "auto" (`quantize.resolve_precision`); weights are converted once, here. `self.precision` is the resolved
        one.
    :param calibration: Token id lists of a few natural prompts (`local.calibration_ids(tokenizer)`, which
        `LocalSampler` passes itself): the activation ranges the layers are smoothed by (`quantize.input_maxima`,
        `quantize.smoothing_scales`). Needed for int8 (unsmoothed, its 8-bit inputs are much less accurate); in
        float32 or bfloat16 smoothing is exact up to rounding and only applied when given.
    :param script: Run the layers compiled by TorchScript (`script_body`: the same ops, equal results; a decode
        step 16% (float32) to 32% (int8) shorter); False runs them in Python.
    :param kernels: int8 only: run the fused CPU kernels (`kernels`: the layers' inputs and the decoding attention,
        each one pass instead of several ops; compiled for this CPU on first use): None = where they load (a warning
        where they do not), True = required, False = the torch ops. `self.kernels` says whether they run.
    """

    def __init__(self, model, precision: str = "float32", calibration: list[list[int]] | None = None,
                 script: bool = True, kernels: bool | None = None):
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"PackedLlamaDecoder cannot run this model: {reason}.")
        self.precision = resolve_precision(precision)
        if self.precision == "int8" and calibration is None:
            raise ValueError(f"`calibration` is required for precision {precision!r} (int8 on this CPU): token id "
                             "lists of a few natural "
                             "prompts, e.g. `expandr_haystack.generation.local.calibration_ids(tokenizer)` "
                             "(LocalSampler passes them itself).")
        if kernels and self.precision != "int8":
            raise ValueError(f"`kernels`=True needs int8 weights; precision {precision!r} is {self.precision!r} here.")
        #: whether the fused kernels run (int8 only: float32 stays the exact reference)
        self.kernels = self.precision == "int8" and resolve_kernels(kernels)
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
                              {kind: value for (i, kind), value in maxima.items() if i == index}, self.kernels)
                       for index, layer in enumerate(body.layers)]
        self.body = script_body(_Body(self.layers)) if script else _Body(self.layers)
        final_norm = body.norm.weight.detach().float()
        head = model.lm_head.weight.detach().float()
        if maxima is not None:  # the head's input is the final norm's output: 1 / c folded into its weight
            c = smoothing_scales(maxima[(-1, "head")], head)
            head, final_norm = head * c, final_norm / c
        self.lm_head = make_linear(head, self.precision, scale=final_norm, eps=self.eps,
                                   fused=self.kernels)  # the final norm folded in
        #: int8 weight levels per sign (127, or 64 on FBGEMM's kernels without VNNI); None in other precisions
        self.int8_levels = getattr(self.lm_head, "levels", None)
        #: dtype of the KV cache: float16 with int8 weights (`KV_DTYPES`), else float32
        self.kv_dtype = KV_DTYPES.get(self.precision, torch.float32)

    def _rotary(self, positions: torch.Tensor) -> torch.Tensor:
        """The rotary table [rows, steps, 1, head_dim / 2] for `positions` [rows, steps]: ``e^(i theta)`` (complex,
        ``cos theta + i sin theta``) per frequency, each rotating one interleaved pair of a query's or key's
        dimensions."""
        angles = positions[..., None].float() * self.inv_freq
        return torch.complex(angles.cos(), angles.sin())[:, :, None]

    def _cache(self, rows: int, capacity: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        shape = (rows, self.kv_heads, capacity, self.head_dim)
        return ([torch.empty(shape, dtype=self.kv_dtype) for _ in self.layers],
                [torch.empty(shape, dtype=self.kv_dtype) for _ in self.layers])

    def prefill(self, prompts: list[list[int]], select: torch.Tensor, max_new_tokens: int):
        """
        Run the unique token lists `prompts` and return the next-token logits of every row [rows, vocab] with the
        decoding state; row ``i`` continues prompt ``select[i]``.

        The prompts' common prefix (a chat template's system turn and the instruction) is computed once. Cache
        layout per row: ``[common prefix | padding | rest of the prompt | generated tokens]``; padding slots are
        masked and rotary positions count real tokens only, so each row sees exactly its own prompt.
        """
        lengths = [len(p) for p in prompts]
        if min(lengths) == 0:
            raise ValueError(f"`prompts`: every prompt needs at least one token; prompt {lengths.index(0)} has none.")
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
            causal = torch.ones(shared, shared, dtype=torch.bool).tril()
            self.body(F.embedding(torch.tensor(prompts[0][:shared]), self.embed), [k[:1] for k in keys],
                      [v[:1] for v in values], 0, 1, self._rotary(positions[:1, :shared]), causal[None, None])
            for k, v in zip(keys, values):
                k[1:, :, :shared] = k[:1, :, :shared]
                v[1:, :, :shared] = v[:1, :, :shared]
        rotation = self._rotary(positions[:, shared:])
        causal = torch.ones(width, span, dtype=torch.bool).tril(diagonal=shared)
        # a padding slot's query attends to itself only (its output is never used; avoids an all-masked softmax)
        itself = torch.zeros(width, span, dtype=torch.bool)
        itself[:, shared:] = torch.eye(width, dtype=torch.bool)
        mask = (causal[None] & valid[:, None, :]) | itself[None]
        # the prompts in groups of about PREFILL_TOKENS tokens: each group's activations are freed before the next
        # group's (32 grounded prompts at once held ~0.8 GB of them), the cache is written in place either way.
        # The linear layers see the real tokens only (`_Body`'s `real`): the left padding of the shorter prompts
        # (15-19% of the tokens of the benchmark's batches) costs no products
        group = max(1, PREFILL_TOKENS // max(width, 1))
        last = []
        for first in range(0, unique, group):
            part = slice(first, first + group)
            is_real = valid[part, shared:].flatten()
            real = is_real.nonzero().flatten()
            x = self.body(F.embedding(rest[part].flatten().index_select(0, real), self.embed),
                          [k[part] for k in keys], [v[part] for v in values], shared, len(is_real) // width,
                          rotation[part], mask[part, None], None if bool(is_real.all()) else real, shared)
            last.append(x.index_select(0, is_real.view(-1, width).sum(1).cumsum(0) - 1))  # each row's last token
        logits = self.lm_head(torch.cat(last)).index_select(0, select)

        if in_place:
            state_keys, state_values = keys, values
        else:  # each unique prompt's cache copied to its rows, layer by layer (the prefill's copy freed as it goes)
            state_keys, state_values = [], []
            for caches, targets in ((keys, state_keys), (values, state_values)):
                for i in range(len(caches)):
                    target = torch.empty((rows, self.kv_heads, capacity, self.head_dim), dtype=self.kv_dtype)
                    target[:, :, :span] = caches[i].index_select(0, select)
                    caches[i] = None
                    targets.append(target)
        key_mask = torch.zeros(rows, capacity, dtype=torch.bool)
        key_mask[:, :span] = valid.index_select(0, select)
        row_positions = positions.index_select(0, select)
        all_positions = torch.cat([row_positions, row_positions[:, -1:] + torch.arange(1, max_new_tokens + 1)], 1)
        return logits, _State(state_keys, state_values, key_mask, self._rotary(all_positions), span, shared)

    def decode(self, state: _State, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row and return the next-token logits [rows, vocab]."""
        start = state.length
        state.key_mask[:, start] = True
        x = self.body(F.embedding(tokens, self.embed), state.keys, state.values, start, len(tokens),
                      state.rotation[:, start : start + 1], state.key_mask[:, None, None, : start + 1], None,
                      state.shared)
        state.length += 1
        return self.lm_head(x)  # the final norm folded in
