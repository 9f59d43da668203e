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

Device and precision:
- ``settings.device`` is honoured exactly: "cpu" trains on the CPU even where CUDA is available; an explicit
  "cuda:N" pins a single-process run to GPU N (`pin_trainer_device`; transformers' Trainer would otherwise take
  cuda:0, and wrap the model in DataParallel over every visible GPU); None = "cuda" when available, else "cpu".
  In a distributed launch (accelerate/torchrun) each process keeps the GPU of its rank.
- The frozen base model is loaded in the training dtype (`base_model_dtype`): bfloat16 when ``bf16`` is on (the
  default on a CUDA GPU that supports it), float32 otherwise; the LoRA weights stay float32 (PEFT's default
  upcast), so an 8B base takes ~16 GB instead of ~32 GB.
- transformers' TrainingArguments renamed ``gradient_checkpointing`` to ``activation_checkpointing`` within 5.x (5.17
  has only the old name, 5.24 both); `dpo_config_kwargs` picks the name the installed config class has.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from expandr_haystack.checks import check_adapter_dir
from expandr_haystack.files import atomic_write_text
from expandr_haystack.training.compat import checkpointing_kwarg, report_to_value
from expandr_haystack.training.config import DPOSettings

logger = logging.getLogger(__name__)

#: The columns DPOTrainer reads; the pair file's metadata columns (query_id, rewards, ...) are dropped before training.
DPO_COLUMNS = ("prompt", "chosen", "rejected")
#: The DPOTrainer metrics `final_dpo_metrics` reports (their last logged values).
FINAL_METRICS = ("rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected", "loss")
#: The file `train_dpo` writes the trainer's log history to, in its `output_dir`.
LOG_HISTORY = "log_history.json"
#: Beside it: the trained adapter's weight digest and the number of processes that trained it (`compare_ranks`).
RANKS = "ranks.json"


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


def dpo_config_kwargs(config_cls: type, settings: DPOSettings, output_dir: str | Path, use_cpu: bool, bf16: bool,
                      logging_steps: int, progress_bar: bool = False, run_name: str | None = None) -> dict[str, Any]:
    """
    The keyword arguments of `config_cls` (`trl.DPOConfig`) for `settings`; the checkpointing switch is named as the
    installed transformers names it (`checkpointing_kwarg`). Pure: no model, no trainer.

    :param logging_steps: The logging interval (`settings.logging_steps`, cut to the run's length by `train_dpo`).
    :param progress_bar: Show the trainer's progress bar.
    :param run_name: The run's name in the trackers of `settings.report_to` (None = transformers' default).

    Usage:
    ```python
    from trl import DPOConfig
    args = DPOConfig(**dpo_config_kwargs(DPOConfig, DPOSettings(), "out", use_cpu=True, bf16=False, logging_steps=10))
    ```
    """
    return {
        "output_dir": str(output_dir),
        "beta": settings.beta,
        "learning_rate": settings.learning_rate,
        "num_train_epochs": settings.num_train_epochs,
        "max_steps": settings.max_steps,
        "per_device_train_batch_size": settings.per_device_train_batch_size,
        "gradient_accumulation_steps": settings.gradient_accumulation_steps,
        "max_length": settings.max_length,
        "seed": settings.seed,
        "use_cpu": use_cpu,
        "bf16": bf16,
        # TRL defaults checkpointing on; ours is off unless asked for
        **checkpointing_kwarg(config_cls, settings.gradient_checkpointing),
        "logging_steps": logging_steps,
        "warmup_steps": settings.warmup_steps,
        "report_to": report_to_value(settings.report_to),
        **({"run_name": run_name} if run_name else {}),
        "save_strategy": "no",
        "disable_tqdm": not progress_bar,
    }


def base_model_dtype(bf16: bool):
    """
    The dtype the frozen base model is loaded in: the training precision, ``torch.bfloat16`` when `bf16` is on, else
    ``torch.float32``. (LoRA weights are upcast to float32 by PEFT either way; with `bf16` the trainer runs the
    forward under bfloat16 autocast, so a float32 copy of the frozen weights would only cost memory.)
    """
    import torch

    return torch.bfloat16 if bf16 else torch.float32


def pin_trainer_device(args: Any, device: str) -> None:
    """
    Make a single-process transformers `Trainer` built from `args` train on `device` when it names one GPU
    ("cuda:N"): transformers picks cuda:0 by itself (and, with several GPUs visible, wraps the model in DataParallel
    over all of them). Sets the current CUDA device to N, the args' device to cuda:N and their GPU count to 1. Does
    nothing for "cpu", a bare "cuda", or in a distributed launch (each rank has its own GPU there).
    """
    import torch

    from expandr_haystack.training.distributed import world_size

    target = torch.device(device)
    if target.type != "cuda" or target.index is None or world_size() > 1:
        return
    torch.cuda.set_device(target)
    args.__dict__["_setup_devices"] = target  # TrainingArguments.device reads this cached_property
    args._n_gpu = 1


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


#: ``adapter_config.json`` keys PEFT holds as sets and writes in the process's string-hash order (PYTHONHASHSEED):
#: sorted after saving, so that the same adapter is always the same bytes. Its fingerprint keys the expansion cache
#: and the rows' seeds: with the order left to chance, two runs of one config wrote ``["v_proj", "q_proj"]`` once
#: and ``["q_proj", "v_proj"]`` once, and their identical round-1 adapters sampled different round-2 expansions.
SET_VALUED_ADAPTER_KEYS = ("target_modules", "modules_to_save", "exclude_modules")


def sort_adapter_config(adapter_dir: str | Path) -> list[Path]:
    """
    Rewrite every ``adapter_config.json`` under `adapter_dir` (the adapter's own and those of adapters saved inside
    it, such as TRL's ``ref/`` copy of the reference adapter) with its set-valued lists (`SET_VALUED_ADAPTER_KEYS`)
    and its keys sorted, as PEFT writes them; atomically, keeping each file's mode. Returns the files rewritten
    (none for a folder without such a file).
    """
    rewritten = []
    for path in sorted(Path(adapter_dir).rglob("adapter_config.json")):
        config = json.loads(path.read_text())
        for key in SET_VALUED_ADAPTER_KEYS:
            value = config.get(key)
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                config[key] = sorted(value)
        mode = path.stat().st_mode & 0o777
        atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True))
        path.chmod(mode)  # the temporary file's 0600 would make a shared adapter folder unreadable to others
        rewritten.append(path)
    return rewritten


def train_dpo(base_model_path: str | None, pairs_path: str | Path, output_dir: str | Path,
              settings: DPOSettings | None = None, adapter: str | None = None, progress_bar: bool = True,
              logging_dir: str | Path | None = None, run_name: str | None = None) -> Path:
    """
    Train a LoRA adapter on the expander LLM with DPO.

    :param base_model_path: The base causal LM (None = bundled SmolLM2-135M-Instruct, dequantised copy).
    :param pairs_path: A pair file from `expandr_haystack.training.pairs.build_pairs` / `training/pairs.py`.
    :param output_dir: Trainer output folder; the adapter is saved to ``<output_dir>/adapter``.
    :param settings: `DPOSettings` (paper defaults when None).
    :param adapter: An existing PEFT adapter of the same base model to continue training (e.g. the previous round's).
        TRL 1.16 (with PEFT >= 0.20) then takes a frozen copy of that adapter (its "ref" adapter) as the reference,
        i.e. the previous round's LLM; for a fresh adapter the reference is the base model (adapter disabled).
    :param progress_bar: Show the trainer's progress bar.
    :param logging_dir: Where TensorBoard event files go when `settings.report_to` includes TensorBoard (default:
        transformers' ``<output_dir>/runs/...``; the `TENSORBOARD_LOGGING_DIR` environment variable wins).
    :param run_name: The run's name in the trackers of `settings.report_to`.
    :returns: The adapter directory (PEFT format, with the tokenizer), loadable by `LLMQueryExpander(adapter=...)`.
        The trainer's log history goes to ``<output_dir>/log_history.json`` (logged every `logging_steps` steps, or
        at least once: the interval is cut to the run's length), the digest of the trained weights (equal on every
        rank of a distributed launch, else a RuntimeError) to ``<output_dir>/ranks.json``; rank 0 writes them all.
    """
    import torch
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from expandr_haystack.models import resolve_llm_path
    from expandr_haystack.training.distributed import (
        compare_ranks,
        is_main_process,
        rank_device,
        ranks_differ_error,
        world_size,
    )
    from expandr_haystack.training.runfiles import tensorboard_logging_dir

    settings = settings or DPOSettings()
    settings.validate()
    check_adapter_dir(adapter, "adapter")
    dataset = load_pairs_dataset(pairs_path)

    device = rank_device(settings.device) or ("cuda" if torch.cuda.is_available() else "cpu")
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
    model = AutoModelForCausalLM.from_pretrained(path, dtype=base_model_dtype(bf16))
    peft_config = None
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(Path(adapter).expanduser()), is_trainable=True)
    else:
        peft_config = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                                 target_modules=list(settings.target_modules), bias="none", task_type="CAUSAL_LM")

    out = Path(output_dir).expanduser()
    logging_steps = min(settings.logging_steps, _optimizer_steps(len(dataset), settings, world_size()))
    args = DPOConfig(**dpo_config_kwargs(DPOConfig, settings, out, use_cpu, bf16, logging_steps,
                                         progress_bar=progress_bar, run_name=run_name))
    pin_trainer_device(args, device)
    with tensorboard_logging_dir(logging_dir):  # read when the trainer makes its callbacks
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
    record, differ = compare_ranks(trainer.model)  # the LoRA weights (the frozen base is not hashed)
    if is_main_process():  # under accelerate/torchrun every process trains; one saves
        trainer.model.save_pretrained(str(adapter_dir))
        sort_adapter_config(adapter_dir)
        tokenizer.save_pretrained(str(adapter_dir))
        (out / LOG_HISTORY).write_text(json.dumps(trainer.state.log_history, indent=1, default=str))
        (out / RANKS).write_text(json.dumps(record))
        logger.info("DPO adapter saved to %s", adapter_dir)
    if differ:
        raise ranks_differ_error("DPO", differ)
    return adapter_dir


__all__ = [
    "DPO_COLUMNS",
    "FINAL_METRICS",
    "LOG_HISTORY",
    "RANKS",
    "SET_VALUED_ADAPTER_KEYS",
    "DPOSettings",
    "base_model_dtype",
    "dpo_config_kwargs",
    "final_dpo_metrics",
    "load_pairs_dataset",
    "pin_trainer_device",
    "sort_adapter_config",
    "train_dpo",
]
