"""`LLMQueryExpander` options of Haystack's own generators: generation_kwargs, model_kwargs, token, Jinja prompts.
No model is loaded: the engine is a stand-in (or a recording ChatGenerator)."""

from typing import Any

import pytest
from haystack import Pipeline, component
from haystack.dataclasses import ChatMessage
from haystack.utils import Secret

from expandr_haystack import LLMQueryExpander
from expandr_haystack.cache import cache_key
from expandr_haystack.core.text import EXPANSION_PROMPT, chat_messages, has_placeholder, render_prompt
from expandr_haystack.generation.rows import extra_key_parts
from expandr_haystack.options import GenerationSettings, SamplerOptions


class StubSampler:
    identity, engine = "hub:org/llm@auto", "transformers"

    def truncate(self, text, argument="query"):
        return text


def _keys(expander, queries=("what is lift",)):
    expander._sampler = StubSampler()
    return [r.key for r in expander._plan(list(queries), None, None, None, None)]


@component
class RecordingChatGenerator:
    def __init__(self):
        self.seen: list[dict[str, Any]] = []

    @component.output_types(replies=list[ChatMessage])
    def run(self, messages: list[ChatMessage], generation_kwargs: dict[str, Any] | None = None):
        self.seen.append(dict(generation_kwargs or {}))
        return {"replies": [ChatMessage.from_assistant("Lift grows with the dynamic pressure over the wing.")]}


# -- prompts -----------------------------------------------------------------------------------------------------
def test_render_prompt_fills_both_placeholder_forms_in_one_pass():
    assert render_prompt("Q: {query}", "lift") == "Q: lift"
    assert render_prompt("Q: {{ query }} / {{query}} / {query}", "lift") == "Q: lift / lift / lift"
    assert render_prompt("P: {{ document }} Q: {{ query }}", "q", "doc") == "P: doc Q: q"
    assert render_prompt("{{ passages }}\n{query}", "q", passages="[1] a") == "[1] a\nq"
    # a value is never substituted again, other braces stay as written
    assert render_prompt("{query} | {document}", "why {document}?", "D") == "why {document}? | D"
    assert render_prompt('{"json": 1} {other} {{ other }} {query}', "q") == '{"json": 1} {other} {{ other }} q'
    assert has_placeholder("x {{ passages }}", "passages") and has_placeholder("{passages}", "passages")
    assert not has_placeholder("{{ query }}", "passages")


def test_jinja_prompt_drives_the_expander():
    exp = LLMQueryExpander(prompt=EXPANSION_PROMPT.replace("{query}", "{{ query }}"))
    _keys(exp)
    assert exp._plan(["lift"], None, None, None, None)[0].messages == chat_messages(EXPANSION_PROMPT, "lift")
    assert LLMQueryExpander(prompt="{{ passages }}\n{{ query }}").grounded
    with pytest.raises(ValueError, match="placeholder"):
        LLMQueryExpander(prompt="no placeholder here {{ question }}")
    with pytest.raises(ValueError, match="not both"):
        LLMQueryExpander(prompt="{{ document }} {{ passages }} {{ query }}")
    answer = LLMQueryExpander(prompt="Passage: {{ document }}\nQ: {{ query }}")
    answer._sampler = StubSampler()
    with pytest.raises(ValueError, match="documents"):
        answer.prompt_messages(["q"])
    assert "P" in answer.prompt_messages(["q"], ["P"])[0][-1]["content"]
    assert "P" in answer._plan(["q"], ["P"], None, None, None)[0].messages[-1]["content"]


# -- generation_kwargs and the cache key -------------------------------------------------------------------------
def test_default_settings_keep_the_cache_keys_of_earlier_versions():
    # the key formula of 0.1.x, written out: existing caches must stay valid
    old = cache_key(model="hub:org/llm@auto", prompt=EXPANSION_PROMPT, system=None, query="what is lift",
                    document=None, index=0, temperature=1.0, top_p=0.9, max_new_tokens=96, seed=42)
    assert _keys(LLMQueryExpander()) == [old]
    assert _keys(LLMQueryExpander(generation=GenerationSettings.from_generation_kwargs({}))) == [old]
    assert _keys(LLMQueryExpander(generation=GenerationSettings.from_generation_kwargs(
        {"temperature": 1.0, "top_p": 0.9}))) == [old]


def test_generation_kwargs_set_the_settings_and_change_the_key():
    base = _keys(LLMQueryExpander())
    exp = LLMQueryExpander(generation=GenerationSettings.from_generation_kwargs(
        {"max_new_tokens": 40, "temperature": 0.5, "top_p": 0.95}))
    g = exp.generation
    assert (g.max_new_tokens, g.temperature, g.top_p, g.generation_kwargs) == (40, 0.5, 0.95, None)
    assert _keys(exp) != base
    assert _keys(LLMQueryExpander(generation=GenerationSettings.from_generation_kwargs({"max_new_tokens": 40}))) != base
    with pytest.raises(ValueError, match=r"`temperature`"):
        LLMQueryExpander(generation=GenerationSettings.from_generation_kwargs({"temperature": -1}))
    with pytest.raises(ValueError, match=r"`temperature`"):
        LLMQueryExpander(generation={"temperature": -1})
    with pytest.raises(ValueError, match=r"`generation\.generation_kwargs`: \['repetition_penalty'\] are not supported "
                                         r"by the local"):
        LLMQueryExpander(generation=GenerationSettings.from_generation_kwargs({"repetition_penalty": 1.2}))
    with pytest.raises(TypeError, match="`generation_kwargs` must be a dict"):
        LLMQueryExpander(generation={"generation_kwargs": [("temperature", 0.5)]})
    with pytest.raises(TypeError, match="`generation_kwargs` must be a dict"):
        GenerationSettings.from_generation_kwargs([("temperature", 0.5)])


def test_generation_kwargs_reach_the_chat_generator_and_the_key():
    gen = RecordingChatGenerator()
    exp = LLMQueryExpander(chat_generator=gen, generation=GenerationSettings.from_generation_kwargs(
        {"temperature": 0.3, "presence_penalty": 0.5}))
    assert exp.generation.generation_kwargs == {"presence_penalty": 0.5} and exp.generation.temperature == 0.3
    assert exp.expand(["what is lift"])[0]
    assert gen.seen == [{"presence_penalty": 0.5, "temperature": 0.3, "top_p": 0.9}]
    plain = LLMQueryExpander(chat_generator=RecordingChatGenerator(), generation=GenerationSettings(temperature=0.3))
    plain.warm_up()
    exp_keys = [r.key for r in exp._plan(["what is lift"], None, None, None, None)]
    plain_keys = [r.key for r in plain._plan(["what is lift"], None, None, None, None)]
    assert exp_keys != plain_keys  # a pass-through setting changes the text, so the key


# -- model_kwargs, token, serialization --------------------------------------------------------------------------
def test_model_kwargs_and_token_reach_from_pretrained(monkeypatch):
    from expandr_haystack import models

    calls = []
    monkeypatch.setattr(models, "load_llm", lambda *a, **k: calls.append((a, k)) or (object(), object()))
    from expandr_haystack.generation import local

    monkeypatch.setattr(local, "LocalSampler", lambda llm, tok, **k: type("S", (), {})())
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    monkeypatch.delenv("HF_API_TOKEN", raising=False)
    exp = LLMQueryExpander(model="org/gated-llm",
                           sampler=SamplerOptions(model_kwargs={"attn_implementation": "eager"}, engine="transformers"))
    exp.warm_up()
    (_, kwargs), = calls
    assert kwargs == {"model_kwargs": {"attn_implementation": "eager"}, "token": "hf_secret_value"}
    assert extra_key_parts(exp.generation, exp.sampler_options) == {"model_kwargs": {"attn_implementation": "eager"}}
    with pytest.raises(ValueError, match="`model_kwargs`.*vllm"):
        LLMQueryExpander(sampler={"model_kwargs": {"device_map": "auto"}, "engine": "vllm"})
    with pytest.raises(TypeError, match="`token` must be a haystack.utils.Secret"):
        LLMQueryExpander(sampler={"token": "hf_plain_string"})


def test_load_llm_passes_model_kwargs_and_token(monkeypatch, tmp_path):
    import transformers

    from expandr_haystack import models

    seen = {}

    class Loaded:
        def to(self, device):
            seen["to"] = device
            return self

        def eval(self):
            return self

    class Tok:
        pad_token = "p"

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda path, **k: seen.setdefault("tok", k) and Tok())
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda path, **k: seen.setdefault("model", k) and Loaded())
    monkeypatch.setattr(models, "resolve_llm_path", lambda m: "org/gated-llm")
    # the hub id is checked first (offline here: it is not cached), with the token and revision transformers gets
    monkeypatch.setattr(models, "check_hub_model", lambda *a: seen.setdefault("hub", a))
    models.load_llm("org/gated-llm", None, "cpu", model_kwargs={"device_map": "cpu", "revision": "r1"}, token="t")
    assert seen["hub"] == ("org/gated-llm", "model", "t", "r1", None, False)
    assert seen["tok"] == {"token": "t"}
    assert set(seen["model"]) == {"token", "dtype", "device_map", "revision"} and seen["model"]["token"] == "t"
    assert "to" not in seen  # device_map placed it
    for key in [k for k in models._LLMS if k[0] == "org/gated-llm"]:
        del models._LLMS[key]


def test_new_arguments_round_trip_and_secrets_stay_references(monkeypatch):
    import torch

    monkeypatch.setenv("MY_HF", "hf_do_not_write")
    exp = LLMQueryExpander(prompt="Q: {{ query }}",
                           generation=GenerationSettings.from_generation_kwargs({"max_new_tokens": 50}),
                           sampler=SamplerOptions(model_kwargs={"torch_dtype": torch.bfloat16,
                                                                "attn_implementation": "sdpa"},
                                                  token=Secret.from_env_var("MY_HF")))
    data = exp.to_dict()
    sampler = data["init_parameters"]["sampler"]["init_parameters"]
    generation = data["init_parameters"]["generation"]["init_parameters"]
    assert sampler["model_kwargs"] == {"torch_dtype": "torch.bfloat16", "attn_implementation": "sdpa"}
    assert sampler["token"] == {"type": "env_var", "env_vars": ["MY_HF"], "strict": True}
    assert generation["max_new_tokens"] == 50 and generation["generation_kwargs"] is None
    back = LLMQueryExpander.from_dict(data)
    assert back.sampler_options.model_kwargs == {"torch_dtype": torch.bfloat16, "attn_implementation": "sdpa"}
    assert back.sampler_options.token.resolve_value() == "hf_do_not_write" and back.prompt == "Q: {{ query }}"
    assert back.to_dict() == data
    p = Pipeline()
    p.add_component("expander", exp)
    assert "hf_do_not_write" not in p.dumps()
    assert Pipeline.loads(p.dumps()).get_component("expander").to_dict() == data
    default = LLMQueryExpander().to_dict()["init_parameters"]["sampler"]["init_parameters"]["token"]
    assert default == {"type": "env_var", "env_vars": ["HF_API_TOKEN", "HF_TOKEN"], "strict": False}
    with pytest.raises(ValueError, match="Cannot serialize token-based secret"):
        LLMQueryExpander(sampler=SamplerOptions(token=Secret.from_token("hf_plain"))).to_dict()
    remote = LLMQueryExpander(chat_generator=RecordingChatGenerator(),
                              generation=GenerationSettings.from_generation_kwargs({"seed": 3}))
    assert remote.to_dict()["init_parameters"]["generation"]["init_parameters"]["generation_kwargs"] == {"seed": 3}


def test_model_kwargs_reach_a_real_from_pretrained(tmp_path):
    """A tiny random Llama saved locally, loaded through `load_llm` with model_kwargs (no download)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from expandr_haystack import models

    config = LlamaConfig(vocab_size=30522, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(models.resolve_encoder_path(None)).save_pretrained(tmp_path)
    try:
        llm, _ = models.load_llm(str(tmp_path), None, "cpu",
                                 model_kwargs={"attn_implementation": "eager", "torch_dtype": torch.bfloat16})
        assert llm.config._attn_implementation == "eager" and llm.dtype == torch.bfloat16
        plain, _ = models.load_llm(str(tmp_path), None, "cpu")
        assert plain is not llm and plain.dtype == torch.float32  # memoised apart
        from_yaml, _ = models.load_llm(str(tmp_path), None, "cpu", model_kwargs={"torch_dtype": "torch.float16"})
        assert from_yaml.dtype == torch.float16
    finally:
        for key in [k for k in models._LLMS if k[0] == str(tmp_path)]:
            del models._LLMS[key]
