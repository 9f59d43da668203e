"""The fused CPU kernels (`generation/kernels.cpp`) against the torch ops they replace, and the decoder with them."""

import logging
import re

import pytest
import torch
import torch.nn.functional as F
from test_int8 import CALIBRATION, needs_int8
from test_packed_llama import CharTokenizer, assert_same_logits, tiny_llama

from expandr_haystack.generation import kernels, packed_llama, quantize
from expandr_haystack.generation.local import LocalSampler
from expandr_haystack.generation.packed_llama import PackedLlamaDecoder

REASON = kernels.unavailable_reason()
needs_kernels = pytest.mark.skipif(REASON is not None, reason=f"fused kernels unavailable: {REASON}")


def ulps(got: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest difference in units of float32's last place at `expected`'s magnitude."""
    return float(((got - expected).abs() / (expected.abs() * 2.0**-23).clamp_min(1e-38)).max())


@needs_kernels
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("eps", [None, 1e-5])
def test_row_input_is_the_torch_ops_inputs_and_scales(scaled, eps):
    """``scale * x / a`` is the same division as `int8_row_input`'s (equal bit for bit: the 8-bit codes do not
    change); the row scale ``a * rms_factor`` sums its squares in another order (a few ulps)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(13, 200, generator=generator) * torch.logspace(-3, 2, 13)[:, None]
    x[4] = 0.0  # an all-zero row stays zero, not NaN
    scale = torch.rand(200, generator=generator) + 0.5 if scaled else None
    eps_tensor = None if eps is None else torch.tensor(eps)
    rows, a = torch.ops.expandr.row_input(x, scale, eps_tensor)
    expected_rows, expected_a = quantize.int8_row_input(x if scale is None else x * scale)
    if eps is not None:
        expected_a = expected_a * quantize.rms_factor(x, eps_tensor)
    assert torch.equal(rows, expected_rows)
    assert rows[4].abs().sum() == 0 and torch.isfinite(a).all()
    assert ulps(a, expected_a) <= 8


@needs_kernels
def test_gated_row_input_is_silu_times_up_on_the_int8_grid():
    generator = torch.Generator().manual_seed(1)
    gate_up = torch.randn(16, 2 * 96, generator=generator) * 4
    rows, a = torch.ops.expandr.gated_row_input(gate_up)
    expected_rows, expected_a = quantize.int8_row_input(F.silu(gate_up[:, :96]) * gate_up[:, 96:])
    torch.testing.assert_close(a, expected_a, rtol=1e-6, atol=0)
    torch.testing.assert_close(rows, expected_rows, rtol=0, atol=2e-6)  # inputs within 1/500 of an 8-bit step


def _nucleus(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The textbook nucleus distribution over the vocabulary (zero outside the nucleus)."""
    p, ids = (logits / temperature).double().softmax(-1).sort(descending=True)
    p = p.masked_fill(p.cumsum(-1) - p >= top_p, 0.0)
    return torch.zeros_like(p).scatter_(0, ids, p / p.sum())


def _sample(logits, temperatures, top_p, seeds):
    return torch.ops.expandr.sample_nucleus(logits, torch.tensor(temperatures, dtype=torch.float32), top_p,
                                            torch.tensor(seeds, dtype=torch.long))


@needs_kernels
@pytest.mark.parametrize("temperature, top_p", [(1.0, 0.9), (0.7, 0.5), (1.3, 1.0)])
def test_sample_nucleus_draws_from_the_nucleus_distribution(temperature, top_p):
    """20,000 draws (one row each, own seed) from a 40-token distribution: every token inside the nucleus, the
    frequencies within 4 standard errors of the nucleus probabilities."""
    logits = torch.randn(40, generator=torch.Generator().manual_seed(4)) * 2
    draws = 20_000
    tokens = _sample(logits.expand(draws, -1).contiguous(), [temperature] * draws, top_p, list(range(draws)))
    expected = _nucleus(logits, temperature, top_p)
    frequencies = torch.bincount(tokens, minlength=40).double() / draws
    assert frequencies[expected == 0].sum() == 0
    standard_error = (expected * (1 - expected) / draws).sqrt()
    assert ((frequencies - expected).abs() <= 4 * standard_error + 1e-12).all()


@needs_kernels
def test_sample_nucleus_on_a_large_flat_vocabulary_and_greedy_rows():
    """A 49,152-token vocabulary whose nucleus holds thousands of tokens (the histogram's crossing bucket decides
    the last ones): every draw inside the exact nucleus; greedy rows take the first largest logit; -inf logits are
    never drawn; the same seeds give the same tokens, and a row's token does not depend on the other rows."""
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 49_152, generator=generator)
    logits[1, :100] += 6  # a peaked row
    logits[2, 7] = logits[2, 9] = logits[2].max() + 1  # a tie for greedy: the lower id
    logits[3, ::2] = -float("inf")
    temperatures, seeds = [1.0, 1.0, 0.0, 1.0, 0.8, 1.2], [11, 12, 13, 14, 15, 16]
    for trial in range(20):
        tokens = _sample(logits, temperatures, 0.9, [s + 100 * trial for s in seeds])
        for r, (t, token) in enumerate(zip(temperatures, tokens.tolist())):
            if t == 0:
                assert token == 7
            else:
                assert _nucleus(logits[r], t, 0.9)[token] > 0
    assert torch.equal(_sample(logits, temperatures, 0.9, seeds), _sample(logits, temperatures, 0.9, seeds))
    alone = [int(_sample(logits[r : r + 1].contiguous(), temperatures[r : r + 1], 0.9, seeds[r : r + 1]))
             for r in range(6)]
    assert _sample(logits, temperatures, 0.9, seeds).tolist() == alone


@needs_kernels
def test_sample_rows_fused_draws_one_seed_per_row_from_its_generator():
    """`sample_rows(fused=True)` takes one 64-bit draw per row and step from the row's generator (so a row's tokens
    depend on its own seed only) and hands it to the kernel: the tokens are the kernel's on those draws."""
    from expandr_haystack.generation.local import sample_rows

    logits = torch.randn(4, 500, generator=torch.Generator().manual_seed(6)) * 3
    temperatures = torch.tensor([1.0, 0.0, 0.7, 1.0])
    generators = [torch.Generator().manual_seed(r) for r in range(4)]
    mirrors = [torch.Generator().manual_seed(r) for r in range(4)]
    steps = []
    for _ in range(5):
        tokens = sample_rows(logits, temperatures, 0.9, generators, fused=True)
        seeds = torch.stack([torch.empty((), dtype=torch.long).random_(generator=g) for g in mirrors])
        assert torch.equal(tokens, torch.ops.expandr.sample_nucleus(logits, temperatures, 0.9, seeds))
        steps.append(tokens.tolist())
    assert all(torch.equal(g.get_state(), m.get_state()) for g, m in zip(generators, mirrors))  # one draw a step
    assert all(step[1] == int(logits[1].argmax()) for step in steps)
    assert len({tuple(step) for step in steps}) > 1  # the draws move on from step to step


@needs_kernels
def test_sample_nucleus_keeps_the_whole_boundary_bucket_up_to_top_p():
    """1,000 equal logits: every token shares the histogram's first bucket, so the kernel's own sort decides the
    nucleus there: the first 500 tokens (ties go to the lower id) for top_p 0.5, all of them drawn over 20,000 draws
    and none beyond. top_p 0 leaves the most likely token alone."""
    draws = 20_000
    logits = torch.zeros(draws, 1000)
    tokens = _sample(logits, [1.0] * draws, 0.5, list(range(draws)))
    assert int(tokens.max()) == 499 and len(set(tokens.tolist())) == 500
    peaked = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert _sample(peaked, [1.0], 0.0, [1]).tolist() == [1]


@needs_kernels
def test_sample_nucleus_with_nan_and_infinite_logits():
    """NaN logits are never drawn; a +inf logit takes the row; a row without a finite logit is an error naming
    `logits` (not a token id outside the vocabulary); a vanishing temperature is greedy."""
    logits = torch.randn(3, 300, generator=torch.Generator().manual_seed(9))
    logits[0, ::3] = float("nan")
    logits[1, 42] = float("inf")
    logits[2] = logits[0]
    for trial in range(50):
        tokens = _sample(logits, [1.5, 1.0, 1e-39], 0.95, [trial, trial + 1, trial + 2]).tolist()
        assert tokens[0] % 3 != 0 and tokens[1] == 42
        assert tokens[2] == int(torch.nan_to_num(logits[2], nan=-float("inf")).argmax())
    with pytest.raises(RuntimeError, match="`logits` row 0 has no finite logit"):
        _sample(torch.full((1, 10), float("nan")), [1.0], 0.9, [1])


def _attention_case(dtype, dim, start, seed=2):
    generator = torch.Generator().manual_seed(seed)
    rows, heads, kv_heads, capacity = 5, 6, 2, start + 4
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim, generator=generator)
    angles = torch.rand(rows, capacity, 1, dim // 2, generator=generator) * 6
    rotation = torch.complex(angles.cos(), angles.sin())  # [rows, capacity, 1, dim / 2]
    keys = torch.randn(rows, kv_heads, capacity, dim, generator=generator).to(dtype)
    values = torch.randn(rows, kv_heads, capacity, dim, generator=generator).to(dtype)
    mask = torch.rand(rows, capacity, generator=generator) > 0.3
    mask[:, start] = True  # the new token sees itself
    bias = torch.zeros(rows, 1, 1, start + 1, dtype=dtype).masked_fill_(~mask[:, None, None, : start + 1],
                                                                         float("-inf"))
    return heads, kv_heads, qkv, rotation[:, start : start + 1], keys, values, bias


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("dim", [64, 128, 24])  # the unrolled head sizes and the general loop
@pytest.mark.parametrize("start", [0, 9, 70])
def test_decode_attention_matches_the_torch_attention(dtype, dim, start):
    """Rotary embedding, cache write and grouped-query attention of one new token per row, as `_Attention` does them
    with torch ops (masked slots included: their values must not count)."""
    heads, kv_heads, qkv, rotation, keys, values, bias = _attention_case(dtype, dim, start)
    reference = packed_llama._Attention(heads, kv_heads, dim)
    expected_keys, expected_values = keys.clone(), values.clone()
    expected = reference(qkv, expected_keys, expected_values, start, len(qkv), 1, rotation, bias, None)
    out = torch.ops.expandr.decode_attention(qkv, rotation, keys, values, start, bias, heads)
    tolerance = {"rtol": 2e-3, "atol": 2e-3} if dtype == torch.float16 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(keys.float(), expected_keys.float(), **tolerance)
    assert torch.equal(values, expected_values)  # written untouched, only rounded to the cache's dtype
    torch.testing.assert_close(out, expected, **tolerance)
    # masked slots do not count: other values there change nothing
    hidden = bias[:, 0, 0] == float("-inf")
    values.masked_fill_(_slots(hidden, values), 1e3)
    assert torch.equal(torch.ops.expandr.decode_attention(qkv, rotation, keys, values, start, bias, heads), out)


def _slots(hidden: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """`hidden` [rows, start + 1] as a mask over `cache` [rows, kv_heads, capacity, dim]."""
    full = torch.zeros(cache.shape[0], cache.shape[2], dtype=torch.bool)
    full[:, : hidden.shape[1]] = hidden
    return full[:, None, :, None].expand(cache.shape)


@needs_kernels
def test_decode_attention_names_what_is_wrong():
    heads, _, qkv, rotation, keys, values, bias = _attention_case(torch.float16, 64, 9)
    with pytest.raises(RuntimeError, match="`qkv`"):
        torch.ops.expandr.decode_attention(qkv[:, :-64], rotation, keys, values, 9, bias, heads)
    with pytest.raises(RuntimeError, match="`start`"):
        torch.ops.expandr.decode_attention(qkv, rotation, keys, values, keys.shape[2], bias, heads)
    with pytest.raises(RuntimeError, match="`bias`"):
        torch.ops.expandr.decode_attention(qkv, rotation, keys, values, 9, bias[..., :-1], heads)
    with pytest.raises(RuntimeError, match="float32 or float16"):
        torch.ops.expandr.decode_attention(qkv, rotation, keys.bfloat16(), values.bfloat16(), 9, bias.bfloat16(),
                                           heads)
    with pytest.raises(RuntimeError, match="`x`"):
        torch.ops.expandr.row_input(torch.ones(3, 4, dtype=torch.float64), None, None)


@needs_kernels
@needs_int8
@torch.inference_mode()
def test_fused_decoder_is_the_int8_decoder_within_rounding_and_scripts_bit_for_bit():
    """With the kernels the int8 decoder computes the same function with other rounding (the attention in float32
    where SDPA rounds its output to the cache's float16, sums in another order), and int8 turns small differences
    into flipped 8-bit codes: so the fused decoder is as far from float32 as the torch-op int8 decoder is (on the
    tiny model's 24 decode steps: mean |error| within 10% of it), not closer to the torch-op decoder than that. Its
    TorchScript body equals its Python body bit for bit."""
    model = tiny_llama(seed=3)
    fused = PackedLlamaDecoder(model, "int8", CALIBRATION, kernels=True)
    plain = PackedLlamaDecoder(model, "int8", CALIBRATION, kernels=False)
    exact = PackedLlamaDecoder(model)
    assert fused.kernels and not plain.kernels
    assert isinstance(fused.layers[0].attention, packed_llama._FusedAttention)
    assert isinstance(fused.layers[0].down, (quantize._FusedInt8Linear, quantize._OwnInt8Linear))
    assert type(plain.layers[0].down) is quantize._Int8Linear
    prompts, select = [[5, 9, 17, 33, 40, 41], [5, 9, 17, 8], [5, 9, 50, 52]], torch.tensor([0, 1, 1, 2])
    # one token after the common prefix: that prefill step is the decoding kernel's too
    one_step = [[5, 9, 17, 33], [5, 9, 17, 40]]
    first, _ = fused.prefill(one_step, torch.arange(2), 2)
    torch.testing.assert_close(first, plain.prefill(one_step, torch.arange(2), 2)[0], rtol=0.05, atol=0.05)
    runs = [decoder.prefill(prompts, select, 24) for decoder in (fused, plain, exact)]
    errors = {"fused": [], "plain": []}
    for _ in range(24):
        (got, _), (ref, _), (expected, _) = runs
        errors["fused"].append(float((got - expected).abs().mean()))
        errors["plain"].append(float((ref - expected).abs().mean()))
        tokens = expected.argmax(-1)
        runs = [(decoder.decode(state, tokens), state) for decoder, (_, state) in zip((fused, plain, exact), runs)]
    fused_error, plain_error = (sum(e) / len(e) for e in (errors["fused"], errors["plain"]))
    assert 0 < plain_error < 0.05 * float(expected.abs().max())
    assert fused_error <= 1.1 * plain_error
    python_body = PackedLlamaDecoder(model, "int8", CALIBRATION, script=False, kernels=True)
    assert isinstance(fused.body, torch.jit.ScriptModule)
    assert_same_logits(fused, python_body, prompts, select.tolist(), steps=8)


@needs_int8
def test_kernels_switch_and_refusals(monkeypatch, caplog):
    model = tiny_llama()
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    assert kernels.unavailable_reason() == "EXPANDR_KERNELS=0"
    assert not PackedLlamaDecoder(model, "int8", CALIBRATION).kernels
    with pytest.raises(ValueError, match=r"`kernels`=True.*EXPANDR_KERNELS=0"):
        PackedLlamaDecoder(model, "int8", CALIBRATION, kernels=True)
    monkeypatch.delenv(kernels.ENV_SWITCH)
    with pytest.raises(ValueError, match=r"`kernels`=True needs int8"):
        PackedLlamaDecoder(model, "float32", kernels=True)
    assert not PackedLlamaDecoder(model, "float32").kernels  # float32 stays the exact reference
    # where they cannot be built: a warning saying why, and the torch ops
    monkeypatch.setitem(kernels._BUILT, "reason", "no C++ compiler ('c++' is not on PATH; set CXX to one)")
    with caplog.at_level(logging.WARNING, logger="expandr_haystack.generation.kernels"):
        decoder = PackedLlamaDecoder(model, "int8", CALIBRATION)
    assert not decoder.kernels and "no C++ compiler" in caplog.text
    assert type(decoder.layers[0].qkv) is quantize._Int8Linear


def test_a_missing_compiler_is_a_reason_not_a_crash(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    assert "no C++ compiler" in kernels._build()


def test_the_build_is_named_for_its_source_flags_and_cpu(monkeypatch):
    """A build directory shared between machines never loads code compiled for another CPU's instructions."""
    name = kernels.build_name(["-O3", "-march=native"])
    assert name.startswith("expandr_kernels_") and name == kernels.build_name(["-O3", "-march=native"])
    assert name != kernels.build_name(["-O3", "-mavx2"])
    monkeypatch.setattr(kernels, "_cpu_fingerprint", lambda: "another CPU")
    assert name != kernels.build_name(["-O3", "-march=native"])


def test_compile_flags_follow_torchs_isa_switch(monkeypatch):
    monkeypatch.setattr(kernels.platform, "machine", lambda: "x86_64")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    assert "-march=native" in kernels.compile_flags()
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    flags = kernels.compile_flags()
    assert "-mavx2" in flags and "-march=native" not in flags


@needs_kernels
@needs_int8
def test_sampler_engine_names_the_fused_path():
    """Fused texts differ from the torch-op int8 texts near draw boundaries: the cache keys keep them apart."""
    model = tiny_llama()
    fused = LocalSampler(model, CharTokenizer(), decoder=PackedLlamaDecoder(model, "int8", CALIBRATION))
    plain = LocalSampler(model, CharTokenizer(), decoder=PackedLlamaDecoder(model, "int8", CALIBRATION,
                                                                             kernels=False))
    assert fused.engine.startswith("packed-int8") and fused.engine != plain.engine
    assert "-fused" in fused.engine and "-fused" not in plain.engine


@needs_kernels
def test_row_codes_are_quantize_per_tensors_codes_of_the_row_input():
    """oneDNN's uint8 input straight from the kernel: the codes `quantize_per_tensor` gives `row_input`'s rows, and
    the same row scales."""
    scale, zero_point, _ = quantize.fbgemm_input_grid()
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(40, 576, generator=generator) * torch.logspace(-2, 2, 40)[:, None]
    weights, eps = torch.rand(576, generator=generator) + 0.5, torch.tensor(1e-5)
    codes, a = torch.ops.expandr.row_codes(x, weights, eps, scale, zero_point)
    rows, expected_a = torch.ops.expandr.row_input(x, weights, eps)
    assert codes.dtype == torch.uint8 and torch.equal(a, expected_a)
    assert torch.equal(codes, torch.quantize_per_tensor(rows, scale, zero_point, torch.quint8).int_repr())


@needs_kernels
@needs_int8
def test_row_codes_round_the_grids_midpoints_as_fbgemm_does():
    """On values at and a float32 step either side of the midpoints between grid codes, the kernel's codes are
    FBGEMM's (one fused multiply-add with the zero point, then half to even): rounding v / scale before adding the
    zero point gives another code for ~1 in 6 of these values (~1 in 50,000 random ones: enough to change the texts
    of a whole batch when oneDNN, fed these codes, ran instead of FBGEMM)."""
    scale, zero_point, _ = quantize.fbgemm_input_grid()
    x = quantize.grid_midpoint_rows(64, 576, torch.Generator().manual_seed(9)) * 4  # x 4: the row division is exact
    codes, a = torch.ops.expandr.row_codes(x, None, None, scale, zero_point)
    rows, _ = quantize.int8_row_input(x)
    assert torch.equal(a, torch.full((64, 1), 4.0))
    assert torch.equal(codes, torch.quantize_per_tensor(rows, scale, zero_point, torch.quint8).int_repr())
    rounded_apart = (torch.round(rows * torch.tensor(1 / scale, dtype=torch.float32)) + zero_point).to(torch.uint8)
    assert (rounded_apart != codes).float().mean() > 0.1  # the midpoints are where the two roundings part


@needs_kernels
@needs_int8
@pytest.mark.skipif(quantize.onednn_int8_unsupported_reason() is not None,
                    reason=f"oneDNN's int8 product is not used here: {quantize.onednn_int8_unsupported_reason()}")
def test_fused_layer_feeds_onednn_its_codes_from_its_threshold():
    """From its oneDNN threshold the fused layer gives oneDNN the kernel's codes: the product equals the torch-op
    layer's (oneDNN on `quantize_per_tensor`'s codes, equal to FBGEMM's) up to the row scale's last bits."""
    generator = torch.Generator().manual_seed(8)
    weight, norm = torch.randn(300, 576, generator=generator) * 0.05, torch.rand(576, generator=generator) + 0.5
    fused, plain = (cls(weight, norm, 1e-5) for cls in (quantize._FusedInt8Linear, quantize._Int8Linear))
    assert fused.onednn is not None and fused.onednn_min_rows == plain.onednn_min_rows
    for rows in (fused.onednn_min_rows - 1, fused.onednn_min_rows, fused.onednn_min_rows + 9):
        x = torch.randn(rows, 576, generator=generator)
        torch.testing.assert_close(fused(x), plain(x), rtol=1e-6, atol=1e-6)
    # whichever kernel runs a row (oneDNN in a batch, FBGEMM alone), its product is the same, midpoints included
    fused.scale, fused.eps = None, None
    x = quantize.grid_midpoint_rows(fused.onednn_min_rows, 576, generator) * 4
    by_onednn = fused(x)
    fused.onednn_min_rows = x.shape[0] + 1
    assert torch.equal(by_onednn, fused(x))


def fused_and_own(out_features: int, in_features: int, seed: int):
    """A `_FusedInt8Linear` (FBGEMM's product) and what `make_linear` makes of the same weights, RMSNorm included."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.05
    norm = torch.rand(in_features, generator=generator) + 0.5
    return quantize._FusedInt8Linear(weight, norm, 1e-5), quantize.make_linear(weight, "int8", norm, 1e-5, fused=True)


@needs_kernels
@needs_int8
def test_own_int8_product_is_fbgemms_bit_for_bit():
    """``expandr::int8_product`` (VNNI's or AVX2's integer sums, FBGEMM's epilogue) equals FBGEMM's product of the
    same rows bit for bit: one row, the register tiles' tails, several tiles, random rows and the grid's midpoints."""
    fused, own = fused_and_own(96, 200, seed=10)
    assert type(own) is quantize._OwnInt8Linear  # made: its products passed the check at load
    block = torch.ops.expandr.int8_product_block()
    assert block in (8, 16) and tuple(own.product_weights.shape) == (96 // block, 50, block, 4)
    generator = torch.Generator().manual_seed(11)
    for rows in (1, 2, 5, 8, 9, 15, 16, 17, 31, 40, 70):
        for x in (quantize.int8_row_input(torch.randn(rows, 200, generator=generator))[0],
                  quantize.grid_midpoint_rows(rows, 200, generator)):
            codes, _ = torch.ops.expandr.row_codes(x, None, None, own.input_scale, own.input_zero_point)
            got = torch.ops.expandr.int8_product(codes, own.product_weights, own.product_offsets, own.output_scales)
            assert torch.equal(got, fused.product(x, False)), rows


@needs_kernels
@needs_int8
def test_own_layer_gives_the_fused_layers_values_without_fbgemms_copy():
    """`make_linear` hands a fused layer whose products the kernel matches to `_OwnInt8Linear`, which holds no FBGEMM
    copy of the weights and multiplies with the kernel (oneDNN's from its threshold where it runs): the fused
    layer's values bit for bit at every row count, the MLP's gated input too, and about the torch-op layer's."""
    from torch.profiler import ProfilerActivity, profile

    fused, own = fused_and_own(64, 96, seed=12)
    assert not hasattr(own, "packed")
    plain = quantize._Int8Linear(fused.packed.unpack()[0].dequantize(), fused.scale, 1e-5)
    generator = torch.Generator().manual_seed(13)
    for rows in (1, 16, 40, 300):
        x, residual = torch.randn(rows, 96, generator=generator), torch.randn(rows, 64, generator=generator)
        gate_up = torch.randn(rows, 2 * 96, generator=generator)
        with profile(activities=[ProfilerActivity.CPU]) as run:
            got, got_gated = own(x, residual), own.gated(gate_up)
        kernel = sum(event.name == "expandr::int8_product" for event in run.events())
        assert kernel == (0 if own.onednn is not None and rows >= own.onednn_min_rows else 2), rows
        assert torch.equal(got, fused(x, residual)) and torch.equal(got_gated, fused.gated(gate_up)), rows
        torch.testing.assert_close(got, plain(x, residual), rtol=1e-5, atol=1e-5)


@needs_kernels
@needs_int8
def test_own_product_is_left_where_the_shape_does_not_fit_and_checks_its_arguments():
    """Outputs not a multiple of the kernel's block (or inputs not of 4) keep FBGEMM's product; the op itself names
    what it was given wrong."""
    fused, kept = fused_and_own(100, 96, seed=14)  # 100 outputs: not a multiple of 8 nor 16
    assert type(kept) is quantize._FusedInt8Linear and fused.own_product_weights() is None
    _, own = fused_and_own(64, 96, seed=15)
    codes = torch.zeros(2, 96, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="expandr::int8_product: `packed` must be"):
        torch.ops.expandr.int8_product(codes[:, :92].contiguous(), own.product_weights, own.product_offsets,
                                       own.output_scales)
    with pytest.raises(RuntimeError, match="`offsets` \\(int32\\) and `scales` \\(float32\\)"):
        torch.ops.expandr.int8_product(codes, own.product_weights, own.product_offsets[:5], own.output_scales)


@pytest.mark.integration
@needs_kernels
@needs_int8
@pytest.mark.skipif(quantize.onednn_int8_unsupported_reason() is not None,
                    reason=f"oneDNN's int8 product is not used here: {quantize.onednn_int8_unsupported_reason()}")
@torch.inference_mode()
def test_bundled_fused_decoder_gives_the_same_logits_with_and_without_onednn(monkeypatch):
    """On the bundled model and real expansion prompts (16 rows: oneDNN runs the prefill's larger products, the
    kernels' own product the rest) the fused decoder's logits equal FBGEMM's alone bit for bit, so a row's text does not
    depend on the batch it is drawn in nor on the kernel. (With `row_codes` rounding v / scale before adding the zero
    point they were up to 2.3 apart: codes at the grid's midpoints, which the tiny model's test never met.)"""
    from expandr_haystack.core.text import EXPANSION_PROMPT
    from expandr_haystack.generation.local import calibration_ids
    from expandr_haystack.models import load_llm

    model, tokenizer = load_llm(None, None, "cpu", "float32")
    queries = ["what is lift", "boundary layer transition on a flat plate at supersonic speed",
               "heat transfer in hypersonic flow", "buckling of thin cylindrical shells under axial compression"]
    prompts = [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": EXPANSION_PROMPT.format(query=q)}],
                                                       tokenize=False, add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"] for q in queries]
    calibration = calibration_ids(tokenizer)
    with_onednn = PackedLlamaDecoder(model, "int8", calibration, kernels=True)
    monkeypatch.setattr(quantize, "onednn_int8_unsupported_reason", lambda: "switched off by the test")
    monkeypatch.setattr(quantize._FusedInt8Linear, "own_product_weights", lambda self: None)  # nor the kernel's
    fbgemm_only = PackedLlamaDecoder(model, "int8", calibration, kernels=True)
    assert with_onednn.lm_head.onednn is not None and fbgemm_only.lm_head.onednn is None
    assert type(with_onednn.lm_head) is quantize._OwnInt8Linear and type(fbgemm_only.lm_head) is quantize._FusedInt8Linear
    assert_same_logits(with_onednn, fbgemm_only, prompts, [i % 4 for i in range(16)], steps=4)
    assert_same_logits(with_onednn, fbgemm_only, prompts[:1], [0], steps=4)  # one row: the product alone


@needs_kernels
@needs_int8
@torch.inference_mode()
def test_the_common_prefix_is_read_once_with_the_same_result():
    """The decoding kernel reads the prompts' common prefix from the first row's cache for every row (`shared`):
    the same keys and values as each row's own copy, so the logits are equal bit for bit to reading each row's."""
    model = tiny_llama(seed=3)
    decoder = PackedLlamaDecoder(model, "int8", CALIBRATION, kernels=True)
    prompts, select = [[5, 9, 17, 33, 40, 41], [5, 9, 17, 8], [5, 9, 17, 52, 53]], torch.tensor([0, 1, 1, 2])
    (got, state), (expected, own) = (decoder.prefill(prompts, select, 8) for _ in range(2))
    assert state.shared == 3
    own.shared = 0
    for _ in range(8):
        assert torch.equal(got, expected)
        tokens = expected.argmax(-1)
        got, expected = decoder.decode(state, tokens), decoder.decode(own, tokens)
    assert torch.equal(got, expected)
    heads, _, qkv, rotation, keys, values, bias = _attention_case(torch.float16, 64, 9)
    with pytest.raises(RuntimeError, match="`shared` 10 must be in 0 .. start"):
        torch.ops.expandr.decode_attention(qkv, rotation, keys, values, 9, bias, heads, 10)


@needs_kernels
@needs_int8
@pytest.mark.skipif("avx512f" not in quantize.cpu_flags(),
                    reason="without AVX-512 the kernels built here are the AVX2 build: the tests above run it")
def test_the_avx2_build_passes_these_tests():
    """What an AVX2-only CPU (e.g. AMD Zen 2/3) runs, emulated: torch, FBGEMM and oneDNN held to AVX2 by their own
    switches (hence a child pytest: each reads its switch once per process), the kernels compiled for AVX2 (8-lane
    vectors, F16C conversions) and this file's tests run on that build and on FBGEMM's 7-bit-weight path."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
           "ONEDNN_MAX_CPU_ISA": "AVX2"}
    check = ("import torch; from expandr_haystack.generation import kernels, quantize; "
             "assert '-mavx2' in kernels.compile_flags() and kernels.resolve_kernels(None); "
             "print('levels', quantize.int8_weight_levels(), 'onednn', quantize.onednn_int8_unsupported_reason())")
    probe = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=600,
                           check=False)
    assert probe.returncode == 0 and "levels 64 onednn ONEDNN_MAX_CPU_ISA=AVX2" in probe.stdout, probe.stderr[-2000:]
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                             "not avx2_build and not bundled"], env=env, capture_output=True, text=True, timeout=600,
                            check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    passed = re.search(r"(\d+) passed", result.stdout)
    assert passed and int(passed.group(1)) >= 30, result.stdout[-2000:]  # the kernel tests ran, not skipped
