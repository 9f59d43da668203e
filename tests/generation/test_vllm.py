"""The vLLM backend: a clear refusal where it cannot run; real generation on a CUDA machine with vllm installed."""

import json

import pytest

from expandr_haystack import LLMQueryExpander
from expandr_haystack.generation.vllm import vllm_unavailable_reason
from expandr_haystack.options import GenerationSettings, SamplerOptions

REASON = vllm_unavailable_reason()
QUERIES = ["what is the lift of a wing in a propeller slipstream .",
           "what problems of heat conduction in composite slabs have been solved so far ."]


@pytest.mark.skipif(REASON is None, reason="vllm and a GPU are present: the refusal cannot be shown here")
def test_vllm_backend_says_why_it_cannot_run():
    expander = LLMQueryExpander(sampler=SamplerOptions(engine="vllm"))  # construction and serialization need no GPU
    assert LLMQueryExpander.from_dict(expander.to_dict()).sampler_options.engine == "vllm"
    with pytest.raises(RuntimeError, match=r"`engine`='vllm' cannot run: .*(vllm|CUDA)"):
        expander.warm_up()


def test_vllm_training_config_is_refused_with_the_reason():
    from expandr_haystack.training.config import ConfigError, JointConfig

    if REASON is None:
        assert JointConfig.from_dict({"llm_engine": "vllm"}).llm_engine == "vllm"
        return
    with pytest.raises(ConfigError, match="llm_engine"):
        JointConfig.from_dict({"llm_engine": "vllm"})


@pytest.mark.gpu
@pytest.mark.skipif(REASON is not None, reason=f"vLLM backend not runnable here: {REASON}")
def test_vllm_generates_per_row_seeded_text_with_a_lora_adapter(tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from expandr_haystack.models import resolve_llm_path

    base = LLMQueryExpander(sampler=SamplerOptions(engine="vllm"), generation=GenerationSettings(max_new_tokens=24),
                            n_expansions=2)
    first = base.expand(QUERIES)
    assert [len(x) for x in first] == [2, 2] and all(t for x in first for t in x)
    # per-row seeds: one query at a time gives the same texts as the batch
    assert [base.expand([q])[0] for q in QUERIES] == first
    # a LoRA adapter with random (non-zero) weights changes the text; vLLM applies it per request
    model = AutoModelForCausalLM.from_pretrained(resolve_llm_path(None), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 8
    tuned = LLMQueryExpander(sampler=SamplerOptions(engine="vllm"), adapter=str(tmp_path / "adapter"),
                             generation=GenerationSettings(max_new_tokens=24), n_expansions=2)
    assert tuned.expand(QUERIES) != first


def test_vllm_sampler_plumbing_with_a_stand_in_engine(monkeypatch, tmp_path):
    """Our wrapper around `vllm.LLM`, on CPU with a stand-in for vLLM's classes (the real engine: the GPU test
    above): one request per row with its own seed and the model's end tokens as stops, texts back in row order,
    and a cache key that names the engine as a string (it held the `LLM` object until 2026-12-05, so no key
    could be built)."""
    import sys
    import types

    from expandr_haystack.generation import vllm as vllm_sampler

    calls = []

    class SamplingParams:
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)

    class TokensPrompt(dict):
        def __init__(self, prompt_token_ids):
            super().__init__(prompt_token_ids=prompt_token_ids)

    class LLM:
        def __init__(self, **kwargs):
            calls.append(("init", kwargs))

        def generate(self, requests, params, use_tqdm=False, lora_request=None):
            calls.append(("generate", requests, params))
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text=f"passage {p.seed % 1000}")])
                    for p in params]

    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = LLM, SamplingParams
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = TokensPrompt
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    monkeypatch.setattr(vllm_sampler, "vllm_unavailable_reason", lambda: None)
    monkeypatch.setattr(vllm_sampler, "_ENGINES", {})
    expander = LLMQueryExpander(sampler=SamplerOptions(engine="vllm"), n_expansions=2,
                                generation=GenerationSettings(max_new_tokens=8), cache=str(tmp_path / "c.sqlite"))
    texts = expander.expand(QUERIES)
    assert expander.engine == "vllm+eog"  # the bundled SmolLM2 has <|endoftext|> besides its EOS <|im_end|>
    _, requests, params = calls[-1]
    assert len(requests) == len(params) == 4 and len({p.seed for p in params}) == 4
    assert all(p.stop_token_ids == [0, 2] and p.max_tokens == 8 for p in params)
    assert [[f"passage {p.seed % 1000}" for p in params[i : i + 2]] for i in (0, 2)] == texts
    assert expander.expand(QUERIES) == texts and expander.cache_stats["hits"] == 4
