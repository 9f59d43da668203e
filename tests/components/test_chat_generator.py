"""LocalChatGenerator: the local LLM behind Haystack's ChatGenerator interface (real bundled SmolLM2 where marked)."""

import asyncio

import pytest
from haystack import Pipeline
from haystack.components.query import QueryExpander
from haystack.dataclasses import ChatMessage, ToolCall

from expandr_haystack import LLMQueryExpander, LocalChatGenerator
from expandr_haystack.components.chat_generator import RUN_GENERATION_KEYS, RUN_REPLY_KEYS, reply_text
from expandr_haystack.options import GenerationSettings, SamplerOptions

CONVERSATION = [ChatMessage.from_system("You answer in one short sentence."),
                ChatMessage.from_user("What is a boundary layer?")]
OTHER = [ChatMessage.from_user("Name one cause of wing flutter.")]
PREFIX = '{"queries": ["'


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
    with pytest.raises(TypeError, match="`reply_prefix` must be a str or None; got list"):
        LocalChatGenerator(reply_prefix=["{"])
    with pytest.raises(ValueError, match="`reply_stop` must be a non-empty str or None"):
        LocalChatGenerator(reply_stop="")


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
    with pytest.raises(TypeError, match=r"`generation_kwargs\['reply_prefix'\]` must be a str or None; got int"):
        g.run(CONVERSATION, generation_kwargs={"reply_prefix": 3})
    with pytest.raises(ValueError, match=r"they take \[.*'seed', 'reply_prefix', 'reply_stop'\]"):
        g.run(CONVERSATION, generation_kwargs={"stop": ["]}"]})
    assert g._sampler is None  # nothing was loaded
    assert RUN_GENERATION_KEYS == ("max_new_tokens", "temperature", "top_p", "seed")
    assert RUN_REPLY_KEYS == ("reply_prefix", "reply_stop")


def test_reply_is_the_prefix_then_the_continuation_cut_just_after_the_first_stop():
    assert reply_text('a", "b"]} and more ]}', PREFIX, "]}") == '{"queries": ["a", "b"]}'
    assert reply_text('a", "b"] and on', PREFIX, "]}") == '{"queries": ["a", "b"] and on'  # no stop: whole
    assert reply_text("free text", None, None) == "free text"
    assert reply_text("x]} y", None, "]}") == "x]}"


def test_to_dict_from_dict_and_yaml_inside_haystack_query_expander():
    g = LocalChatGenerator(generation=GenerationSettings(temperature=0.7, max_new_tokens=20, seed=5),
                           sampler=SamplerOptions(engine="transformers"), cache="chat.sqlite", reply_prefix=PREFIX,
                           reply_stop="]}")
    data = g.to_dict()
    assert data["type"] == "expandr_haystack.components.chat_generator.LocalChatGenerator"
    assert (data["init_parameters"]["reply_prefix"], data["init_parameters"]["reply_stop"]) == (PREFIX, "]}")
    back = LocalChatGenerator.from_dict(data)
    assert (back.generation, back.sampler_options, back.cache, back.model, back.reply_prefix, back.reply_stop) == (
        g.generation, g.sampler_options, "chat.sqlite", None, PREFIX, "]}")
    flat = {"type": data["type"], "init_parameters": {"temperature": 0.3, "engine": "transformers"}}
    old = LocalChatGenerator.from_dict(flat)  # a dict from before the reply options: no prefix, no stop
    assert (old.generation.temperature, old.sampler_options.engine) == (0.3, "transformers")
    assert (old.reply_prefix, old.reply_stop) == (None, None)

    p = Pipeline()
    p.add_component("expander", QueryExpander(chat_generator=g, n_expansions=3))
    text = p.dumps()
    q = Pipeline.loads(text)  # our module is on Haystack's allow-list (imported with expandr_haystack)
    loaded = q.get_component("expander").chat_generator
    assert isinstance(loaded, LocalChatGenerator) and loaded.generation == g.generation
    assert (loaded.reply_prefix, loaded.reply_stop) == (PREFIX, "]}")
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
    again = LocalChatGenerator(generation={"max_new_tokens": 8, "seed": 1})
    assert [m.text for m in fresh.generate([OTHER, CONVERSATION])] == [m.text for m in again.generate(
        [OTHER, CONVERSATION])]  # the same batch, the same replies (in any precision)
    # in float32 a reply is the same alone or in a batch (int8, the default where it runs, can change it)
    exact = {"weight_precision": "float32"}
    batch = LocalChatGenerator(generation={"max_new_tokens": 8, "seed": 1}, sampler=exact).generate(
        [OTHER, CONVERSATION, OTHER])
    alone = LocalChatGenerator(generation={"max_new_tokens": 8, "seed": 1}, sampler=exact)
    assert [m.text for m in batch] == [alone.run(OTHER)["replies"][0].text,
                                       alone.run(CONVERSATION)["replies"][0].text,
                                       alone.run(OTHER)["replies"][0].text]
    seeded = [fresh.run(CONVERSATION, {"seed": s})["replies"][0].text for s in (2, 3, 4)]
    assert len({fresh.run(CONVERSATION)["replies"][0].text, *seeded}) > 1  # other seeds, other samples
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


@pytest.mark.integration
def test_reply_prefix_is_the_start_of_the_assistant_turn_keyed_apart_and_returned(generator):
    from expandr_haystack.generation.local import template

    before = generator.cache_stats["entries"]
    plain = generator.run(OTHER, {"temperature": 0.0})["replies"][0]
    prefixed = generator.run(OTHER, {"temperature": 0.0, "reply_prefix": PREFIX})["replies"][0]
    assert prefixed.meta["cached"] is False  # its own key: never the unprefixed reply
    assert generator.cache_stats["entries"] == before + 2
    # greedy: the reply is the prefix + the model's continuation of the templated prompt followed by the prefix
    sampler = generator._sampler
    prompt = template(sampler.tokenizer, [{"role": "user", "content": OTHER[0].text}])
    assert prompt.endswith("assistant\n")  # the prefix goes after the generation prompt
    continuation = sampler.sample([prompt + PREFIX], [0], [0.0], generator.generation.top_p, 8)[0]
    assert prefixed.text == PREFIX + continuation and plain.text != prefixed.text
    # the init parameter is the same as the per-call one (same key, served by the cache)
    fixed = LocalChatGenerator(generation=generator.generation, cache=generator.cache, reply_prefix=PREFIX)
    again = fixed.run(OTHER, {"temperature": 0.0})["replies"][0]
    assert again.text == prefixed.text and again.meta["cached"] is True
    assert fixed.run(OTHER, {"temperature": 0.0, "reply_prefix": None})["replies"][0].text == plain.text


@pytest.mark.integration
def test_reply_stop_cuts_the_reply_after_the_stop_and_shares_the_cached_text(generator):
    whole = generator.run(OTHER, {"reply_prefix": PREFIX})["replies"][0].text
    continuation = whole[len(PREFIX):]
    assert whole.startswith(PREFIX) and len(continuation) >= 5
    stop = continuation[3:5]  # a text the model wrote: the reply ends just after its first occurrence
    cut = generator.run(OTHER, {"reply_prefix": PREFIX, "reply_stop": stop})["replies"][0]
    assert cut.meta["cached"] is True  # the stop is applied to the stored text: the same sample, not a new one
    assert cut.text == PREFIX + continuation[: continuation.index(stop) + len(stop)] and cut.text.endswith(stop)
    absent = generator.run(OTHER, {"reply_prefix": PREFIX, "reply_stop": "\x00never"})["replies"][0]
    assert absent.text == whole
