"""
Retriever step of a round: mine hard negatives with the current encoder, then train the shared encoder with
`FusedInfoNCELoss` on fused queries through sentence-transformers' trainer.

The no-expansion supervised baseline uses the same examples, trainer and budget with sentence-transformers' own
`MultipleNegativesRankingLoss` (same temperature) on the query alone. The encoder sees a corpus document as the
index and the reward embed it: `document_text(collection.document(doc_id))` (title + "\\n" + text).

Usage:
```python
from expandr_haystack.training.retriever import mine_hard_negatives, train_encoder, training_examples

negatives = mine_hard_negatives(collection, query_ids, expansions, store, encoder, settings)
rows = training_examples(collection, query_ids, expansions, negatives, settings, seed=43, n_expansions=4)
train_encoder(encoder, rows, "runs/x/round_1/encoder", settings)   # FusedInfoNCELoss over the rows' n expansions
```
"""

from __future__ import annotations

import contextlib
import logging
import random
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from haystack.document_stores.types import DocumentStore

from expandr_haystack.components.retriever import ExpandRRetriever
from expandr_haystack.core.text import document_text
from expandr_haystack.evaluation.data import Collection
from expandr_haystack.options import FusionSettings
from expandr_haystack.training.compat import checkpointing_kwarg, report_to_value
from expandr_haystack.training.config import RetrieverSettings
from expandr_haystack.training.distributed import (
    compare_ranks,
    is_main_process,
    rank_device,
    ranks_differ_error,
    world_size,
)
from expandr_haystack.training.runfiles import replace_dir, tensorboard_logging_dir

logger = logging.getLogger(__name__)


def mine_hard_negatives(collection: Collection, query_ids: Sequence[str], expansions: Sequence[Sequence[str]] | None,
                        store: DocumentStore, encoder: str | None, settings: RetrieverSettings,
                        device=None) -> dict[str, list[str]]:
    """
    For each query, the documents at ranks [skip, depth) of its (fused) ranking by the current encoder, judged
    documents (any grade) excluded.
    """
    if settings.hard_negatives == 0:
        return {q: [] for q in query_ids}
    retriever = ExpandRRetriever(store, model=encoder, top_k=settings.hard_negative_depth,
                                 fusion=FusionSettings(query_weight=settings.query_weight), device=device)
    queries = [collection.queries[q] for q in query_ids]
    results = retriever.retrieve(queries, expansions, top_k=settings.hard_negative_depth)
    negatives = {}
    for qid, docs in zip(query_ids, results):
        judged = set(collection.qrels.get(qid, {}))
        negatives[qid] = [d.id for d in docs[settings.hard_negative_skip:] if d.id not in judged]
    return negatives


def expansion_columns(query: str, expansions: Sequence[str], n: int) -> list[str]:
    """
    Exactly `n` expansion texts for one training row: the query's non-blank expansions in sample order; a query
    with fewer than `n` repeats them cyclically (3 expansions for n = 4: e1, e2, e3, e1, so e1 weighs twice in the
    mean), and a query with none uses the query itself `n` times (its fused query is then the query alone).
    """
    exps = [e for e in expansions if e.strip()] or [query]
    return [exps[j % len(exps)] for j in range(n)]


def training_examples(collection: Collection, query_ids: Sequence[str], expansions: Sequence[Sequence[str]] | None,
                      negatives: dict[str, list[str]], settings: RetrieverSettings, seed: int,
                      n_expansions: int = 1) -> list[dict[str, str]]:
    """
    Rows (query, [expansion_1, ..., expansion_n], document, negative_1..k): one per (query, relevant document), at
    most `max_positives_per_query` per query, best grade first; the expansion columns are left out when
    `expansions` is None.

    :param expansions: One list of expansions per query id (as many as were generated; `expansion_columns` fills
        or cuts them to `n_expansions`), or None for the no-expansion baseline.
    :param n_expansions: n, the expansion columns of every row (`FusedInfoNCELoss(n_expansions=n)`).
    """
    rng = random.Random(seed)
    all_ids = list(collection.corpus)
    rows = []
    for i, qid in enumerate(query_ids):
        judged = set(collection.qrels.get(qid, {}))
        pool = list(negatives.get(qid, []))
        for pos in collection.relevant(qid)[: settings.max_positives_per_query]:
            row = {"query": collection.queries[qid]}
            if expansions is not None:
                texts = expansion_columns(collection.queries[qid], expansions[i], n_expansions)
                row.update({f"expansion_{m}": text for m, text in enumerate(texts, start=1)})
            row["document"] = document_text(collection.document(pos))  # the positive; "positive" would make ST warn
            picks = rng.sample(pool, min(settings.hard_negatives, len(pool)))
            while len(picks) < settings.hard_negatives:  # too few mined: random unjudged documents
                cand = rng.choice(all_ids)
                if cand not in judged and cand not in picks:
                    picks.append(cand)
            for k, neg in enumerate(picks, start=1):
                row[f"negative_{k}"] = document_text(collection.document(neg))
            rows.append(row)
    rng.shuffle(rows)
    return rows


def encoder_training_kwargs(settings: RetrieverSettings, output_dir: str | Path, examples: int, seed: int,
                            use_cpu: bool, progress_bar: bool, run_name: str | None = None) -> dict:
    """
    The keyword arguments of sentence-transformers' `SentenceTransformerTrainingArguments` for `settings` (the batch
    sampler excepted: `train_encoder` adds it). Pure: no model, no trainer.

    :param examples: Training rows (the batch size is cut to them).
    :param run_name: The run's name in the trackers of `settings.report_to` (None = transformers' default).
    """
    return {
        "output_dir": str(output_dir),
        "num_train_epochs": settings.epochs,
        "max_steps": settings.max_steps,
        # the global batch (`batch_size`, cut to the rows); several processes: the batch sampler builds global
        # batches as one process would (no duplicates within the whole batch) and Accelerate splits each over them
        "per_device_train_batch_size": min(settings.batch_size, examples),
        **({"accelerator_config": {"split_batches": True}} if world_size() > 1 else {}),
        "learning_rate": settings.learning_rate,
        "warmup_steps": float(settings.warmup_ratio),  # transformers 5: a float in [0, 1) is a fraction of steps
        "save_strategy": "no",
        "report_to": report_to_value(settings.report_to),
        **({"run_name": run_name} if run_name else {}),
        "logging_steps": settings.logging_steps,
        "seed": seed,
        "bf16": settings.bf16,
        "use_cpu": use_cpu,
        "disable_tqdm": not progress_bar,
        "dataloader_drop_last": False,
    }


def train_encoder(base_encoder: str | None, rows: list[dict[str, str]], output_dir: str | Path,
                  settings: RetrieverSettings, fused: bool = True, seed: int = 42, device: str | None = None,
                  progress_bar: bool = True, logging_dir: str | Path | None = None,
                  run_name: str | None = None) -> dict[str, Any]:
    """
    Train the shared encoder and save it (sentence-transformers format) to `output_dir`, atomically.

    Under `torchrun` / `accelerate launch` every rank calls this with the same rows: the trainer gives each rank its
    share of every batch (`settings.batch_size` is the global batch), the loss gathers the embeddings of all ranks
    (`gather_across_devices`, so the negatives are the global batch's, as on one device), the ranks' weights are
    compared after training and rank 0 saves.

    :param fused: True = `FusedInfoNCELoss` on (query, expansion_1..n, document, negatives) rows (n = the rows'
        expansion columns); False = the no-expansion baseline with sentence-transformers'
        `MultipleNegativesRankingLoss` (same temperature, examples and budget; expansion columns are dropped).
    :param logging_dir: Where TensorBoard event files go when `settings.report_to` includes TensorBoard (the
        trainer's own output folder is temporary; the `TENSORBOARD_LOGGING_DIR` environment variable wins).
    :param run_name: The run's name in the trackers of `settings.report_to`.
    :returns: ``{"examples": rows}``, and under several processes ``"weights_sha256"`` (the trained weights' digest,
        equal on every rank, else a RuntimeError after rank 0 saved) and ``"ranks"``. Several processes drop the last
        incomplete global batch of an epoch (sentence-transformers sets `dataloader_drop_last` under DDP).
    """
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers.base.losses.merged_forward import column_merging_disabled
    from sentence_transformers.base.sampler import BatchSamplers
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.training_args import SentenceTransformerTrainingArguments

    from expandr_haystack.models import resolve_device, resolve_encoder_path
    from expandr_haystack.training.losses import FusedInfoNCELoss

    if not rows:
        raise ValueError("No training examples: the train split has no query with a judged relevant document.")
    if world_size() > 1 and len(rows) < settings.batch_size:
        raise ValueError(f"{len(rows)} training rows are fewer than one global batch (`retriever.batch_size` = "
                         f"{settings.batch_size}) of this {world_size()}-process launch, which drops incomplete "
                         "batches: lower the batch size or train on one process.")
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    torch_device = rank_device(device) or resolve_device(None)
    model = SentenceTransformer(resolve_encoder_path(base_encoder), device=torch_device)
    model.max_seq_length = settings.max_length
    n_expansions = sum(1 for k in rows[0] if k.startswith("expansion"))
    gather = world_size() > 1 if settings.gather_across_devices is None else settings.gather_across_devices
    if fused:
        if n_expansions == 0:
            raise ValueError("`fused=True` needs rows with expansion columns (training_examples with expansions).")
        loss = FusedInfoNCELoss(model, temperature=settings.temperature, query_weight=settings.query_weight,
                                n_expansions=n_expansions, gather_across_devices=gather)
    else:
        rows = [{k: v for k, v in r.items() if not k.startswith("expansion")} for r in rows]
        loss = MultipleNegativesRankingLoss(model, scale=1.0 / settings.temperature, gather_across_devices=gather)
    dataset = Dataset.from_list(rows)
    work = Path(tempfile.mkdtemp(prefix=".train-", dir=output_dir.parent))
    try:
        args = SentenceTransformerTrainingArguments(
            **encoder_training_kwargs(settings, work / "trainer", len(rows), seed, torch_device == "cpu", progress_bar,
                                      run_name),
            **checkpointing_kwarg(SentenceTransformerTrainingArguments, settings.gradient_checkpointing),
            batch_sampler=BatchSamplers.NO_DUPLICATES,
        )
        with tensorboard_logging_dir(logging_dir):  # read when the trainer makes its callbacks
            trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss)
        # sentence-transformers embeds all columns in one forward padded to the longest column (256-token documents):
        # on a CPU the short query and expansion columns then cost as much as documents. Per-column forwards give the
        # same loss and gradients (its own note) and train n = 4 expansions ~30% faster here; GPUs keep the merge.
        with column_merging_disabled() if torch_device == "cpu" else contextlib.nullcontext():
            trainer.train()
        record, differ = compare_ranks(model)
        if is_main_process():  # under accelerate/torchrun every process trains; one saves
            staged = work / "model"
            model.save(str(staged))
            replace_dir(staged, output_dir)
        if differ:
            raise ranks_differ_error("encoder training", differ)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"examples": len(rows), **record}


