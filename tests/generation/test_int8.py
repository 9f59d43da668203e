"""
The packed decoder's weight precisions (issue 15): int8 weights through FBGEMM on smoothed, per-row 8-bit inputs
against float32, the smoothing's exactness, the option's checks, and a cache key that keeps int8 texts apart while
float32 keys stay as they were. Kernel and tiny-model tests are fast; one test reads the bundled
SmolLM2-135M-Instruct (no download).
"""

import pytest
import torch
from test_packed_llama import CharTokenizer, assert_same_logits, tiny_llama

from expandr_haystack.generation import kernels, quantize
from expandr_haystack.generation.local import LocalSampler, TransformersDecoder, calibration_ids, default_decoder
from expandr_haystack.generation.packed_llama import PackedLlamaDecoder
from expandr_haystack.generation.quantize import (
    _Int8Linear,
    fbgemm_input_grid,
    input_maxima,
    int8_row_input,
    int8_unsupported_reason,
    quantize_per_channel,
    resolve_precision,
    rms_factor,
    smoothing_scales,
)
from expandr_haystack.options import GenerationSettings, SamplerOptions

needs_int8 = pytest.mark.skipif(int8_unsupported_reason() is not None,
                                reason=f"int8 path unavailable: {int8_unsupported_reason()}")
#: the int8 engine's cache name on this CPU (7-bit weights without FBGEMM's VNNI kernels; the fused kernels where
#: they load)
INT8_NAME = ("packed-int8-smoothed.3" + ("" if quantize.int8_weight_levels() == 127 else "-w64")
             + ("-fused" if kernels.unavailable_reason() is None else ""))
PROMPTS = [[5, 9, 17, 33, 40, 41], [5, 9, 17, 8], [50, 51, 52, 53, 54, 60, 61]]
CALIBRATION = calibration_ids(CharTokenizer())


def test_quantize_per_channel_rounds_each_row_to_its_own_grid():
    weight = torch.randn(40, 24) * torch.logspace(-3, 1, 40)[:, None]  # rows of very different sizes
    weight[7] = 0.0
    q, scales = quantize_per_channel(weight)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
    assert torch.equal(q.abs().amax(dim=1)[torch.arange(40) != 7], torch.full((39,), 127, dtype=torch.int8))
    error = (q.float() * scales[:, None] - weight).abs()
    assert bool((error <= scales[:, None] / 2 * (1 + 1e-5)).all())  # at most half a step of the row's own grid
    assert torch.equal(q[7], torch.zeros(24, dtype=torch.int8))
    q7, scales7 = quantize_per_channel(weight, 64)  # FBGEMM without VNNI: 64 levels a sign
    rows = torch.arange(40) != 7
    assert int(q7.abs().max()) == 64 and torch.allclose(scales7[rows], scales[rows] * 127 / 64)


@needs_int8
def test_fbgemm_quantizes_inputs_on_the_grid_we_assume():
    """The per-row input relies on knowing FBGEMM's grid for an input in [-1, 1] (a row's codes are then its own):
    an identity weight returns the kernel's quantized input, which must be `fbgemm_input_grid`'s (a changed kernel
    fails here, not silently)."""
    identity = _Int8Linear(torch.eye(32))
    # fixed inputs: an unseeded draw could land within float rounding of a code boundary, where FBGEMM (x * 1/scale)
    # and fake_quantize (x / scale) may round to neighbouring codes (this test once failed so)
    x = torch.rand(9, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x[0, :2] = torch.tensor([-1.0, 1.0])  # the range is exactly [-1, 1]
    scale, zero_point, largest = fbgemm_input_grid()
    expected = torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, largest)
    chosen = torch.ops.quantized.linear_dynamic(x, identity.packed, False)  # the grid FBGEMM picks for [-1, 1]
    torch.testing.assert_close(chosen, expected, rtol=0, atol=1e-6)
    given = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(x, scale, zero_point, identity.packed)
    assert torch.equal(given, chosen)  # the kernel `_Int8Linear` calls, with that grid given: the same codes


@needs_int8
def test_int8_linear_is_the_dequantized_weight_product_and_row_independent():
    torch.manual_seed(0)
    weight = torch.randn(300, 64)
    x = torch.randn(6, 64) * torch.tensor([1.0, 10.0, 0.1, 3.0, 50.0, 1e-3])[:, None]
    x[2, 5] = 40.0  # an outlier channel
    linear = _Int8Linear(weight)
    out = linear(x)
    q, scales = quantize_per_channel(weight, linear.levels)
    dequantized_weight = q.float() * scales[:, None]
    dequantized = x @ dequantized_weight.t()
    # one 8-bit grid per row: each input within half a step (scale / 2) of its row's largest |x|, so the product is
    # the dequantized weights' to that times the row's largest |x| times the largest row sum of |weight|
    scale = fbgemm_input_grid()[0]
    bound = 1.01 * scale / 2 * x.abs().amax(1) * float(dequantized_weight.abs().sum(1).max())
    assert bool(((out - dequantized).abs().amax(1) <= bound).all()), ((out - dequantized).abs().amax(1), bound)
    assert bool(((out - dequantized).abs().amax(1) > 1e-3 * bound).all())  # the inputs are rounded, not exact
    assert not torch.allclose(out, x @ weight.t(), rtol=0, atol=1e-6)  # it does use int8 weights
    for r in range(len(x)):  # per-row scales and a fixed grid: a row's result does not depend on the others
        assert torch.equal(linear(x[r : r + 1])[0], out[r])


@needs_int8
def test_int8_layer_applies_scale_norm_and_residual_around_the_int8_product():
    """``_Int8Linear(w, scale, eps)(x, residual)`` = residual + int8-product of ``scale * RMSNorm(x)``: the norm's
    per-row factor moves from the input to the output's row scale (`rms_factor`), which leaves each row's 8-bit
    codes as they are; so it equals the plain int8 layer on the normed input up to float rounding."""
    torch.manual_seed(1)
    weight, scale = torch.randn(48, 32), torch.rand(32) + 0.5
    x, residual = torch.randn(5, 32) * torch.tensor([1.0, 20.0, 0.01, 3.0, 0.5])[:, None], torch.randn(5, 48)
    eps = 1e-5
    normed = scale * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    torch.testing.assert_close(rms_factor(x, torch.tensor(eps)), torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    fused = _Int8Linear(weight, scale, eps)(x, residual)
    plain = _Int8Linear(weight)(normed)
    torch.testing.assert_close(fused, residual + plain, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fused, residual + normed @ weight.t(), rtol=0, atol=1e-4)  # int8, not float32


def test_row_input_layout():
    x = torch.randn(4, 16) * torch.tensor([3.0, 0.01, 100.0, 1.0])[:, None]
    x[3] = 0.0  # an all-zero row stays zero, no division by zero
    rows, a = int8_row_input(x)
    assert rows.shape == (4, 16) and a.shape == (4, 1)
    assert torch.equal(rows[:3].abs().amax(1), torch.ones(3)) and torch.equal(rows[3], torch.zeros(16))
    torch.testing.assert_close(rows * a, x, rtol=1e-6, atol=0)


def test_smoothing_is_an_identity_that_flattens_channel_ranges():
    """``x W^T = (x / c)(W c)^T``; at alpha 0.5 each channel's input range over c equals its weight range times c,
    so an outlier input channel (100x) ends with a range ~10x, not 100x, the others'."""
    torch.manual_seed(0)
    x, weight = torch.randn(32, 24), torch.randn(40, 24)
    x[:, 3] *= 100.0
    c = smoothing_scales(x.abs().amax(0), weight)
    torch.testing.assert_close((x / c) @ (weight * c).t(), x @ weight.t(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close((x / c).abs().amax(0), (weight * c).abs().amax(0), rtol=1e-5, atol=0)
    ranges = (x / c).abs().amax(0)
    assert float(ranges[3] / ranges.median()) < 20 < float(x.abs().amax(0)[3] / x.abs().amax(0).median())
    unseen = smoothing_scales(torch.zeros(24), torch.zeros(40, 24))  # never active, all-zero weights: finite
    assert bool(torch.isfinite(unseen).all()) and bool((unseen > 0).all())


@torch.inference_mode()
def test_smoothing_is_exact_in_float32():
    """The folding (norm weights, up rows, o's divisor, the head's norm) changes the float32 decoder only by
    rounding; the maxima come from every linear layer of the model."""
    model = tiny_llama(seed=2)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    maxima = input_maxima(model, CALIBRATION)
    assert set(maxima) == {(i, k) for i in range(3) for k in ("qkv", "o", "gate_up", "down")} | {(-1, "head")}
    assert maxima[(0, "gate_up")].shape == (64,) and maxima[(0, "down")].shape == (96,)
    plain, smoothed = PackedLlamaDecoder(model), PackedLlamaDecoder(model, calibration=CALIBRATION)
    assert not torch.allclose(plain.layers[0].qkv.scale, smoothed.layers[0].qkv.scale)  # it did fold
    select = torch.tensor([0, 1, 2, 2])
    (ref, ref_state), (got, got_state) = (d.prefill(PROMPTS, select, 4) for d in (plain, smoothed))
    for _ in range(4):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
        tokens = ref.argmax(-1)
        ref, got = plain.decode(ref_state, tokens), smoothed.decode(got_state, tokens)
    with pytest.raises(ValueError, match=r"`calibration` must be a non-empty list"):
        input_maxima(model, [[]])
    after = model.state_dict()  # the folding works on copies: the model itself is untouched
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert not any(module._forward_pre_hooks for module in model.modules())  # the calibration hooks are gone


@needs_int8
def test_int8_without_calibration_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"`calibration` is required for precision 'int8'.*calibration_ids"):
        PackedLlamaDecoder(tiny_llama(), precision="int8")
    with pytest.raises(ValueError, match=r"`calibration` is required for precision 'auto' \(int8 on this CPU\)"):
        PackedLlamaDecoder(tiny_llama(), precision="auto")


@needs_int8
@torch.inference_mode()
def test_int8_decoder_logits_are_float32_within_quantization_rounding():
    """
    Tiny random Llama (weights N(0, 0.2), logits of size ~10): int8 logits within 5% of the largest logit of the
    float32 ones at prefill and over 8 teacher-forced decode steps. Per-channel int8 rounds each weight by at most
    1/254 of its row's largest and each input by 1/255 of its row's largest (keys and values, in float16, by far
    less); 3 layers x 4 matmuls + the head compound to 1.8-3.3% measured (AVX-512 VNNI), so 5% leaves some room; at 1% the test fails (the error is real,
    not zero). The top token is float32's in >= 80% of the steps (measured 32 of 32).
    """
    model = tiny_llama(seed=1)
    exact, int8 = PackedLlamaDecoder(model), PackedLlamaDecoder(model, precision="int8", calibration=CALIBRATION)
    assert (exact.precision, int8.precision) == ("float32", "int8")
    select = torch.tensor([0, 1, 2, 0])
    (ref, ref_state), (got, got_state) = (d.prefill(PROMPTS, select, 8) for d in (exact, int8))
    # int8 keeps its KV cache in float16 (half the bytes attention reads), float32 in float32 (the exact reference)
    assert {k.dtype for k in got_state.keys + got_state.values} == {torch.float16}
    assert {k.dtype for k in ref_state.keys + ref_state.values} == {torch.float32}
    agree = total = 0
    for _ in range(8):
        size = float(ref.abs().max())
        worst = float((got - ref).abs().max())
        assert worst <= 0.05 * size, (worst, size)
        agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
        total += len(ref)
        tokens = ref.argmax(-1)  # both fed float32's greedy tokens (teacher forcing): errors do not compound
        ref, got = exact.decode(ref_state, tokens), int8.decode(got_state, tokens)
    assert agree >= 0.8 * total, (agree, total)
    assert float((got - ref).abs().max()) > 1e-3 * float(ref.abs().max())  # not secretly float32


@needs_int8
@torch.inference_mode()
def test_int8_greedy_tokens_agree_on_the_bundled_model():
    """The bundled SmolLM2-135M-Instruct, 8 prompts (4 queries, plain and in the expansion prompt), 24
    teacher-forced greedy steps: the int8 top token is float32's in >= 90% of the steps (measured 97.4% with VNNI's
    8-bit inputs; 96.9% before the norms moved into the row scales) and the mean KL(float32 || int8) of the
    next-token distributions is below 0.025 nats (measured 0.014; 0.017 before; and, before too: without the
    smoothing 0.038, with random-token calibration 0.022, with FBGEMM's 7-bit inputs 0.044). With 7-bit weights
    (FBGEMM without VNNI) >= 88% and below 0.035 (measured 91.1% and 0.027). This is the test that catches a broken
    smoothing."""
    from expandr_haystack.core.text import EXPANSION_PROMPT
    from expandr_haystack.models import load_llm

    model, tokenizer = load_llm(None, None, "cpu", "float32")
    queries = ["what is lift", "boundary layer transition on a flat plate at supersonic speed",
               "heat transfer in hypersonic flow", "buckling of thin cylindrical shells under axial compression"]
    ids = [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                   tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"]
           for text in [f"Write a passage about: {q}" for q in queries] + [EXPANSION_PROMPT.format(query=q)
                                                                            for q in queries]]
    exact = PackedLlamaDecoder(model)
    int8 = PackedLlamaDecoder(model, precision="int8", calibration=calibration_ids(tokenizer))
    select = torch.arange(len(ids))
    (ref, ref_state), (got, got_state) = (d.prefill(ids, select, 24) for d in (exact, int8))
    agree, kl = [], []
    for _ in range(24):
        agree.append((got.argmax(-1) == ref.argmax(-1)).float())
        p, q = ref.log_softmax(-1), got.log_softmax(-1)
        kl.append((p.exp() * (p - q)).sum(-1))
        tokens = ref.argmax(-1)
        ref, got = exact.decode(ref_state, tokens), int8.decode(got_state, tokens)
    rate, mean_kl = float(torch.cat(agree).mean()), float(torch.cat(kl).mean())
    if int8.int8_levels == 127:
        assert rate >= 0.9, rate
        assert 0 < mean_kl < 0.025, mean_kl
    else:  # 7-bit weights (FBGEMM without VNNI): measured 91.1% and KL 0.027
        assert rate >= 0.88, rate
        assert 0 < mean_kl < 0.035, mean_kl
    print(f"int8 levels {int8.int8_levels}: greedy agreement {rate:.3f}, KL {mean_kl:.4f}")


@torch.inference_mode()
def test_calibration_maxima_do_not_depend_on_the_thread_count():
    """The int8 weights follow the calibration maxima; float32 kernels round differently with the number of threads
    (on the bundled model, 2 threads against 1 changed 117 of its 121 maxima), so the maxima are measured on one
    thread: equal bit for bit whatever torch's thread count, which is restored after. (A `torchrun` worker with
    OMP_NUM_THREADS=1 wrote other int8 expansions than a 2-thread process before.)"""
    from expandr_haystack.models import load_llm

    model, tokenizer = load_llm(None, None, "cpu", "float32")
    calibration = calibration_ids(tokenizer)[:3]
    before = torch.get_num_threads()
    try:
        measured = []
        for threads in (2, 1):
            torch.set_num_threads(threads)
            measured.append(input_maxima(model, calibration))
            assert torch.get_num_threads() == threads  # restored
    finally:
        torch.set_num_threads(before)
    assert measured[0].keys() == measured[1].keys()
    assert all(torch.equal(measured[0][k], measured[1][k]) for k in measured[0])


@needs_int8
def test_without_vnni_8bit_weights_saturate_and_the_path_takes_7bit_weights():
    """FBGEMM's kernels without VNNI sum uint8 x int8 pairs in int16: with 8-bit weights rows aligned with the
    weights' signs come out wrong (saturated), so the path takes 64 levels, exact again. With VNNI both are exact."""
    torch.manual_seed(0)
    weight = torch.randn(32, 256)
    x = torch.sign(weight[:4]) * 0.9  # inputs aligned with the weights' signs: the largest pair sums
    scale, zero_point, largest = fbgemm_input_grid()
    for levels in (127, 64):
        linear = _Int8Linear(weight, levels=levels)
        q, scales = quantize_per_channel(weight, levels)
        # the kernel's input grid: rows over their maxima on the grid of [-1, 1]
        rows, a = int8_row_input(x)
        exact = torch.fake_quantize_per_tensor_affine(rows, scale, zero_point, 0, largest) @ (q.float() * scales[:, None]).t()
        error = float(((linear(x) - exact * a).abs().amax(1) / (exact * a).abs().amax(1)).max())
        if levels == 64 or quantize.fbgemm_has_vnni():
            assert error < 1e-5, (levels, error)
        else:
            assert error > 1e-3, (levels, error)  # saturated: why 8-bit weights are not used there
    assert _Int8Linear(weight).levels == quantize.int8_weight_levels()


@pytest.mark.skipif(int8_unsupported_reason() is not None or not quantize.fbgemm_has_vnni(),
                    reason="runs FBGEMM's AVX2 kernels on a VNNI CPU; without VNNI the tests above run them natively")
def test_the_avx2_path_through_fbgemms_switch():
    """``FBGEMM_ENABLE_INSTRUCTIONS=AVX2`` puts FBGEMM on the AVX2 kernels a CPU without VNNI gets (its switch is
    read once per process, hence a child pytest): the saturation check, the bundled-model accuracy, the cache name
    and the linear layer's exactness in that setting."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}
    tests = "saturate or greedy or engine_names or dequantized_weight_product"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-s", __file__, "-k",
                             tests], env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "4 passed" in result.stdout and "int8 levels 64" in result.stdout, result.stdout[-2000:]


needs_onednn = pytest.mark.skipif(int8_unsupported_reason() is not None
                                  or quantize.onednn_int8_unsupported_reason() is not None,
                                  reason=f"oneDNN's int8 product is not used here: "
                                         f"{quantize.onednn_int8_unsupported_reason()}")


@needs_onednn
def test_onednn_product_equals_fbgemms_and_runs_from_its_row_count():
    """With AMX, `_Int8Linear` also holds its int8 weights for oneDNN and multiplies there from the row count where a
    product takes `ONEDNN_MIN_MULTIPLY_ADDS` (8 rows at least; oneDNN is the slower at a few rows): the product equals
    FBGEMM's bit for bit, so which kernel ran never changes a text; below that row count FBGEMM runs."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(2)
    weight = torch.randn(3000, 96)
    linear = _Int8Linear(weight, scale=torch.rand(96) + 0.5, eps=1e-5)
    assert linear.onednn is not None  # kept: it passed its equality check
    assert linear.onednn_min_rows == max(quantize.ONEDNN_MIN_ROWS, -(-quantize.ONEDNN_MIN_MULTIPLY_ADDS // 288_000))
    assert _Int8Linear(torch.randn(49152, 576) * 0.05).onednn_min_rows == quantize.ONEDNN_MIN_ROWS  # a vocabulary head
    for rows in (quantize.ONEDNN_MIN_ROWS, 17, 300):
        x = torch.rand(rows, 96) * 2 - 1
        assert torch.equal(linear.product(x, True), linear.product(x, False)), rows
    for rows, kernel in ((linear.onednn_min_rows - 1, "quantized::linear_with_input"),
                         (linear.onednn_min_rows, "onednn::qlinear_pointwise")):
        x = torch.randn(rows, 96)
        with profile(activities=[ProfilerActivity.CPU]) as run:
            out = linear(x)
        assert any(event.name.startswith(kernel) for event in run.events()), (rows, kernel)
        assert torch.equal(out, _Int8Linear(weight, scale=linear.scale, eps=1e-5, onednn=False)(x))


@needs_onednn
@torch.inference_mode()
def test_int8_decoder_gives_the_same_logits_with_and_without_onednn(monkeypatch):
    """The whole int8 decoder (a prefill of 3 prompts, then 6 steps of 9 rows: oneDNN in every layer at both, its row
    counts lowered for the tiny model's small products; the head's 3 prefill rows stay on FBGEMM) gives the same
    logits bit for bit as with FBGEMM alone."""
    monkeypatch.setattr(quantize, "ONEDNN_MIN_MULTIPLY_ADDS", 0)
    model = tiny_llama(seed=3)
    with_onednn = PackedLlamaDecoder(model, precision="int8", calibration=CALIBRATION)
    monkeypatch.setattr(quantize, "onednn_int8_unsupported_reason", lambda: "switched off by the test")
    fbgemm_only = PackedLlamaDecoder(model, precision="int8", calibration=CALIBRATION)
    linears = [with_onednn.lm_head] + [getattr(layer, name) for layer in with_onednn.layers
                                        for name in ("qkv", "o", "gate_up", "down")]
    assert all(linear.onednn is not None and linear.onednn_min_rows == 8 for linear in linears)  # none fell back
    assert fbgemm_only.lm_head.onednn is None
    assert_same_logits(with_onednn, fbgemm_only, PROMPTS, [0, 1, 2, 0, 1, 2, 2, 1, 0], steps=6)


@pytest.mark.skipif(not hasattr(torch.ops.onednn, "qlinear_pointwise") or not torch.backends.mkldnn.is_available(),
                    reason="this torch build has no oneDNN int8 linear")
def test_onednn_is_used_only_with_amx_it_may_run(monkeypatch):
    """oneDNN's int8 product is taken only with AMX-INT8, and not where ``ONEDNN_MAX_CPU_ISA`` holds oneDNN below it
    (how the AVX2 and VNNI paths are measured on an AMX CPU); each refusal says why."""
    monkeypatch.setattr(quantize, "cpu_flags", lambda: frozenset({"avx2", "avx512_vnni"}))
    assert "no AMX-INT8" in quantize.onednn_int8_unsupported_reason()
    monkeypatch.setattr(quantize, "cpu_flags", lambda: frozenset({"avx2", "avx512_vnni", "amx_int8", "amx_tile"}))
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_VNNI")
    assert "ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI" in quantize.onednn_int8_unsupported_reason()
    for setting in ("AVX512_CORE_AMX", "ALL", ""):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", setting)
        assert quantize.onednn_int8_unsupported_reason() is None, setting


# -- the option ---------------------------------------------------------------------------------------------------
def test_precision_option_is_checked_with_its_name_and_choices():
    model, tokenizer = tiny_llama(), CharTokenizer()
    for call in (lambda: LocalSampler(model, tokenizer, weight_precision="int4"),
                 lambda: PackedLlamaDecoder(model, precision="fp8"), lambda: resolve_precision("half")):
        with pytest.raises(ValueError, match=r"`(weight_)?precision` must be one of 'auto', 'float32', 'int8', 'bfloat16'"):
            call()
    from expandr_haystack import LLMQueryExpander

    with pytest.raises(ValueError, match=r"`weight_precision` must be one of 'auto', 'float32', 'int8', 'bfloat16'"):
        LLMQueryExpander(sampler={"weight_precision": "int4"})
    with pytest.raises(ValueError, match=r"`weight_precision`='int8' .* `engine`='transformers'"):
        LLMQueryExpander(sampler={"weight_precision": "int8", "engine": "transformers"})
    # int8 needs the packed decoder: a model it cannot run is an error, not a silent float32
    with pytest.raises(ValueError, match=r"`weight_precision`='int8' needs the packed decoder.*projections with bias"):
        default_decoder(tiny_llama(attention_bias=True), weight_precision="int8")
    assert isinstance(default_decoder(tiny_llama(attention_bias=True), weight_precision="auto"), TransformersDecoder)


def test_auto_and_bfloat16_follow_the_cpu_features(monkeypatch):
    monkeypatch.delenv("FBGEMM_ENABLE_INSTRUCTIONS", raising=False)
    monkeypatch.setattr(quantize, "cpu_flags", lambda: frozenset({"avx", "fma"}))
    assert resolve_precision("auto") == "float32"
    with pytest.raises(ValueError, match=r"`weight_precision`='int8' cannot run here: the CPU has no AVX2"):
        resolve_precision("int8")
    with pytest.raises(ValueError, match=r"`weight_precision`='bfloat16' cannot run here: the CPU has no native bfloat16"):
        resolve_precision("bfloat16")
    monkeypatch.setattr(quantize, "cpu_flags", lambda: frozenset({"asimd", "fp", "sve"}))  # an ARM CPU
    assert resolve_precision("auto") == "float32"
    fbgemm = "fbgemm" in torch.backends.quantized.supported_engines
    for flags in ({"avx2", "fma"}, {"avx2", "avx_vnni"}, {"avx512f", "avx512bw", "avx2"}):  # no AVX512-VNNI: 7 bits
        monkeypatch.setattr(quantize, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert quantize.int8_weight_levels() == 64 and not quantize.fbgemm_has_vnni()
        assert resolve_precision("auto") == ("int8" if fbgemm else "float32")
    monkeypatch.setattr(quantize, "cpu_flags", lambda: frozenset({"avx2", "avx512_vnni"}))
    assert quantize.int8_weight_levels() == 127
    for setting, levels in (("AVX2", 64), ("avx512", 64), ("AVX512_256", 64), ("AVX512_E1", 127), ("", 127)):
        monkeypatch.setenv("FBGEMM_ENABLE_INSTRUCTIONS", setting)  # FBGEMM's own switch, as FBGEMM reads it
        assert quantize.int8_weight_levels() == levels, setting
    # int8 where FBGEMM runs: measured ~1.7x float32's tokens/s with no measurable loss, so "auto" picks it
    if fbgemm:
        assert resolve_precision("int8") == "int8" and resolve_precision("auto") == "int8"
    else:
        assert resolve_precision("auto") == "float32"
    assert resolve_precision("float32") == "float32"


@pytest.mark.skipif(not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                    reason="oneDNN without bfloat16")
@torch.inference_mode()
def test_bfloat16_decoder_where_allowed(monkeypatch):
    """The bfloat16 path's math, run here by pretending the CPU has native bfloat16 (oneDNN emulates it)."""
    monkeypatch.setattr(quantize, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    model = tiny_llama(seed=1)
    exact, half = PackedLlamaDecoder(model), PackedLlamaDecoder(model, precision="bfloat16")
    ref, _ = exact.prefill(PROMPTS, torch.arange(3), 2)
    got, _ = half.prefill(PROMPTS, torch.arange(3), 2)
    assert 1e-4 * float(ref.abs().max()) < float((got - ref).abs().max()) <= 0.05 * float(ref.abs().max())


@needs_int8
def test_sampler_engine_names_the_precision_and_decoders_are_shared():
    model, tokenizer = tiny_llama(seed=3), CharTokenizer()
    exact, int8 = LocalSampler(model, tokenizer), LocalSampler(model, tokenizer, weight_precision="int8")
    assert (exact.backend, exact.precision, exact.engine) == ("packed", "float32", "packed")
    assert (int8.backend, int8.precision, int8.engine) == ("packed", "int8", INT8_NAME)
    auto = LocalSampler(model, tokenizer, weight_precision="auto")  # int8 where it runs: the same decoder and engine
    assert auto.engine == {"float32": "packed", "int8": INT8_NAME}[resolve_precision("auto")]
    assert auto.decoder is {"float32": exact, "int8": int8}[resolve_precision("auto")].decoder
    assert LocalSampler(model, tokenizer, weight_precision="int8").decoder is int8.decoder  # one int8 copy per model
    assert exact.decoder is not int8.decoder
    plain = LocalSampler(model, tokenizer, engine="transformers", weight_precision="auto")
    assert (plain.engine, plain.precision) == ("transformers", "model")
    kwargs = {"seeds": [1, 2], "temperatures": [1.0, 1.0], "top_p": 0.9, "max_new_tokens": 10}
    texts = int8.sample(["Q: what is lift", "Q: heat"], **kwargs)
    assert texts == int8.sample(["Q: what is lift", "Q: heat"], **kwargs)  # same batch, same seeds: same text
    assert all(isinstance(t, str) for t in texts)


@pytest.fixture()
def tiny_loading(tmp_path, monkeypatch):
    """`models.load_llm` returning the tiny model, and a model folder for the identity's fingerprint."""
    from expandr_haystack import models

    model, tokenizer = tiny_llama(), CharTokenizer()
    monkeypatch.setattr(models, "load_llm", lambda *args, **kwargs: (model, tokenizer))
    folder = tmp_path / "llm"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    return str(folder)


@needs_int8
def test_cache_key_has_the_precision_only_when_it_is_not_float32(tiny_loading, tmp_path):
    from expandr_haystack import LLMQueryExpander
    from expandr_haystack.cache import cache_key

    common = {"model": tiny_loading, "n_expansions": 2, "cache": str(tmp_path / "c.sqlite")}
    queries = ["what is lift", "heat conduction in slabs"]
    rows = {p: LLMQueryExpander(sampler=SamplerOptions(weight_precision=p), **common)._plan(queries, None, None, None,
                                                                                          None)
            for p in ("float32", "int8")}
    default = LLMQueryExpander(**common)._plan(queries, None, None, None, None)
    # float32: the key of earlier versions (the row's seed key keyed with the engine "packed"), the default's
    assert [r.key for r in rows["float32"]] == [cache_key(row=r.seed_key, engine="packed") for r in default]
    # int8: same row seeds, keys of their own
    assert [r.seed_key for r in rows["int8"]] == [r.seed_key for r in rows["float32"]]
    assert [r.key for r in rows["int8"]] == [cache_key(row=r.seed_key, engine=INT8_NAME)
                                             for r in rows["int8"]]
    assert not {r.key for r in rows["int8"]} & {r.key for r in rows["float32"]}
    # a cache written in float32 is not served to the int8 expander
    float32 = LLMQueryExpander(sampler=SamplerOptions(weight_precision="float32"),
                               generation=GenerationSettings(max_new_tokens=6), **common)
    float32.expand(queries)
    int8 = LLMQueryExpander(sampler=SamplerOptions(weight_precision="int8"),
                            generation=GenerationSettings(max_new_tokens=6), **common)
    int8.expand(queries)
    assert int8.cache_stats["hits"] == 0 and int8.cache_stats["misses"] == 4


def test_precision_round_trips_through_to_dict_and_from_dict():
    from expandr_haystack import LLMQueryExpander

    expander = LLMQueryExpander(sampler=SamplerOptions(weight_precision="int8"), n_expansions=2)
    data = expander.to_dict()
    assert data["init_parameters"]["sampler"]["init_parameters"]["weight_precision"] == "int8"
    restored = LLMQueryExpander.from_dict(data)
    assert restored.sampler_options.weight_precision == "int8" and restored.n_expansions == 2
    default = LLMQueryExpander().to_dict()["init_parameters"]["sampler"]["init_parameters"]
    assert default["weight_precision"] == "auto"  # the default since issue 26
    old = {"type": data["type"], "init_parameters": {"temperature": 0.7, "n_expansions": 2}}  # before the groups
    assert LLMQueryExpander.from_dict(old).sampler_options.weight_precision == "float32"  # made in float32: kept
    old["init_parameters"]["precision"] = "int8"
    with pytest.warns(DeprecationWarning):
        assert LLMQueryExpander.from_dict(old).sampler_options.weight_precision == "int8"
    grouped = LLMQueryExpander().to_dict()
    del grouped["init_parameters"]["sampler"]["init_parameters"]["weight_precision"]  # a group without it: default
    assert LLMQueryExpander.from_dict(grouped).sampler_options.weight_precision == "auto"
    assert expander.with_settings(weight_precision="float32").sampler_options.weight_precision == "float32"



def test_auto_says_what_it_chose_and_why(caplog):
    """`weight_precision="auto"` (the default) logs its choice once per packed copy, with the reason."""
    import logging

    with caplog.at_level(logging.INFO, logger="expandr_haystack.generation.local"):
        sampler = LocalSampler(tiny_llama(seed=5), CharTokenizer(), weight_precision="auto")
    chosen, why = quantize.auto_precision()
    assert sampler.precision == chosen
    assert f"weight_precision='auto' chose {chosen}: {why}" in caplog.text
    if chosen == "int8":  # and whether int8's fused kernels run, or why not
        expected = ("its fused CPU kernels run" if kernels.unavailable_reason() is None
                    else f"without its fused CPU kernels ({kernels.unavailable_reason()})")
        assert expected in caplog.text
    assert SamplerOptions().weight_precision == "auto"
