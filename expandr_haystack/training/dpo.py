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

`DPOSettings` is defined in `expandr_haystack.training.config` (with every other training setting). The trainer's
log history is saved as ``<output_dir>/log_history.json``; `final_dpo_metrics` reads the last logged
`rewards/margins` and `rewards/accuracies` from it (how far DPO moved the policy).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from expandr_haystack.checks import check_adapter_dir
from expandr_haystack.training.config import DPOSettings

logger = logging.getLogger(__name__)

#: The columns DPOTrainer reads; the pair file's metadata columns (query_id, rewards, ...) are dropped before training.
DPO_COLUMNS = ("prompt", "chosen", "rejected")
#: The DPOTrainer metrics `final_dpo_metrics` reports (their last logged values).
FINAL_METRICS = ("rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected", "loss")
#: The file `train_dpo` writes the trainer's log history to, in its `output_dir`.
LOG_HISTORY = "log_history.json"


def final_dpo_metrics(log_history: Sequence[dict[str, Any]]) -> dict[str, float]:
    """
    The last logged value of each of `FINAL_METRICS` in a DPOTrainer's log history (``trainer.state.log_history``,
    or the ``log_history.json`` `train_dpo` writes), plus ``steps`` (the last logged step); metrics never logged
    are left out.

    Usage:
    ```python
    final_dpo_metrics(json.loads(Path("runs/x/round_1/dpo_log.json").read_text()))
    # {"rewards/margins": 0.04, "rewards/accuracies": 1.0, ..., "steps": 30}
    ```
    """
    out: dict[str, float] = {}
    for entry in log_history:
        for key in FINAL_METRICS:
            value = entry.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                out[key] = float(value)
        if "step" in entry:
            out["steps"] = int(entry["step"])
    return out


def _optimizer_steps(examples: int, settings: DPOSettings, world_size: int = 1) -> int:
    """About how many optimizer steps the trainer takes (never more than it does), so logging happens at least once."""
    if settings.max_steps > 0:
        return settings.max_steps
    batches = math.ceil(examples / (settings.per_device_train_batch_size * max(world_size, 1)))
    per_epoch = max(batches // settings.gradient_accumulation_steps, 1)
    return max(int(settings.num_train_epochs * per_epoch), 1)


def load_pairs_dataset(pairs_path: str | Path):
    """The pair file as a `datasets.Dataset` with only the DPO columns (prompt, chosen, rejected)."""
    from datasets import load_dataset

    path = Path(pairs_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"`pairs_path`: no pair file at {str(path)!r} (write one with `expandr pairs`).")
    if path.stat().st_size == 0:
        raise ValueError(f"`pairs_path`: {str(path)!r} is empty: no pair was kept (lower the threshold or add "
                         f"queries).")
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
        The trainer's log history goes to ``<output_dir>/log_history.json`` (logged every `logging_steps` steps, or
        at least once: the interval is cut to the run's length).
    """
    import torch
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from expandr_haystack.models import resolve_llm_path
    from expandr_haystack.training.runfiles import world_size

    settings = settings or DPOSettings()
    settings.validate()
    check_adapter_dir(adapter, "adapter")
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
        logging_steps=min(settings.logging_steps, _optimizer_steps(len(dataset), settings, world_size())),
        warmup_steps=settings.warmup_steps,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config)
    kept = len(trainer.train_dataset)
    if kept == 0:
        raise ValueError(f"`max_length` ({settings.max_length} tokens) is filled by the prompt of every one of the "
                         f"{len(dataset)} pairs in {str(pairs_path)!r}, so no completion token is left to train on; "
                         f"raise `dpo.max_length` (grounded prompts hold passages: 512 or more).")
    if kept < len(dataset):
        logger.warning("DPO: %d of %d pairs dropped: their prompt alone fills max_length=%d.", len(dataset) - kept,
                       len(dataset), settings.max_length)
    trainer.train()
    adapter_dir = out / "adapter"
    trainer.model.save_pretrained(str(adapter_dir))
    tokenizer.save_pretrained(str(adapter_dir))
    (out / LOG_HISTORY).write_text(json.dumps(trainer.state.log_history, indent=1, default=str))
    logger.info("DPO adapter saved to %s", adapter_dir)
    return adapter_dir


__all__ = ["DPO_COLUMNS", "FINAL_METRICS", "LOG_HISTORY", "DPOSettings", "final_dpo_metrics", "load_pairs_dataset",
           "train_dpo"]
