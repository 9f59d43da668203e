"""
A fast float32 CPU decoder for Llama-architecture causal LMs (SmolLM2, Llama 2/3, TinyLlama, ...).

Same float32 math as ``transformers``' ``LlamaForCausalLM`` (logits agree to ~1e-5), so sampling with the same
per-row seeds gives the same text except where a draw falls within float rounding of a nucleus boundary. The speed
comes from doing less, not from lower precision:

* weights prepacked once for oneDNN (``torch.ops.mkldnn._reorder_linear_weight``), the layout ``torch.compile``'s
  freezing pass uses, instead of re-laying them out on every matmul;
* fused projections: one ``q|k|v`` matmul and one ``gate|up`` matmul per layer instead of five;
* a preallocated KV cache written in place (no ``torch.cat`` per step), rotary tables computed once per batch;
* grouped-query attention without ``repeat_kv``: at decode the query heads sharing a KV head are laid out as that
  head's query "positions", so one ``scaled_dot_product_attention`` call covers them;
* a prompt shared by several rows (several samples of one query) is prefilled once and its KV copied.

Usage (``LocalSampler`` picks it by itself for a float32 Llama model on CPU):
```python
from expandr_haystack.generation.local import LocalSampler
from expandr_haystack.generation.packed_llama import PackedLlamaDecoder

sampler = LocalSampler(model, tokenizer, decoder=PackedLlamaDecoder(model))
```
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


class _Linear:
    """A bias-free linear layer whose weight is prepacked for oneDNN (plain ``F.linear`` where oneDNN is absent)."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight.detach().to(torch.float32).contiguous()
        self.packed = None
        if torch.backends.mkldnn.is_available():
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight)
                self.weight = None  # the packed copy is all that is used (fused weights are not kept twice)
            except (RuntimeError, AttributeError):
                self.packed = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight)
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), self.packed, None, "none", [], "")
        return y.view(*x.shape[:-1], y.shape[-1])


class _Layer:
    def __init__(self, layer):
        attention, mlp = layer.self_attn, layer.mlp
        self.input_norm = layer.input_layernorm.weight.detach().float()
        self.post_attention_norm = layer.post_attention_layernorm.weight.detach().float()
        self.qkv = _Linear(torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]))
        self.o = _Linear(attention.o_proj.weight)
        self.gate_up = _Linear(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
        self.down = _Linear(mlp.down_proj.weight)


class _State:
    """KV cache and bookkeeping of one batch being decoded."""

    def __init__(self, keys, values, key_mask, cos, sin, length):
        self.keys, self.values = keys, values  # per layer [rows, kv_heads, capacity, head_dim]
        self.key_mask = key_mask  # [rows, capacity] bool, True = a real token
        self.cos, self.sin = cos, sin  # [rows, capacity, 1, head_dim] rotary tables by cache slot
        self.length = length  # cache slots filled so far


class PackedLlamaDecoder:
    """Prefill / decode steps of a Llama model with prepacked float32 weights (see the module docstring)."""

    def __init__(self, model):
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"PackedLlamaDecoder cannot run this model: {reason}.")
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
        self.layers = [_Layer(layer) for layer in body.layers]
        self.final_norm = body.norm.weight.detach().float()
        self.lm_head = _Linear(model.lm_head.weight)
        self.intermediate = config.intermediate_size

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def _rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary tables [rows, steps, 1, head_dim] for `positions` [rows, steps]; the sine carries the sign of
        ``rotate_half`` so that a rotation is ``x * cos + roll(x, head_dim / 2) * sin``."""
        freqs = positions[..., None].float() * self.inv_freq
        angles = torch.cat([freqs, freqs], dim=-1)
        half = self.head_dim // 2
        sign = torch.cat([-torch.ones(half), torch.ones(half)])
        return angles.cos()[:, :, None], (angles.sin() * sign)[:, :, None]

    def _layers(self, x, keys, values, start: int, cos, sin, mask) -> torch.Tensor:
        """
        The decoder layers on `x` [rows, steps, hidden] whose tokens fill cache slots ``start .. start+steps``;
        `keys`/`values` are per-layer caches [rows, kv_heads, capacity, head_dim], `mask` [rows, 1, steps, end]
        says which cache slots each new token attends to (True = attend).
        """
        rows, steps, _ = x.shape
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        end = start + steps
        for layer, layer_keys, layer_values in zip(self.layers, keys, values):
            qkv = layer.qkv(self._norm(x, layer.input_norm))
            qk = qkv[..., : (heads + kv_heads) * dim].view(rows, steps, heads + kv_heads, dim)
            qk = qk * cos + qk.roll(dim // 2, dims=-1) * sin  # rotary embedding of queries and keys at once
            q = qk[:, :, :heads].transpose(1, 2)
            layer_keys[:, :, start:end] = qk[:, :, heads:].transpose(1, 2)
            layer_values[:, :, start:end] = qkv[..., (heads + kv_heads) * dim :].view(rows, steps, kv_heads, dim
                                                                                      ).transpose(1, 2)
            if steps == 1:  # one new token: the query heads of a KV group act as that group's query positions
                attended = F.scaled_dot_product_attention(q.reshape(rows, kv_heads, heads // kv_heads, dim),
                                                          layer_keys[:, :, :end], layer_values[:, :, :end],
                                                          attn_mask=mask)
            else:
                attended = F.scaled_dot_product_attention(q, layer_keys[:, :, :end], layer_values[:, :, :end],
                                                          attn_mask=mask, enable_gqa=True).transpose(1, 2)
            x = x + layer.o(attended.reshape(rows, steps, heads * dim))
            gate_up = layer.gate_up(self._norm(x, layer.post_attention_norm))
            x = x + layer.down(F.silu(gate_up[..., : self.intermediate]) * gate_up[..., self.intermediate :])
        return x

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
        keys, values = self._cache(unique, span)
        if shared:
            cos, sin = self._rotary(positions[:1, :shared])
            causal = torch.ones(shared, shared, dtype=torch.bool).tril()
            self._layers(F.embedding(torch.tensor([prompts[0][:shared]]), self.embed), [k[:1] for k in keys],
                         [v[:1] for v in values], 0, cos, sin, causal[None, None])
            for k, v in zip(keys, values):
                k[1:, :, :shared] = k[:1, :, :shared]
                v[1:, :, :shared] = v[:1, :, :shared]
        cos, sin = self._rotary(positions[:, shared:])
        causal = torch.ones(width, span, dtype=torch.bool).tril(diagonal=shared)
        # a padding slot's query attends to itself only (its output is never used; avoids an all-masked softmax)
        itself = torch.zeros(width, span, dtype=torch.bool)
        itself[:, shared:] = torch.eye(width, dtype=torch.bool)
        mask = (causal[None] & valid[:, None, :]) | itself[None]
        x = self._layers(F.embedding(rest, self.embed), keys, values, shared, cos, sin, mask[:, None])
        logits = self.lm_head(self._norm(x[:, -1], self.final_norm)).index_select(0, select)

        capacity = span + max_new_tokens
        state_keys, state_values = self._cache(rows, capacity)
        for target, source in zip(state_keys + state_values, keys + values):
            target[:, :, :span] = source.index_select(0, select)
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
        x = F.embedding(tokens[:, None], self.embed)
        x = self._layers(x, state.keys, state.values, start, cos, sin, state.key_mask[:, None, None, : start + 1])
        state.length += 1
        return self.lm_head(self._norm(x[:, -1], self.final_norm))
