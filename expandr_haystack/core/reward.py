"""
The ExpandR reward and the choice of a DPO pair (pure functions; `RewardScorer` and training both use them).

    reward(e) = 1 / rank_doc(e) + 1 / rank_answer(e)

rank_doc ranks the candidate expansions by cosine similarity to the gold document, rank_answer by cosine similarity
to the LLM's answer written from that document; a query is dropped when max_e (cos_doc + cos_answer) < threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

#: Why a candidate set gave no pair (`PairChoice.reason`).
REASON_KEPT = "kept"
REASON_FEW_DISTINCT = "fewer_than_two_distinct"
REASON_BELOW_THRESHOLD = "below_threshold"


def competition_ranks(similarities: Sequence[float]) -> list[int]:
    """
    Ranks by similarity, most similar first (rank 1), with "competition" ties: equal values share the best rank and
    the next distinct value skips ahead (``[0.9, 0.5, 0.9] -> [1, 3, 1]``), as ``scipy.stats.rankdata(-x, "min")``.
    """
    values = [float(v) for v in similarities]
    return [1 + sum(1 for w in values if w > v) for v in values]


def expandr_reward(document_similarities: Sequence[float],
                   answer_similarities: Sequence[float] | None = None) -> list[float]:
    """
    The ExpandR reward of each candidate expansion e:

        reward(e) = 1 / rank_doc(e) + 1 / rank_answer(e)

    where rank_doc ranks the candidates by cosine similarity to the gold document and rank_answer by cosine
    similarity to the LLM's answer (the self-consistency term); rank 1 = most similar, ties share the best rank
    (`competition_ranks`). Without answer similarities (None) the reward is the document term alone: an ablation,
    not the paper's reward.

    :param document_similarities: cos(e, document) per candidate.
    :param answer_similarities: cos(e, answer) per candidate, or None.
    :returns: One reward per candidate, in candidate order.
    """
    doc_ranks = competition_ranks(document_similarities)
    rewards = [1.0 / r for r in doc_ranks]
    if answer_similarities is not None:
        if len(answer_similarities) != len(doc_ranks):
            raise ValueError(f"`answer_similarities` must have one value per candidate ({len(doc_ranks)}); "
                             f"got {len(answer_similarities)}.")
        rewards = [r + 1.0 / a for r, a in zip(rewards, competition_ranks(answer_similarities))]
    return rewards


class PairChoice(NamedTuple):
    """The outcome of `select_pair`: candidate indices (None when dropped), `kept`, and the reason."""

    chosen: int | None
    rejected: int | None
    kept: bool
    reason: str
    best_score: float  # max over candidates of cos_doc (+ cos_answer): what the threshold is compared with


def select_pair(
    rewards: Sequence[float],
    document_similarities: Sequence[float],
    answer_similarities: Sequence[float] | None = None,
    expansions: Sequence[str] | None = None,
    threshold: float = 0.6,
) -> PairChoice:
    """
    Choose the DPO pair from scored candidates.

    - The pair is dropped (`kept=False`, chosen/rejected None) when fewer than two distinct expansions exist
      (distinct = different text after stripping whitespace; without `expansions` every candidate counts as
      distinct), or when max_e (cos_doc(e) + cos_answer(e)) < `threshold` (without answer similarities:
      max_e cos_doc(e) < `threshold`).
    - chosen = the highest reward; ties go to the higher summed cosine, then to the earlier candidate.
    - rejected = the lowest reward among the candidates whose text differs from the chosen one; ties go to the lower
      summed cosine, then to the later candidate. So chosen != rejected, as indices and as texts.

    :returns: A `PairChoice`.
    """
    n = len(rewards)
    if len(document_similarities) != n or (answer_similarities is not None and len(answer_similarities) != n):
        raise ValueError("`rewards`, `document_similarities` and `answer_similarities` must have the same length.")
    if expansions is not None and len(expansions) != n:
        raise ValueError(f"`expansions` must have one text per candidate ({n}); got {len(expansions)}.")
    texts = [e.strip() for e in expansions] if expansions is not None else list(range(n))
    summed = [float(d) + (float(answer_similarities[i]) if answer_similarities is not None else 0.0)
              for i, d in enumerate(document_similarities)]
    best_score = max(summed) if summed else float("-inf")
    if len(set(texts)) < 2:
        return PairChoice(None, None, False, REASON_FEW_DISTINCT, best_score)
    if best_score < threshold:
        return PairChoice(None, None, False, REASON_BELOW_THRESHOLD, best_score)
    chosen = max(range(n), key=lambda i: (rewards[i], summed[i], -i))
    others = [i for i in range(n) if texts[i] != texts[chosen]]
    rejected = min(others, key=lambda i: (rewards[i], summed[i], -i))
    return PairChoice(chosen, rejected, True, REASON_KEPT, best_score)

REASONS = (REASON_KEPT, REASON_FEW_DISTINCT, REASON_BELOW_THRESHOLD)

__all__ = ["REASONS", "REASON_BELOW_THRESHOLD", "REASON_FEW_DISTINCT", "REASON_KEPT", "PairChoice", "competition_ranks",
           "expandr_reward", "select_pair"]
