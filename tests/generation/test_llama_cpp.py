"""
The llama.cpp engine (issue 26): PEFT LoRA adapters converted to GGUF adapters for llama.cpp (no llama.cpp needed:
the file is read back with the `gguf` package), the engine's option checks, and, where llama-cpp-python is installed
(the optional `llama-cpp` extra, compiled from source), the engine itself on the bundled GGUF file: per-row seeds,
the cache key, and an adapter that changes the model's logits as the same adapter does in transformers.
"""

import json

import numpy as np
import pytest

from expandr_haystack.generation.llama_cpp import (
    LORA_TARGETS,
    gguf_metadata,
    llama_cpp_unavailable_reason,
    lora_to_gguf,
)
from expandr_haystack.models import bundled_gguf
from expandr_haystack.options import SamplerOptions

needs_llama_cpp = pytest.mark.skipif(llama_cpp_unavailable_reason() is not None,
                                     reason=f"llama.cpp engine unavailable: {llama_cpp_unavailable_reason()}")


def write_adapter(folder, tensors: dict[str, np.ndarray], **config):
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "peft_type": "LORA", **config}))
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()},
              str(folder / "adapter_model.safetensors"))
    return folder


def smollm2_lora(rng, layers=(0, 3), modules=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                              "mlp.down_proj"), rank=4):
    """PEFT-named LoRA matrices for SmolLM2-135M's shapes (hidden 576, 9 heads / 3 kv heads of 64, ffn 1536)."""
    shapes = {"self_attn.q_proj": (576, 576), "self_attn.k_proj": (192, 576), "self_attn.v_proj": (192, 576),
              "self_attn.o_proj": (576, 576), "mlp.gate_proj": (1536, 576), "mlp.up_proj": (1536, 576),
              "mlp.down_proj": (576, 1536)}
    tensors = {}
    for layer in layers:
        for module in modules:
            out, inp = shapes[module]
            stem = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{stem}.lora_A.weight"] = rng.standard_normal((rank, inp)) * 0.02
            tensors[f"{stem}.lora_B.weight"] = rng.standard_normal((out, rank)) * 0.02
    return tensors


def interleaved_halves(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order, written out: in each head, row 2i is the HF row i, row 2i+1 the row i + d/2."""
    out = np.empty_like(rows)
    d = rows.shape[0] // heads
    for h in range(heads):
        for i in range(d // 2):
            out[h * d + 2 * i] = rows[h * d + i]
            out[h * d + 2 * i + 1] = rows[h * d + d // 2 + i]
    return out


def test_bundled_gguf_header_is_read():
    meta = gguf_metadata(bundled_gguf())
    assert meta["general.architecture"] == "llama"
    assert (meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]) == (9, 3)


def test_lora_to_gguf_writes_what_llama_cpp_reads(tmp_path):
    from gguf import GGUFReader

    rng = np.random.default_rng(0)
    tensors = smollm2_lora(rng)
    adapter = write_adapter(tmp_path / "adapter", tensors, lora_alpha=16)
    out = lora_to_gguf(adapter, bundled_gguf(), tmp_path / "a.gguf")
    reader = GGUFReader(str(out))
    meta = gguf_metadata(out)
    assert meta["general.architecture"] == "llama" and meta["general.type"] == "adapter"
    assert meta["adapter.type"] == "lora" and meta["adapter.lora.alpha"] == 16.0
    got = {t.name: np.asarray(t.data).reshape(tuple(reversed(t.shape.tolist()))) for t in reader.tensors}
    assert len(got) == len(tensors)
    heads = {"self_attn.q_proj": 9, "self_attn.k_proj": 3}
    for name, value in tensors.items():
        if ".lora_B." in name:
            continue
        stem = name.split(".lora_A.")[0]
        layer, module = stem.split(".layers.")[1].split(".", 1)
        key = f"blk.{layer}.{LORA_TARGETS[module]}.weight"
        b = tensors[name.replace(".lora_A.", ".lora_B.")]
        np.testing.assert_array_equal(got[f"{key}.lora_a"], value.astype(np.float32))  # [r, in]
        expected_b = interleaved_halves(b, heads[module]) if module in heads else b  # q/k rows in rotary order
        np.testing.assert_array_equal(got[f"{key}.lora_b"], expected_b.astype(np.float32))  # [out, r]


def test_rslora_alpha_is_written_for_llama_cpps_alpha_over_r(tmp_path):
    adapter = write_adapter(tmp_path / "rs", smollm2_lora(np.random.default_rng(1), layers=(0,)), lora_alpha=8,
                            use_rslora=True)
    out = lora_to_gguf(adapter, bundled_gguf(), tmp_path / "rs.gguf")
    # rsLoRA scales by alpha / sqrt(r); llama.cpp by alpha' / r: alpha' = alpha * sqrt(r) = 8 * 2
    assert gguf_metadata(out)["adapter.lora.alpha"] == pytest.approx(16.0)


def test_adapters_llama_cpp_cannot_apply_are_refused_by_name(tmp_path):
    rng = np.random.default_rng(2)
    with pytest.raises(ValueError, match=r"`adapter`: .* DoRA"):
        lora_to_gguf(write_adapter(tmp_path / "dora", smollm2_lora(rng), use_dora=True), bundled_gguf(),
                     tmp_path / "x.gguf")
    embeddings = smollm2_lora(rng) | {"base_model.model.model.embed_tokens.weight": np.zeros((4, 4))}
    with pytest.raises(ValueError, match=r"`adapter`: tensor .*embed_tokens.* not a LoRA A/B matrix"):
        lora_to_gguf(write_adapter(tmp_path / "emb", embeddings), bundled_gguf(), tmp_path / "x.gguf")
    head = {"base_model.model.lm_head.lora_A.weight": np.zeros((4, 576)),
            "base_model.model.lm_head.lora_B.weight": np.zeros((49152, 4))}
    with pytest.raises(ValueError, match=r"`adapter`: LoRA on 'lm_head' cannot be converted"):
        lora_to_gguf(write_adapter(tmp_path / "head", head), bundled_gguf(), tmp_path / "x.gguf")
    from gguf import GGUFWriter

    other = tmp_path / "gpt2.gguf"  # a base of an architecture the converter does not know
    writer = GGUFWriter(str(other), "gpt2")
    writer.add_tensor("x", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(ValueError, match=r"`adapter`: converting LoRA adapters for a 'gpt2' base is not supported"):
        lora_to_gguf(write_adapter(tmp_path / "ok", smollm2_lora(rng)), other, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()  # nothing half-written


def test_engine_options_are_checked_by_name():
    assert SamplerOptions(engine="llama_cpp", engine_kwargs={"n_ctx": 2048}).engine_kwargs == {"n_ctx": 2048}
    with pytest.raises(ValueError, match=r"`weight_precision`='int8' .* `engine`='llama_cpp'.*own quantization"):
        SamplerOptions(engine="llama_cpp", weight_precision="int8")
    with pytest.raises(ValueError, match=r"`model_kwargs` .* `engine`='llama_cpp' does not take them"):
        SamplerOptions(engine="llama_cpp", model_kwargs={"device_map": "auto"})
    with pytest.raises(ValueError, match=r"`engine_kwargs` go to .*llama.cpp's Llama"):
        SamplerOptions(engine="transformers", engine_kwargs={"n_ctx": 1})


@pytest.mark.skipif(llama_cpp_unavailable_reason() is None, reason="llama-cpp-python is installed here")
def test_without_llama_cpp_the_engine_names_the_extra():
    from expandr_haystack.generation import make_sampler

    with pytest.raises(RuntimeError, match=r"`engine`='llama_cpp' cannot run: .*llama-cpp"):
        make_sampler(None, None, None, SamplerOptions(engine="llama_cpp"))


# -- the engine itself (llama-cpp-python installed) ----------------------------------------------------------------
@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory):
    """A LoRA adapter on the dequantised bundled SmolLM2 with a clear effect (random A and B, r 4, alpha 8, on the
    attention projections and down), saved as PEFT saves it; and its logits, with and without it, on one prompt."""
    import torch
    from peft import LoraConfig, get_peft_model

    from expandr_haystack.models import load_llm

    model, tokenizer = load_llm(None, None, "cpu", "float32")
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
                        init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    folder = tmp_path_factory.mktemp("lora") / "adapter"
    peft_model.save_pretrained(str(folder))
    ids = tokenizer("Please write a passage to answer the question. Question: what is lift",
                    add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        adapted = peft_model(torch.tensor([ids])).logits[0, -1].numpy()
        with peft_model.disable_adapter():
            base = peft_model(torch.tensor([ids])).logits[0, -1].numpy()
    peft_model.unload()  # the shared model without LoRA layers again
    return folder, ids, base, adapted


def llama_logits(ids, lora=None):
    from llama_cpp import Llama

    llm = Llama(model_path=str(bundled_gguf()), lora_path=lora, n_ctx=256, n_threads=2, logits_all=True,
                verbose=False)
    llm.eval(ids)
    logits = np.array(llm.scores[llm.n_tokens - 1])
    llm.close()
    return logits


@needs_llama_cpp
@pytest.mark.integration
def test_a_converted_adapter_changes_llama_cpps_logits_as_peft_changes_transformers(peft_adapter, tmp_path,
                                                                                    monkeypatch):
    """The adapter's effect on the next-token logits in llama.cpp (Q4_1 base) matches its effect in transformers
    (the dequantised float32 base): correlation 0.995 and the same size measured. Without the q/k row permutation
    the correlation falls to 0.73 (and the effect doubles), which is what this test would catch."""
    from expandr_haystack.generation import llama_cpp

    folder, ids, base, adapted = peft_adapter
    expected = adapted - base
    without = llama_logits(ids)
    assert np.corrcoef(without, base)[0, 1] > 0.99  # the same model: Q4_1 in llama.cpp, dequantised in transformers
    got = llama_logits(ids, str(lora_to_gguf(folder, bundled_gguf(), tmp_path / "a.gguf"))) - without
    assert np.corrcoef(expected, got)[0, 1] > 0.98
    assert 0.8 < np.abs(got).mean() / np.abs(expected).mean() < 1.25
    monkeypatch.setitem(llama_cpp.LORA_ARCHITECTURES, "llama", False)  # the q/k rows left in Hugging Face's order
    wrong = llama_logits(ids, str(lora_to_gguf(folder, bundled_gguf(), tmp_path / "b.gguf"))) - without
    assert np.corrcoef(expected, wrong)[0, 1] < 0.9


@needs_llama_cpp
@pytest.mark.integration
def test_expander_on_llama_cpp_seeds_rows_and_caches_under_the_engine(peft_adapter, tmp_path):
    import llama_cpp

    from expandr_haystack import LLMQueryExpander
    from expandr_haystack.options import GenerationSettings

    common = {"generation": GenerationSettings(max_new_tokens=24, seed=7), "sampler": {"engine": "llama_cpp"}}
    expander = LLMQueryExpander(n_expansions=2, cache=str(tmp_path / "c.sqlite"), **common)
    queries = ["what is lift", "heat transfer in hypersonic flow"]
    first = expander.expand(queries)
    assert expander.engine == f"llama_cpp-{llama_cpp.__version__}"
    assert all(len(row) == 2 and all(text.strip() for text in row) for row in first)
    assert first[0][0] != first[0][1]  # each sample its own seed
    fresh = LLMQueryExpander(n_expansions=2, **common)  # no cache: the same seeds give the same texts
    assert fresh.expand(queries) == first
    assert fresh.expand(queries[1:]) == first[1:]  # a row's text does not depend on the rows beside it
    # one loaded model, its tokenizer and the lock that keeps its one sequence at a time, whichever sampler calls
    assert fresh._sampler.llama is expander._sampler.llama and fresh._sampler._lock is expander._sampler._lock
    assert fresh._sampler.tokenizer is expander._sampler.tokenizer
    assert expander.cache_stats["entries"] == 4
    expander.expand(queries)
    assert expander.cache_stats["hits"] == 4
    # the other engines' rows are not served to this one (its name is in every key)
    packed = LLMQueryExpander(n_expansions=2, cache=str(tmp_path / "c.sqlite"),
                              generation=GenerationSettings(max_new_tokens=24, seed=7))
    assert packed._plan(queries, None, None, None, None)[0].key != expander._plan(queries, None, None, None,
                                                                                  None)[0].key
    folder = peft_adapter[0]
    adapted = LLMQueryExpander(adapter=str(folder), n_expansions=2, **common)
    assert adapted.expand(queries) != first  # the adapter is applied
    from expandr_haystack.models import dequantised_llm_dir

    with pytest.raises(ValueError, match=r"`model`: engine 'llama_cpp' runs a GGUF file"):  # a transformers folder
        LLMQueryExpander(model=str(dequantised_llm_dir()), sampler={"engine": "llama_cpp"}).warm_up()
