"""
DPO preference pairs for the ExpandR expander, built from the package's own components.

For each training query with a judged relevant document (its best-graded one):
1. `LLMQueryExpander.expand(queries, n=n_candidates, temperatures=...)` samples the candidate expansions (with a
   grounded expander, `GROUNDED_PROMPT`, also from the query's first-pass hits: `passages`);
2. the same class with `ANSWER_PROMPT` (greedy) answers the query from the gold document (q2a, self-consistency);
3. `RewardScorer.score_many` computes reward(e) = 1/rank_doc(e) + 1/rank_answer(e) and keeps or drops the pair.

Kept pairs are appended to a JSONL file in TRL's conversational preference format, one pair a line:

    {"prompt": [{"role": "user", "content": "<q2d prompt with the query>"}],
     "chosen": [{"role": "assistant", "content": "..."}], "rejected": [{"role": "assistant", "content": "..."}],
     "query_id": "12", "document_id": "184", "rewards": {"chosen": 2.0, "rejected": 0.375, "margin": 1.625, ...}}

so `datasets.load_dataset("json", data_files=out)` feeds `trl.DPOTrainer` directly (see `training/dpo.py`). The
``prompt`` column is exactly the chat messages the expander sampled the candidates from (`core.text.chat_messages`;
for a grounded expander the rendered prompt holds the query's passages), so DPO trains the policy inference uses.
Every processed query (kept or dropped) is also recorded in ``<out>.seen.jsonl``; a rerun skips the queries found in
either file, so it appends only missing ones (and the expansion cache makes repeated generation free). Each line is
written with flush + fsync, and a partial last line left by a kill is cut off on resume.
Statistics go to ``<out>.stats.json`` and a histogram plot to ``<out>.margins.png``.

Usage:
```python
from expandr_haystack.evaluation.data import bundled_path, load_collection
from expandr_haystack.training.pairs import PairConfig, build_pairs, make_components

config = PairConfig(n_candidates=8)
expander, answerer, scorer = make_components(config, cache="expansions.sqlite")
stats = build_pairs(load_collection(bundled_path("cranfield"), split="train"), "pairs.jsonl",
                    expander, answerer, scorer, config)

# grounded candidates: each query's top-3 first-pass hits (`retriever`: an ExpandRRetriever over the corpus)
expander, answerer, scorer = make_components(config, prompt=GROUNDED_PROMPT, cache="expansions.sqlite")
first_pass = dict(zip(query_ids, retriever.retrieve([collection.queries[q] for q in query_ids], top_k=3)))
stats = build_pairs(collection, "grounded-pairs.jsonl", expander, answerer, scorer, config, query_ids=query_ids,
                    passages=first_pass)
```
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from expandr_haystack.components.expander import LLMQueryExpander
from expandr_haystack.components.reward import RewardScorer
from expandr_haystack.core.reward import REASON_KEPT
from expandr_haystack.core.reward import REASONS as SCORER_REASONS
from expandr_haystack.core.text import (
    ANSWER_PROMPT,
    EXPANSION_PROMPT,
    document_text,
    has_placeholder,
)
from expandr_haystack.evaluation.data import Collection, parse_jsonl
from expandr_haystack.files import append_jsonl, atomic_write_json, cut_partial_last_line
from expandr_haystack.options import SamplerOptions
from expandr_haystack.training.config import PairConfig

logger = logging.getLogger(__name__)

#: Why a query gave no pair: the scorer's reasons, plus "no_answer" (the q2a answer could not be generated).
REASON_NO_ANSWER = "no_answer"
REASONS = (*SCORER_REASONS, REASON_NO_ANSWER)


@dataclass
class PairStats:
    """Statistics of a pair file (all queries recorded so far, this run's and earlier runs')."""

    out_path: str
    queries_selected: int = 0
    queries_seen: int = 0
    queries_new: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    kept_fraction: float = 0.0
    margin_mean: float | None = None
    margin_histogram: dict[str, list[float]] = field(default_factory=dict)
    best_score_histogram: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)
    stats_path: str | None = None
    plot_path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        drops = ", ".join(f"{k}: {v}" for k, v in self.dropped.items() if v) or "none"
        margin = "n/a" if self.margin_mean is None else f"{self.margin_mean:.3f}"
        return (f"pairs: {self.kept} kept of {self.queries_seen} queries seen ({self.kept_fraction:.1%}; "
                f"{self.queries_new} new this run, {self.queries_selected} selected); dropped: {drops}; "
                f"mean reward margin {margin}; {self.seconds:.1f}s -> {self.out_path}")


def sidecar_paths(out_path: str | Path) -> dict[str, Path]:
    """The files written next to a pair file: ``seen`` (every processed query), ``stats`` and ``plot``."""
    out = Path(out_path)
    return {"seen": out.with_name(out.name + ".seen.jsonl"), "stats": out.with_name(out.name + ".stats.json"),
            "plot": out.with_name(out.name + ".margins.png")}


def make_components(config: PairConfig | None = None, llm: str | None = None, adapter: str | None = None,
                    encoder: str | None = None, cache: str | None = None, sampler: SamplerOptions | None = None,
                    progress_bar: bool = False, prompt: str = EXPANSION_PROMPT, passages_k: int = 3,
                    passage_words: int = 50) -> tuple[LLMQueryExpander, LLMQueryExpander | None, RewardScorer]:
    """
    The three components `build_pairs` uses: candidate expander (q2d prompt, sampling), answer expander
    (`ANSWER_PROMPT`, greedy; None when `config.use_answer` is False) and scorer, sharing one LLM and one cache.

    :param sampler: How the LLM is loaded and run (engine, device, ...); the scorer's encoder runs on its device.
    :param prompt: The candidates' prompt: `EXPANSION_PROMPT` (the paper's q2d) or `GROUNDED_PROMPT` (the candidates
        also read each query's first-pass hits, given to `build_pairs` as `passages`).
    :param passages_k: First-pass hits a grounded prompt shows.
    :param passage_words: Words kept of each hit.
    """
    config = config or PairConfig()
    sampler = sampler or SamplerOptions()
    generation = config.generation(progress_bar)
    expander = LLMQueryExpander(model=llm, adapter=adapter, prompt=prompt, n_expansions=config.n_candidates,
                                generation=generation, sampler=sampler, cache=cache, passages_k=passages_k,
                                passage_words=passage_words)
    answerer = None
    if config.use_answer:
        answerer = LLMQueryExpander(model=llm, adapter=adapter, prompt=ANSWER_PROMPT, n_expansions=1,
                                    generation=generation.replace(temperature=0.0,
                                                                  max_new_tokens=config.answer_max_new_tokens),
                                    sampler=sampler, cache=cache, on_failure="skip")
    scorer = RewardScorer(model=encoder, threshold=config.threshold, device=sampler.device)
    return expander, answerer, scorer


# -- files --------------------------------------------------------------------------------------------------------
def _read_jsonl_repairing(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file written by this module; a partial last line (a kill mid-write) is cut off the file."""
    return parse_jsonl(cut_partial_last_line(path).splitlines(), path, ("query_id",), ValueError,
                       "; fix or delete the file")


def pair_row(query_id: str, prompt_messages: list[dict[str, str]], result: dict[str, Any],
             document_id: str | None) -> dict[str, Any]:
    """One JSONL line (TRL conversational preference format + metadata) for a kept scorer result."""
    c, r = result["chosen_index"], result["rejected_index"]
    ans = result["answer_similarities"]
    rewards = {
        "chosen": float(result["rewards"][c]),
        "rejected": float(result["rewards"][r]),
        "margin": float(result["rewards"][c] - result["rewards"][r]),
        "chosen_document_similarity": float(result["document_similarities"][c]),
        "rejected_document_similarity": float(result["document_similarities"][r]),
        "chosen_answer_similarity": float(ans[c]) if ans else None,
        "rejected_answer_similarity": float(ans[r]) if ans else None,
        "best_score": float(result["best_score"]),
    }
    return {"prompt": prompt_messages, "chosen": [{"role": "assistant", "content": result["chosen"]}],
            "rejected": [{"role": "assistant", "content": result["rejected"]}], "query_id": str(query_id),
            "document_id": document_id, "rewards": rewards}


# -- the loop -----------------------------------------------------------------------------------------------------
def build_pairs(
    collection: Collection,
    out_path: str | Path,
    expander: LLMQueryExpander,
    answer_expander: LLMQueryExpander | None,
    scorer: RewardScorer,
    config: PairConfig | None = None,
    query_ids: Iterable[str] | None = None,
    progress_bar: bool = True,
    overwrite: bool = False,
    passages: Mapping[str, Sequence[Any]] | None = None,
) -> PairStats:
    """
    Build (or complete) a DPO pair file for a collection's judged queries.

    :param collection: Queries, corpus and qrels
        (`expandr_haystack.evaluation.data.load_collection(..., split="train")`).
    :param out_path: The JSONL pair file; appended to when it exists (queries already recorded are skipped).
    :param expander: Candidate expander (q2d prompt, or a grounded one: `GROUNDED_PROMPT`); its `prompt`,
        `system_prompt` (and, grounded, `passages_k`/`passage_words`) also form each pair's `prompt`.
    :param answer_expander: Expander whose prompt has `{document}` and `{query}` (`ANSWER_PROMPT`; greedy);
        None only when `config.use_answer` is False.
    :param scorer: The `RewardScorer` (its `threshold` is overridden by `config.threshold`).
    :param config: `PairConfig` (defaults when None).
    :param query_ids: Restrict to these query ids (default: every judged query of the collection).
    :param progress_bar: Show a progress bar over queries.
    :param overwrite: Delete an existing pair file and its sidecars first instead of resuming.
    :param passages: ``{query_id: [Document, ...]}``, the first-pass hits of every selected query, required by (and
        only allowed with) a grounded expander: its candidates read the first `expander.passages_k` of them, and the
        pair's `prompt` is ``chat_messages(prompt, query, system_prompt, passages=format_passages(...))``.
    :returns: `PairStats` over everything recorded in the file (also saved as ``<out>.stats.json``).
    """
    config = config or PairConfig()
    config.validate()
    if not isinstance(collection, Collection):
        raise TypeError(f"`collection` must be an expandr_haystack.evaluation.data.Collection; "
                        f"got {type(collection).__name__}.")
    if not isinstance(expander, LLMQueryExpander):
        raise TypeError(f"`expander` must be an LLMQueryExpander; got {type(expander).__name__}.")
    if has_placeholder(expander.prompt, "document"):
        raise ValueError("`expander.prompt` has a '{document}' placeholder: candidates are written from the query "
                         "alone (use EXPANSION_PROMPT); the document goes to `answer_expander`.")
    if expander.grounded and passages is None:
        raise ValueError("`passages` is required: `expander.prompt` has a '{passages}' placeholder (grounded "
                         "candidates); pass {query_id: first-pass documents}.")
    if passages is not None and not expander.grounded:
        raise ValueError("`passages` was given but `expander.prompt` has no '{passages}' placeholder; use "
                         "GROUNDED_PROMPT for grounded candidates, or leave `passages` out.")
    if passages is not None and not isinstance(passages, Mapping):
        raise TypeError(f"`passages` must be a mapping {{query_id: [Document, ...]}}; got {type(passages).__name__}.")
    if config.use_answer:
        if not isinstance(answer_expander, LLMQueryExpander):
            raise TypeError("`answer_expander` must be an LLMQueryExpander with ANSWER_PROMPT (or set "
                            "`config.use_answer=False` for the document-only ablation).")
        if not has_placeholder(answer_expander.prompt, "document"):
            raise ValueError("`answer_expander.prompt` must contain '{document}' (use ANSWER_PROMPT): the answer is "
                             "written from the gold document.")
    if not isinstance(scorer, RewardScorer):
        raise TypeError(f"`scorer` must be a RewardScorer; got {type(scorer).__name__}.")
    scorer.threshold = float(config.threshold)

    out = Path(out_path)
    side = sidecar_paths(out)
    if overwrite:
        for p in (out, *side.values()):
            p.unlink(missing_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)

    selected = _select_queries(collection, query_ids)
    pairs = _read_jsonl_repairing(out)
    seen = _read_jsonl_repairing(side["seen"])
    done = {str(r["query_id"]) for r in pairs} | {str(r["query_id"]) for r in seen}
    todo = [q for q in selected if q not in done]
    if passages is not None:
        missing = [q for q in todo if q not in passages]
        if missing:
            raise ValueError(f"`passages`: no first-pass documents for {len(missing)} selected query id(s) "
                             f"(e.g. {missing[0]!r}).")
    _check_previous_config(side["stats"], config)
    logger.info("%s: %d of %d selected queries already recorded; %d to do.", out, len(selected) - len(todo),
                len(selected), len(todo))

    started = time.time()
    bar = tqdm(total=len(selected), initial=len(selected) - len(todo), desc="Pairs", unit="query",
               disable=not progress_bar)
    new_records = []
    with out.open("a", encoding="utf-8") as pair_file, side["seen"].open("a", encoding="utf-8") as seen_file:
        for start in range(0, len(todo), config.chunk_size):
            chunk = todo[start:start + config.chunk_size]
            for record, row in _process_chunk(chunk, collection, expander, answer_expander, scorer, config,
                                              passages):
                if row is not None:
                    append_jsonl(pair_file, row)  # the pair first: a kill between the two writes loses nothing
                    pairs.append(row)
                append_jsonl(seen_file, record)
                new_records.append(record)
            bar.update(len(chunk))
    bar.close()

    stats = _statistics(out, selected, pairs, seen + new_records, len(new_records), config,
                        time.time() - started)
    stats.stats_path = str(side["stats"])
    try:
        from expandr_haystack.evaluation.report import plot_pair_margins

        plot_pair_margins(stats, pairs, seen + new_records, side["plot"], config.threshold)
        stats.plot_path = str(side["plot"])
    except Exception as exc:  # noqa: BLE001 - a missing plotting backend must not lose the pairs
        logger.warning("Could not draw %s: %s", side["plot"], exc)
    atomic_write_json(side["stats"], stats.to_dict())  # a kill never leaves half a statistics file
    return stats


def _select_queries(collection: Collection, query_ids: Iterable[str] | None) -> list[str]:
    judged = [q for q in collection.queries if collection.relevant(q)]
    if query_ids is None:
        return judged
    if isinstance(query_ids, str):
        raise TypeError("`query_ids` must be a list of query ids, not one string.")
    wanted = [str(q) for q in query_ids]
    unknown = [q for q in wanted if q not in collection.queries]
    if unknown:
        raise ValueError(f"`query_ids`: {len(unknown)} id(s) are not judged queries of split {collection.split!r} "
                         f"(e.g. {unknown[0]!r}).")
    ok = set(judged)
    return list(dict.fromkeys(q for q in wanted if q in ok))


def _check_previous_config(stats_path: Path, config: PairConfig) -> None:
    if not stats_path.exists():
        return
    try:
        previous = json.loads(stats_path.read_text(encoding="utf-8")).get("config", {})
    except (OSError, json.JSONDecodeError):
        return
    now = config.to_dict()
    differing = sorted(k for k in now if k in previous and previous[k] != now[k])
    if differing:
        logger.warning("Resuming %s with different settings (%s) than the earlier run; pass overwrite=True "
                       "(--overwrite) to start afresh.", stats_path, ", ".join(differing))


def _process_chunk(chunk: Sequence[str], collection: Collection, expander, answer_expander, scorer, config,
                   passages: Mapping[str, Sequence[Any]] | None = None):
    queries = [collection.queries[q] for q in chunk]
    doc_ids = [collection.relevant(q)[0] for q in chunk]
    documents = [collection.document(d) for d in doc_ids]
    grounded = {"passages": [passages[q] for q in chunk]} if passages is not None else {}
    candidates = expander.expand(queries, n=config.n_candidates, temperatures=list(config.temperatures), **grounded)
    answers: list[str | None] | None = None
    if config.use_answer:
        answered = answer_expander.expand(queries, n=1, documents=[document_text(d) for d in documents])
        answers = [a[0] if a else None for a in answered]
    results: list[dict[str, Any] | None] = [None] * len(chunk)
    scorable = [k for k in range(len(chunk)) if answers is None or answers[k] is not None]
    if scorable:
        scored = scorer.score_many([candidates[k] for k in scorable], [documents[k] for k in scorable],
                                   None if answers is None else [answers[k] for k in scorable])
        for k, res in zip(scorable, scored):
            results[k] = res
    for k, qid in enumerate(chunk):
        res = results[k]
        record: dict[str, Any] = {"query_id": qid, "document_id": doc_ids[k], "n_candidates": len(candidates[k]),
                                  "n_distinct": len({c.strip() for c in candidates[k]})}
        row = None
        if res is None:
            record.update(kept=False, reason=REASON_NO_ANSWER, best_score=None, margin=None)
        else:
            record.update(kept=res["kept"], reason=res["reason"],
                          best_score=None if not math.isfinite(res["best_score"]) else res["best_score"])
            if res["kept"]:
                messages = expander.prompt_messages([queries[k]],
                                                    passages=None if passages is None else [passages[qid]])[0]
                row = pair_row(qid, messages, res, doc_ids[k])
                record["margin"] = row["rewards"]["margin"]
            else:
                record["margin"] = None
        yield record, row


def _histogram(values: list[float], low: float, high: float, bins: int = 20) -> dict[str, list[float]]:
    import numpy as np

    if not values:
        return {"edges": [], "counts": []}
    high = max(high, max(values))
    low = min(low, min(values))
    counts, edges = np.histogram(values, bins=bins, range=(low, high))
    return {"edges": [round(float(e), 6) for e in edges], "counts": [int(c) for c in counts]}


def _statistics(out: Path, selected: list[str], pairs: list[dict], records: list[dict], new: int,
                config: PairConfig, seconds: float) -> PairStats:
    by_query: dict[str, dict[str, Any]] = {str(r["query_id"]): r for r in records}
    for p in pairs:  # a pair written just before a kill may lack its `seen` record
        by_query.setdefault(str(p["query_id"]), {"query_id": p["query_id"], "kept": True, "reason": REASON_KEPT,
                                                 "margin": p["rewards"]["margin"],
                                                 "best_score": p["rewards"].get("best_score")})
    dropped = {r: 0 for r in REASONS if r != REASON_KEPT}
    for r in by_query.values():
        if not r.get("kept"):
            dropped[r.get("reason", "unknown")] = dropped.get(r.get("reason", "unknown"), 0) + 1
    margins = [float(p["rewards"]["margin"]) for p in pairs]
    best = [float(r["best_score"]) for r in by_query.values() if r.get("best_score") is not None]
    seen = len(by_query)
    return PairStats(
        out_path=str(out), queries_selected=len(selected), queries_seen=seen, queries_new=new, kept=len(pairs),
        dropped=dropped, kept_fraction=len(pairs) / seen if seen else 0.0,
        margin_mean=sum(margins) / len(margins) if margins else None,
        margin_histogram=_histogram(margins, 0.0, 2.0 if config.use_answer else 1.0),
        best_score_histogram=_histogram(best, 0.0, 2.0 if config.use_answer else 1.0),
        seconds=round(seconds, 2), config=config.to_dict())


__all__ = ["REASONS", "REASON_NO_ANSWER", "PairConfig", "PairStats", "build_pairs", "make_components", "pair_row",
           "sidecar_paths"]
