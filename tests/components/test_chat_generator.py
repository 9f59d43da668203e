"""LocalChatGenerator: the local LLM behind Haystack's ChatGenerator interface (real bundled SmolLM2 where marked)."""

import asyncio

import pytest
from haystack import Pipeline
from haystack.components.query import QueryExpander
from haystack.dataclasses import ChatMessage, ToolCall

from expandr_haystack import LLMQueryExpander, LocalChatGenerator
from expandr_haystack.components.chat_generator import RUN_GENERATION_KEYS
from expandr_haystack.options import GenerationSettings, SamplerOptions

CONVERSATION = [ChatMessage.from_system("You answer in one short sentence."),
                ChatMessage.from_user("What is a boundary layer?")]
OTHER = [ChatMessage.from_user("Name one cause of wing flutter.")]


# -- no model loading --------------------------------------------------------------------------------------------
def test_bad_arguments_fail_at_construction_naming_them(tmp_path):
    with pytest.raises(ValueError, match=r"`generation\.generation_kwargs`: \['repetition_penalty'\]"):
        LocalChatGenerator(generation={"generation_kwargs": {"repetition_penalty": 1.1}})
    with pytest.raises(FileNotFoundError, match="`model`: no model directory"):
        LocalChatGenerator(model=str(tmp_path / "missing-model"))
    with pytest.raises(ValueError, match="`cache`"):
        LocalChatGenerator(cache="  ")
    with pytest.raises(ValueError, match="`generation`: unknown key"):
        LocalChatGenerator(generation={"temprature": 0.5})


def test_bad_messages_and_generation_kwargs_fail_before_loading_the_model():
    g = LocalChatGenerator()
    with pytest.raises(TypeError, match="`messages` must be a non-empty list of ChatMessage"):
        g.run(messages=[])
    with pytest.raises(TypeError, match=r"`messages\[1\]` must be a ChatMessage; got dict"):
        g.run(messages=[ChatMessage.from_user("hi"), {"role": "user", "content": "hi"}])
    tool_call = ChatMessage.from_assistant(tool_calls=[ToolCall(tool_name="search", arguments={})])
    with pytest.raises(ValueError, match=r"`messages\[0\]`: .* got a assistant message with tool calls"):
        g.run(messages=[tool_call])
    with pytest.raises(ValueError, match=r"`messages\[0\]`: .* got a tool message"):
        g.run(messages=[ChatMessage.from_tool("result", origin=ToolCall(tool_name="search", arguments={}))])
    with pytest.raises(TypeError, match=r"`conversations\[1\]` must be a non-empty list"):
        g.generate([CONVERSATION, "hello"])
    with pytest.raises(ValueError, match=r"`generation_kwargs`: \['do_sample'\] are not supported"):
        g.run(CONVERSATION, generation_kwargs={"do_sample": False})
    with pytest.raises(ValueError, match="`top_p` must be a number in"):
        g.run(CONVERSATION, generation_kwargs={"top_p": 0})
    assert g._sampler is None  # nothing was loaded
    assert RUN_GENERATION_KEYS == ("max_new_tokens", "temperature", "top_p", "seed")


def test_to_dict_from_dict_and_yaml_inside_haystack_query_expander():
    g = LocalChatGenerator(generation=GenerationSettings(temperature=0.7, max_new_tokens=20, seed=5),
                           sampler=SamplerOptions(engine="transformers"), cache="chat.sqlite")
    data = g.to_dict()
    assert data["type"] == "expandr_haystack.components.chat_generator.LocalChatGenerator"
    back = LocalChatGenerator.from_dict(data)
    assert (back.generation, back.sampler_options, back.cache, back.model) == (
        g.generation, g.sampler_options, "chat.sqlite", None)
    flat = {"type": data["type"], "init_parameters": {"temperature": 0.3, "engine": "transformers"}}
    old = LocalChatGenerator.from_dict(flat)
    assert (old.generation.temperature, old.sampler_options.engine) == (0.3, "transformers")

    p = Pipeline()
    p.add_component("expander", QueryExpander(chat_generator=g, n_expansions=3))
    text = p.dumps()
    q = Pipeline.loads(text)  # our module is on Haystack's allow-list (imported with expandr_haystack)
    loaded = q.get_component("expander").chat_generator
    assert isinstance(loaded, LocalChatGenerator) and loaded.generation == g.generation
    assert q.dumps() == text


# -- real bundled model ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    g = LocalChatGenerator(generation={"max_new_tokens": 8, "seed": 1},
                           cache=str(tmp_path_factory.mktemp("chat") / "chat.sqlite"))
    g.warm_up()
    g.warm_up()  # idempotent
    return g


@pytest.mark.integration
def test_reply_is_an_assistant_message_and_the_cache_serves_it(generator):
    reply = generator.run(CONVERSATION)["replies"]
    assert len(reply) == 1 and reply[0].role.value == "assistant" and reply[0].text.strip()
    assert reply[0].meta == {"model": "bundled:SmolLM2-135M-Instruct", "cached": False}
    again = generator.run(CONVERSATION)["replies"][0]
    assert again.text == reply[0].text and again.meta["cached"] is True


@pytest.mark.integration
def test_seeded_reproducible_and_the_same_alone_or_in_a_batch(generator, tmp_path):
    fresh = LocalChatGenerator(generation={"max_new_tokens": 8, "seed": 1})  # no cache: sampled again
    batch = fresh.generate([OTHER, CONVERSATION, OTHER])
    assert [m.text for m in batch] == [generator.run(OTHER)["replies"][0].text,
                                       generator.run(CONVERSATION)["replies"][0].text,
                                       generator.run(OTHER)["replies"][0].text]
    seeded = [fresh.run(CONVERSATION, {"seed": s})["replies"][0].text for s in (2, 3, 4)]
    assert len({batch[1].text, *seeded}) > 1  # other seeds, other samples
    assert LocalChatGenerator(generation={"max_new_tokens": 8, "seed": 3}).run(CONVERSATION)["replies"][0].text == \
        seeded[1]  # a run-time seed is the init seed
    shorter = fresh.run(CONVERSATION, {"max_new_tokens": 2, "temperature": 0.0})["replies"][0].text
    assert shorter and len(shorter.split()) <= 2  # two tokens at most


@pytest.mark.integration
def test_shares_the_expanders_loaded_model_and_its_cache_file_without_clashes(generator, tmp_path):
    expander = LLMQueryExpander(generation={"max_new_tokens": 8}, cache=generator.cache)
    expander.warm_up()
    assert expander._sampler.model is generator._sampler.model  # one loaded copy
    assert expander._sampler.identity == generator._sampler.identity
    before = generator.cache_stats["entries"]
    expander.expand(["what is a boundary layer ?"])
    assert generator.cache_stats["entries"] == before + 1  # its own key: no expansion served as a reply


@pytest.mark.integration
def test_haystack_query_expander_takes_it_and_batch_generation_fills_its_calls(generator):
    from expandr_haystack.evaluation.multiquery import expander_messages

    qe = QueryExpander(chat_generator=generator, n_expansions=2)
    queries = ["heat conduction in composite slabs", "flutter of swept wings"]
    replies = generator.generate(expander_messages(qe, queries))
    hits = generator.cache_stats["hits"]
    misses = generator.cache_stats["misses"]
    for q in queries:
        out = qe.run(query=q)["queries"]
        assert q in out and 1 <= len(out) <= 3  # the original always; up to 2 alternatives when the JSON parsed
    assert generator.cache_stats["hits"] == hits + 2 and generator.cache_stats["misses"] == misses  # no generation
    assert all(r.meta["cached"] is False for r in replies)
    result = asyncio.run(qe.run_async(query=queries[0]))
    assert queries[0] in result["queries"] and generator.cache_stats["misses"] == misses
    reply = asyncio.run(generator.run_async(CONVERSATION))["replies"][0]
    assert reply.text == generator.run(CONVERSATION)["replies"][0].text
