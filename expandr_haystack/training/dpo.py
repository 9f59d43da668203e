"""
One DPO round of the ExpandR expander: `trl.DPOTrainer` with a PEFT LoRA adapter on a pair file from `pairs.py`.

Paper settings by default: beta 0.1, learning rate 2e-5, 2 epochs, LoRA r 8 / alpha 32 / dropout 0.1 on
q_proj and v_proj. The adapter is saved in PEFT format (``adapter_config.json`` + ``adapter_model.safetensors``), so
`LLMQueryExpander(adapter=...)` loads it.

Usage:
```python
from expandr_haystack.training.dpo import DPOSettings, train_dpo

adapter_dir = train_dpo(None, "pairs.jsonl", "runs/dpo-round1", DPOSettings())   # None = bundled SmolLM2
```
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: The columns DPOTrainer reads; the pair file's metadata columns (query_id, rewards, ...) are dropped before training.
DPO_COLUMNS = ("prompt", "chosen", "rejected")


@dataclass
class DPOSettings:
    """
    DPO + LoRA settings (ExpandR paper defaults).

    :param device: "cpu", "cuda", "cuda:0", ... or None (CUDA when available).
    :param bf16: bfloat16 mixed precision; None = on when training on a CUDA GPU that supports it.
    :param max_length: Tokens of prompt + completion (longer pairs are truncated at the end).
    :param max_steps: Stop after this many optimizer steps (-1 = run `num_train_epochs`).
    """

    beta: float = 0.1
    learning_rate: float = 2e-5
    num_train_epochs: float = 2.0
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_length: int = 512
    max_steps: int = -1
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    seed: int = 42
    device: str | None = None
    bf16: bool | None = None
    gradient_checkpointing: bool = False  # activation checkpointing: saves memory, ~20% slower
    logging_steps: int = 10
    warmup_steps: float = 0  # an integer (steps) or a float in [0, 1) (fraction of all steps)

    def validate(self) -> None:
        """Raise a ValueError naming the first bad setting."""
        for name in ("beta", "learning_rate", "num_train_epochs"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"`{name}` must be a number > 0; got {value!r}.")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "lora_r",
                     "lora_alpha", "logging_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1; got {value!r}.")
        if not isinstance(self.max_steps, int) or (self.max_steps < 1 and self.max_steps != -1):
            raise ValueError(f"`max_steps` must be -1 or an integer >= 1; got {self.max_steps!r}.")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"`lora_dropout` must be in [0, 1); got {self.lora_dropout!r}.")
        if not self.target_modules or not all(isinstance(m, str) for m in self.target_modules):
            raise ValueError(f"`target_modules` must be a non-empty list of module names; got {self.target_modules!r}.")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d


def load_pairs_dataset(pairs_path: str | Path):
    """The pair file as a `datasets.Dataset` with only the DPO columns (prompt, chosen, rejected)."""
    from datasets import load_dataset

    path = Path(pairs_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"`pairs_path`: no pair file at {str(path)!r} (write one with training/pairs.py).")
    if path.stat().st_size == 0:
        raise ValueError(f"`pairs_path`: {str(path)!r} is empty: no pair was kept (lower the threshold or add queries).")
    dataset = load_dataset("json", data_files=str(path), split="train")
    missing = [c for c in DPO_COLUMNS if c not in dataset.column_names]
    if missing:
        raise ValueError(f"`pairs_path`: {str(path)!r} lacks the column(s) {missing}; expected TRL's preference "
                         f"format {list(DPO_COLUMNS)}.")
    return dataset.remove_columns([c for c in dataset.column_names if c not in DPO_COLUMNS])


def train_dpo(base_model_path: str | None, pairs_path: str | Path, output_dir: str | Path,
              settings: DPOSettings | None = None, adapter: str | None = None) -> Path:
    """
    Train a LoRA adapter on the expander LLM with DPO.

    :param base_model_path: The base causal LM (None = bundled SmolLM2-135M-Instruct, dequantised copy).
    :param pairs_path: A pair file from `expandr_haystack.training.pairs.build_pairs` / `training/pairs.py`.
    :param output_dir: Trainer output folder; the adapter is saved to ``<output_dir>/adapter``.
    :param settings: `DPOSettings` (paper defaults when None).
    :param adapter: An existing PEFT adapter of the same base model to continue training (e.g. the previous round's).
        The reference model is then the base model with the adapter disabled, as for a fresh adapter.
    :returns: The adapter directory (PEFT format, with the tokenizer), loadable by `LLMQueryExpander(adapter=...)`.
    """
    import torch
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from expandr_haystack.models import resolve_llm_path

    settings = settings or DPOSettings()
    settings.validate()
    if adapter is not None and not (Path(adapter).expanduser() / "adapter_config.json").exists():
        raise FileNotFoundError(f"`adapter`: {adapter!r} is not a PEFT adapter directory (no adapter_config.json).")
    dataset = load_pairs_dataset(pairs_path)

    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    use_cpu = not str(device).startswith("cuda")
    if not use_cpu and not torch.cuda.is_available():
        raise ValueError(f"`device`: {device!r} requested but CUDA is not available.")
    bf16 = settings.bf16
    if bf16 is None:
        bf16 = (not use_cpu) and torch.cuda.is_bf16_supported()

    path = resolve_llm_path(base_model_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # a fresh copy (never the memoised inference model of `models.load_llm`: LoRA wrapping would change it)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    peft_config = None
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(Path(adapter).expanduser()), is_trainable=True)
    else:
        peft_config = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                                 target_modules=list(settings.target_modules), bias="none", task_type="CAUSAL_LM")

    out = Path(output_dir).expanduser()
    args = DPOConfig(
        output_dir=str(out),
        beta=settings.beta,
        learning_rate=settings.learning_rate,
        num_train_epochs=settings.num_train_epochs,
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.per_device_train_batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        max_length=settings.max_length,
        seed=settings.seed,
        use_cpu=use_cpu,
        bf16=bf16,
        activation_checkpointing=settings.gradient_checkpointing,  # transformers 5 name; TRL defaults it on
        logging_steps=settings.logging_steps,
        warmup_steps=settings.warmup_steps,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config)
    trainer.train()
    adapter_dir = out / "adapter"
    trainer.model.save_pretrained(str(adapter_dir))
    tokenizer.save_pretrained(str(adapter_dir))
    logger.info("DPO adapter saved to %s", adapter_dir)
    return adapter_dir


__all__ = ["DPO_COLUMNS", "DPOSettings", "load_pairs_dataset", "train_dpo"]
