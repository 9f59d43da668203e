"""The packed float32 decoder against transformers' own forward, on a tiny random Llama (fast, no downloads)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from expandr_haystack.generation import packed_llama, quantize
from expandr_haystack.generation.local import LocalSampler, TransformersDecoder, default_decoder
from expandr_haystack.generation.packed_llama import PackedLlamaDecoder, unsupported_reason


class CharTokenizer:
    """Byte-level tokenizer for the tiny model: ids 3..130 are bytes, 2 is EOS/pad."""

    eos_token_id = 2
    pad_token_id = 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + (b % 128) for b in text.encode()]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i - 3) for i in ids if i >= 3)


def tiny_llama(seed=0, **overrides):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=131, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=2, pad_token_id=2, bos_token_id=1, tie_word_embeddings=True, **overrides)
    model = LlamaForCausalLM(config).eval()
    for p in model.parameters():  # larger weights than the init, so the logits are far from uniform
        p.data.normal_(0, 0.2)
    return model


def assert_same_logits(decoder, reference, prompts, select, steps):
    """`decoder`'s logits equal `reference`'s bit for bit at the prefill of `prompts` (row i continues prompt
    ``select[i]``) and at each of `steps` decode steps, both fed `reference`'s greedy tokens."""
    select = torch.tensor(select)
    (got, got_state), (ref, ref_state) = (d.prefill(prompts, select, steps) for d in (decoder, reference))
    for _ in range(steps):
        assert torch.equal(got, ref)
        tokens = ref.argmax(-1)
        got, ref = decoder.decode(got_state, tokens), reference.decode(ref_state, tokens)
    assert torch.equal(got, ref)


@torch.inference_mode()
@pytest.mark.parametrize("prompts", [
    [[5, 9, 17, 33, 40, 41], [7, 8], [50, 51, 52, 53]],             # nothing shared
    [[5, 9, 17, 33, 40, 41], [5, 9, 17, 8], [5, 9, 17, 33, 52, 53]],  # a common prefix of 3 tokens
    [[5, 9, 17], [5, 9, 17, 33], [5, 9, 17, 33, 40, 41, 42]],        # one prompt is the common prefix itself
])
@pytest.mark.parametrize("select", [
    [0, 0, 1, 2, 2],  # prompts 0 and 2 sampled twice: one prefill each, copied to their rows
    [0, 1, 2],        # one row per prompt: the prefill's cache is decoded in place
    [2, 0, 1],        # one row per prompt, in another order: copied
])
@pytest.mark.parametrize("prefill_tokens", [1024, 10, 4])  # all prompts at once / groups of 1-3 / one at a time
def test_prefill_and_decode_logits_match_transformers(prompts, select, prefill_tokens, monkeypatch):
    monkeypatch.setattr(packed_llama, "PREFILL_TOKENS", prefill_tokens)
    model = tiny_llama()
    fed = torch.tensor([[11, 12, 13, 14, 15], [21, 22, 23, 24, 25], [31, 32, 33, 34, 35],
                        [41, 42, 43, 44, 45], [61, 62, 63, 64, 65]])[: len(select)]
    select = torch.tensor(select)
    outputs = []
    for decoder in (TransformersDecoder(model, pad_id=2), PackedLlamaDecoder(model)):
        logits, state = decoder.prefill(prompts, select, max_new_tokens=6)
        steps = [logits]
        for t in range(fed.shape[1]):
            steps.append(decoder.decode(state, fed[:, t]))
        outputs.append(torch.stack(steps, 1))
    reference, packed = outputs
    assert reference.shape == packed.shape == (len(select), 6, 131)
    assert torch.allclose(reference, packed, atol=1e-4, rtol=1e-4), (reference - packed).abs().max()
    # and both equal a plain full-sequence forward (no cache), row by row
    for row, prompt in enumerate(select.tolist()):
        full = torch.tensor([prompts[prompt] + fed[row].tolist()])
        plain = model(input_ids=full).logits[0, len(prompts[prompt]) - 1:]
        assert torch.allclose(plain, packed[row], atol=1e-4, rtol=1e-4), (row, (plain - packed[row]).abs().max())


@torch.inference_mode()
def test_prefill_runs_the_linear_layers_on_the_real_tokens_only():
    """Shorter prompts are left-padded for the attention, but the linear layers get the real tokens only (the padding
    was 15-19% of the benchmark batches' prefill products): the first layer's q|k|v product sees the common prefix
    once, then the 3 + 1 + 5 tokens after it, not 3 rows x 5 slots. (That the logits stay right with padding is
    `test_prefill_and_decode_logits_match_transformers`.)"""
    decoder = PackedLlamaDecoder(tiny_llama(seed=4), script=False)
    seen = []
    decoder.layers[0].qkv.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    decoder.prefill([[5, 9, 17, 33, 40, 41], [5, 9, 17, 8], [5, 9, 17, 33, 52, 53, 54, 55]], torch.arange(3), 4)
    assert seen == [3, 3 + 1 + 5]
    with pytest.raises(ValueError, match=r"`prompts`.*prompt 1 has none"):
        decoder.prefill([[5, 9], []], torch.arange(2), 4)


@torch.inference_mode()
@pytest.mark.parametrize("precision", ["float32", "int8"])
def test_scripted_layers_equal_the_python_layers_bit_for_bit(precision):
    """TorchScript runs the layers' ops without Python between them (the decode step's speed-up); it must run the
    same ops: logits equal bit for bit at prefill (a shared prefix, several samples of a prompt) and at every decode
    step, past the profiling executor's first run. Calibrated, so every layer kind runs (the smoothed `o` has a
    scale and no norm). With CPU fusion on (off in torch's CPU wheels) TorchScript could reorder: not equal then."""
    if precision == "int8" and quantize.int8_unsupported_reason() is not None:
        pytest.skip(f"int8 path unavailable: {quantize.int8_unsupported_reason()}")
    from expandr_haystack.generation.local import calibration_ids

    model = tiny_llama(seed=3)
    calibration = calibration_ids(CharTokenizer())
    scripted = PackedLlamaDecoder(model, precision, calibration)
    plain = PackedLlamaDecoder(model, precision, calibration, script=False)
    assert isinstance(scripted.body, torch.jit.ScriptModule)  # compiled here, not fallen back
    assert isinstance(plain.body, packed_llama._Body) and not isinstance(plain.body, torch.jit.ScriptModule)
    for prompts, select in (([[5, 9, 17, 33, 40, 41], [5, 9, 17, 8], [5, 9, 50, 52]], [0, 1, 1, 2]),
                            ([[7, 8], [50, 51, 52]], [0, 1])):  # shared prefix, copied caches / in place
        assert_same_logits(scripted, plain, prompts, select, steps=8)


@torch.inference_mode()
def test_layers_without_onednn_are_scripted_too(monkeypatch):
    """A torch without oneDNN keeps plain float32 weights (`F.linear`): compiled as well, transformers' logits."""
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    model = tiny_llama()
    decoder = PackedLlamaDecoder(model)
    assert decoder.layers[0].qkv.packed is None and decoder.layers[0].qkv.weight is not None
    assert isinstance(decoder.body, torch.jit.ScriptModule)
    prompts = [[5, 9, 17, 33], [5, 9, 40]]
    logits, state = decoder.prefill(prompts, torch.tensor([0, 1]), 2)
    expected = torch.cat([model(torch.tensor([p])).logits[:, -1] for p in prompts])
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    tokens = logits.argmax(-1)
    expected = torch.cat([model(torch.tensor([p + [int(t)]])).logits[:, -1] for p, t in zip(prompts, tokens)])
    torch.testing.assert_close(decoder.decode(state, tokens), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("message", ["no TorchScript here", ""])  # an empty message must not break the fallback
def test_layers_run_in_python_where_torchscript_cannot_compile_them(message, monkeypatch, caplog):
    def refuse(module):
        raise RuntimeError(message)

    monkeypatch.setattr(torch.jit, "script", refuse)
    model = tiny_llama()
    with caplog.at_level("WARNING", logger="expandr_haystack.generation.packed_llama"):
        decoder = PackedLlamaDecoder(model)
    assert isinstance(decoder.body, packed_llama._Body)
    assert "TorchScript could not compile" in caplog.text and message in caplog.text
    with torch.inference_mode():
        logits, _ = decoder.prefill([[5, 9, 17]], torch.tensor([0]), 2)
        expected = model(torch.tensor([[5, 9, 17]])).logits[:, -1]
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_same_seeds_give_the_same_text_on_both_decoders():
    model, tok = tiny_llama(seed=1), CharTokenizer()
    prompts = ["Q: what is lift", "Q: heat", "Q: what is lift", "Q: boundary layer flow", "no prefix"]
    kwargs = {"seeds": [1, 2, 3, 4, 5], "temperatures": [1.0, 0.7, 1.0, 0.0, 1.0], "top_p": 0.9,
              "max_new_tokens": 12, "batch_size": 3}
    reference = LocalSampler(model, tok, engine="transformers").sample(prompts, **kwargs)
    packed_sampler = LocalSampler(model, tok, engine="packed")
    assert packed_sampler.backend == "packed"
    assert packed_sampler.sample(prompts, **kwargs) == reference
    assert any(reference), "the tiny model should generate something"


def test_unsupported_models_fall_back_or_fail_clearly():
    model = tiny_llama(attention_bias=True)
    assert "bias" in unsupported_reason(model)
    assert isinstance(default_decoder(model, "auto"), TransformersDecoder)
    with pytest.raises(ValueError, match="engine.*packed.*bias"):
        default_decoder(model, "packed")
    with pytest.raises(ValueError, match="`engine` must be"):
        default_decoder(model, "fastest")
    assert "float32" in unsupported_reason(tiny_llama().to(torch.bfloat16))


def _reference_nucleus(logits, temperature, top_p, generator):
    """Textbook temperature + nucleus sampling over the fully sorted vocabulary."""
    p, ids = (logits / temperature).softmax(-1).sort(descending=True)
    if top_p < 1.0:
        p = p.masked_fill(p.cumsum(-1) - p >= top_p, 0.0)
    return int(ids[torch.multinomial(p, 1, generator=generator)[0]])


@pytest.mark.parametrize("top_p", [0.9, 0.5, 1.0])
def test_sample_rows_is_exact_nucleus_sampling(top_p):
    from expandr_haystack.generation.local import sample_rows

    torch.manual_seed(0)
    vocab = 5000
    # peaked rows (nucleus inside the top 8), flat rows (nucleus beyond the top 128 and beyond 16 x 8), a greedy row
    logits = torch.cat([torch.randn(3, vocab) * 8, torch.randn(3, vocab) * 0.1, torch.randn(1, vocab)])
    temperatures = torch.tensor([1.0, 0.7, 1.3, 1.0, 0.8, 1.1, 0.0])
    def generators(seed):
        return [torch.Generator().manual_seed(seed * 100 + r) for r in range(len(logits))]

    for seed in range(5):
        got = sample_rows(logits, temperatures, top_p, generators(seed), preselect=8).tolist()
        reference = [_reference_nucleus(logits[r], float(t), top_p, g) if t > 0 else int(logits[r].argmax())
                     for r, (t, g) in enumerate(zip(temperatures, generators(seed)))]
        assert got == reference


def test_samplers_stop_at_every_end_token_of_the_vocabulary(monkeypatch):
    """The bundled SmolLM2 ends turns with <|im_end|> (its EOS); its vocabulary also has <|endoftext|>, which ends a
    text: both stop a row (as in llama.cpp), and the engine name says so (texts cached apart from the earlier ones).
    A tokenizer without such tokens keeps its EOS alone and its engine name."""
    from expandr_haystack.generation.local import END_TOKENS_ENGINE, end_token_ids
    from expandr_haystack.models import load_llm

    model, tokenizer = load_llm(None, None, "cpu", "float32")
    assert tokenizer.convert_ids_to_tokens([0, 2]) == ["<|endoftext|>", "<|im_end|>"]
    assert end_token_ids(tokenizer, model) == ([0, 2], [0])
    sampler = LocalSampler(model, tokenizer, weight_precision="float32")
    assert sampler.eos_ids.tolist() == [0, 2] and sampler.engine == "packed" + END_TOKENS_ENGINE
    tiny = LocalSampler(tiny_llama(), CharTokenizer())
    assert tiny.extra_stops == [] and tiny.engine == "packed"
    # a row that samples <|endoftext|> ends there: force it as the most likely first token
    logits_bias = torch.zeros(model.config.vocab_size)
    logits_bias[0] = 1e4
    prefill = sampler.decoder.prefill

    def biased_prefill(*args):
        logits, state = prefill(*args)
        return logits + logits_bias, state

    monkeypatch.setattr(sampler.decoder, "prefill", biased_prefill)
    before = sampler.tokens_generated
    texts = sampler.sample(["Q: what is lift"], seeds=[1], temperatures=[1.0], top_p=0.9, max_new_tokens=8)
    assert texts == [""] and sampler.tokens_generated - before == 1  # the end token counted, nothing after it
