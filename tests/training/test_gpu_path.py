"""
The GPU path of training, pinned on CPU (issue #14): the checkpointing switch across transformers 5.x, the
top-level `device` reaching DPO, and the frozen base loaded in the training dtype. A tiny random Llama with a
word-level tokenizer (built here, no download, no bundled model) trains one real DPO step; the `gpu`-marked tests
repeat the device and dtype checks on CUDA (benchmarks/gpu_check.sh runs them).
"""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from expandr_haystack.training.compat import checkpointing_kwarg
from expandr_haystack.training.config import DPOSettings, JointConfig
from expandr_haystack.training.dpo import (
    base_model_dtype,
    dpo_config_kwargs,
    pin_trainer_device,
    train_dpo,
)

WORDS = ["what", "is", "lift", "heat", "flow", "wing", "a", "the", "of", "passage", "about", "slab", "layer"]


def tiny_llm(folder: Path) -> Path:
    """A tiny random Llama + a word-level fast tokenizer with a chat template, saved to `folder`."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<eos>", "<user>", "<assistant>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                        eos_token="<eos>")
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} <eos> {% endfor %}"
                               "{% if add_generation_prompt %}<assistant> {% endif %}")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         pad_token_id=vocab["<pad>"], eos_token_id=vocab["<eos>"], bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def pair_file(path: Path, n: int = 2) -> Path:
    rows = [{"prompt": [{"role": "user", "content": "what is lift"}],
             "chosen": [{"role": "assistant", "content": "a passage about the lift of a wing"}],
             "rejected": [{"role": "assistant", "content": "heat of a slab"}], "query_id": str(i)} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


# -- 1. the checkpointing switch across transformers 5.x ------------------------------------------------------------
@dataclasses.dataclass
class OldTrainingArguments:
    """transformers 5.0-5.17: only `gradient_checkpointing` (passing `activation_checkpointing` is a TypeError)."""

    output_dir: str = "out"
    gradient_checkpointing: bool = True


@dataclasses.dataclass
class NewTrainingArguments(OldTrainingArguments):
    """transformers 5.2x: `activation_checkpointing`, with `gradient_checkpointing` as its deprecated alias."""

    activation_checkpointing: bool | None = None


def test_checkpointing_switch_is_named_as_the_installed_config_class_names_it():
    assert checkpointing_kwarg(OldTrainingArguments, True) == {"gradient_checkpointing": True}
    assert checkpointing_kwarg(NewTrainingArguments, False) == {"activation_checkpointing": False}
    with pytest.raises(TypeError, match="neither"):
        checkpointing_kwarg(dataclasses.make_dataclass("Other", [("x", int)]), True)


@pytest.mark.parametrize("checkpointing", [True, False])
def test_dpo_config_kwargs_build_an_old_style_config_and_the_real_dpo_config(tmp_path, checkpointing):
    from trl import DPOConfig

    settings = DPOSettings(gradient_checkpointing=checkpointing, max_steps=3, beta=0.2)
    kwargs = dpo_config_kwargs(OldTrainingArguments, settings, tmp_path, use_cpu=True, bf16=False, logging_steps=1)
    old = OldTrainingArguments(**{k: v for k, v in kwargs.items() if k in ("output_dir", "gradient_checkpointing")})
    assert old.gradient_checkpointing is checkpointing and "activation_checkpointing" not in kwargs
    # the installed transformers' real DPOConfig takes what is built for it (TRL defaults checkpointing on)
    args = DPOConfig(**dpo_config_kwargs(DPOConfig, settings, tmp_path, use_cpu=True, bf16=False, logging_steps=1))
    assert args.gradient_checkpointing is checkpointing
    assert getattr(args, "activation_checkpointing", checkpointing) is checkpointing
    assert (args.beta, args.max_steps, args.bf16, args.use_cpu) == (0.2, 3, False, True)


# -- 5. the frozen base in the training dtype -----------------------------------------------------------------------
def test_base_model_dtype_follows_bf16():
    assert base_model_dtype(True) is torch.bfloat16 and base_model_dtype(False) is torch.float32


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return tiny_llm(tmp_path_factory.mktemp("tiny-llm"))


@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "fp32"])
def test_dpo_trains_lora_over_a_base_loaded_in_the_training_dtype(llm, tmp_path, monkeypatch, bf16):
    """One real DPO step on CPU; the model handed to DPOTrainer has its frozen weights in the training dtype and its
    LoRA weights in float32."""
    import trl

    seen = {}
    real_init = trl.DPOTrainer.__init__

    def spy(self, model=None, *args, **kwargs):
        seen["dtypes"] = {p.dtype for p in model.parameters()}
        seen["args"] = kwargs["args"]
        return real_init(self, model, *args, **kwargs)

    monkeypatch.setattr(trl.DPOTrainer, "__init__", spy)
    settings = DPOSettings(max_steps=1, per_device_train_batch_size=2, max_length=32, device="cpu", bf16=bf16,
                           logging_steps=1)
    adapter = train_dpo(str(llm), pair_file(tmp_path / "pairs.jsonl"), tmp_path / "dpo", settings)
    assert (adapter / "adapter_model.safetensors").exists()
    assert seen["dtypes"] == {base_model_dtype(bf16)}  # before the trainer adds LoRA: the frozen base only
    assert seen["args"].bf16 is bf16 and seen["args"].use_cpu is True
    history = json.loads((tmp_path / "dpo" / "log_history.json").read_text())
    assert any("rewards/margins" in h for h in history)


def test_a_continued_adapter_trains_over_a_bf16_base(llm, tmp_path):
    settings = DPOSettings(max_steps=1, per_device_train_batch_size=2, max_length=32, device="cpu", bf16=True,
                           logging_steps=1)
    pairs = pair_file(tmp_path / "pairs.jsonl")
    first = train_dpo(str(llm), pairs, tmp_path / "r1", settings)
    second = train_dpo(str(llm), pairs, tmp_path / "r2", settings, adapter=str(first))
    from safetensors.torch import load_file

    weights = load_file(str(second / "adapter_model.safetensors"))
    assert weights and all(w.dtype == torch.float32 for w in weights.values())  # PEFT keeps LoRA in float32


# -- 4. the top-level device reaches DPO ----------------------------------------------------------------------------
@pytest.mark.parametrize("top,dpo,expected", [
    ("cpu", None, "cpu"),          # device: cpu on a GPU machine: DPO must not pick CUDA
    ("cuda:1", None, "cuda:1"),
    (None, None, None),            # neither: DPO's own default (CUDA when available)
    ("cuda:0", "cpu", "cpu"),      # an explicit dpo.device is kept
])
def test_the_config_device_reaches_dpo(tmp_path, monkeypatch, top, dpo, expected):
    import expandr_haystack.training.dpo as dpo_module
    from expandr_haystack.training.rounds import JointTrainer

    received = {}

    def fake_train_dpo(llm, pairs_path, output_dir, settings, adapter=None, **tracking):
        received["device"], received["settings"] = settings.device, settings
        received["tracking"] = tracking
        out = Path(output_dir) / "adapter"
        out.mkdir(parents=True)
        (out / "adapter_config.json").write_text("{}")
        return out

    monkeypatch.setattr(dpo_module, "train_dpo", fake_train_dpo)
    config = JointConfig(device=top, dpo=DPOSettings(device=dpo, beta=0.3))  # no validation: no CUDA needed
    trainer = JointTrainer(config, tmp_path, progress_bar=False)
    trainer.folder.open(config.to_dict(), resume=False, defaults=JointConfig.defaults())
    trainer._round_dir(1).mkdir(parents=True)
    trainer.folder.finish("round1.pairs", kept=2)
    assert trainer._dpo(1)["pairs"] == 2
    assert received["device"] == expected and received["settings"].beta == 0.3
    assert received["tracking"] == {"progress_bar": False, "logging_dir": tmp_path / "round_1" / "logs" / "dpo",
                                    "run_name": f"{tmp_path.name}-round1-dpo"}
    assert config.dpo.device == dpo  # the config itself (config.json, resume checks) is unchanged


# -- cuda:N pins a single-process trainer ---------------------------------------------------------------------------
def test_an_explicit_gpu_pins_the_trainer(tmp_path, monkeypatch):
    from trl import DPOConfig

    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(d))
    kwargs = dpo_config_kwargs(DPOConfig, DPOSettings(), tmp_path, use_cpu=False, bf16=False, logging_steps=1)
    args = DPOConfig(**kwargs)
    pin_trainer_device(args, "cuda:1")
    assert args.device == torch.device("cuda:1") and args.n_gpu == 1 and calls == [torch.device("cuda:1")]
    for device in ("cpu", "cuda"):  # nothing to pin: the trainer's own choice
        other = DPOConfig(**kwargs)
        pin_trainer_device(other, device)
        assert "_setup_devices" not in other.__dict__ or other.device.index in (None, 0)
    assert len(calls) == 1
    distributed = DPOConfig(**kwargs)  # built first: transformers 5.0 sets up its devices (MASTER_ADDR...) in __init__
    monkeypatch.setenv("WORLD_SIZE", "2")  # a distributed launch: each rank keeps its own GPU
    pin_trainer_device(distributed, "cuda:1")
    assert len(calls) == 1


# -- on a CUDA machine (benchmarks/gpu_check.sh) --------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
def test_dpo_on_cuda_loads_bf16_and_trains_on_the_named_gpu(llm, tmp_path, monkeypatch):
    import trl

    seen = {}
    real_train = trl.DPOTrainer.train

    def spy(self, *args, **kwargs):
        seen["devices"] = {p.device for p in self.model.parameters()}
        seen["dtypes"] = {p.dtype for n, p in self.model.named_parameters() if "lora_" not in n}
        return real_train(self, *args, **kwargs)

    monkeypatch.setattr(trl.DPOTrainer, "train", spy)
    settings = DPOSettings(max_steps=1, per_device_train_batch_size=2, max_length=32, device="cuda:0",
                           logging_steps=1, gradient_checkpointing=True)
    adapter = train_dpo(str(llm), pair_file(tmp_path / "pairs.jsonl"), tmp_path / "dpo", settings)
    assert (adapter / "adapter_model.safetensors").exists()
    bf16 = torch.cuda.is_bf16_supported()
    assert seen["dtypes"] == {base_model_dtype(bf16)}
    assert seen["devices"] == {torch.device("cuda", 0)}


@pytest.mark.gpu
@needs_cuda
def test_dpo_with_device_cpu_stays_on_the_cpu_of_a_gpu_machine(llm, tmp_path, monkeypatch):
    import trl

    seen = {}
    real_train = trl.DPOTrainer.train

    def spy(self, *args, **kwargs):
        seen["devices"] = {p.device.type for p in self.model.parameters()}
        return real_train(self, *args, **kwargs)

    monkeypatch.setattr(trl.DPOTrainer, "train", spy)
    settings = DPOSettings(max_steps=1, per_device_train_batch_size=2, max_length=32, device="cpu", logging_steps=1)
    train_dpo(str(llm), pair_file(tmp_path / "pairs.jsonl"), tmp_path / "dpo", settings)
    assert seen["devices"] == {"cpu"}
