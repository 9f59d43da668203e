"""RewardScorer: the ExpandR reward for candidate expansions, and the choice of a DPO (chosen, rejected) pair."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from haystack import Document, component, default_from_dict, default_to_dict
from haystack.utils import ComponentDevice

from expandr_haystack.checks import check_number
from expandr_haystack.components.embedder import ExpandRQueryEmbedder
from expandr_haystack.core.reward import expandr_reward, select_pair
from expandr_haystack.core.text import check_expansions, check_query, document_text
from expandr_haystack.options import EncoderOptions, fold_legacy

logger = logging.getLogger(__name__)


def _check_expansions(expansions: Any, argument: str = "expansions", allow_empty: bool = False) -> list[str]:
    """The candidates of one item: `check_expansions` (a list of strings), and none blank; at least one unless
    `allow_empty` (`score_many`: an empty item gives kept=False)."""
    expansions = check_expansions(expansions, argument)
    for j, e in enumerate(expansions):
        if not e.strip():
            raise ValueError(f"`{argument}[{j}]` is empty: an expansion must be a non-empty string.")
    if not expansions and not allow_empty:
        raise ValueError(f"`{argument}` is empty: pass the candidate expansions to score (at least one).")
    return expansions


def _check_document(document: Any, argument: str = "document") -> str:
    if document is None:
        raise ValueError(f"`{argument}` is missing: the reward needs the gold document (a Document or a string).")
    if not isinstance(document, (Document, str)):
        raise TypeError(f"`{argument}` must be a haystack Document or a str; got {type(document).__name__}.")
    if isinstance(document, Document) and not (document.content or "").strip():
        raise ValueError(f"`{argument}` (Document {document.id!r}) has no text content.")
    text = document_text(document)
    if not text.strip():
        raise ValueError(f"`{argument}` must be a non-empty text.")
    return text


def _check_answer(answer: Any, argument: str = "answer") -> str | None:
    if answer is None:
        return None
    if not isinstance(answer, str):
        raise TypeError(f"`{argument}` must be a str or None; got {type(answer).__name__}.")
    if not answer.strip():
        raise ValueError(f"`{argument}` is empty; pass None for the document-only reward (ablation).")
    return answer


@component
class RewardScorer:
    """
    Scores candidate expansions of a query with the ExpandR reward and picks a DPO (chosen, rejected) pair.

    reward(e) = 1/rank_doc(e) + 1/rank_answer(e): the candidates are ranked by cosine similarity to the gold document
    and, separately, to the LLM's answer to the query given that document (the q2a self-consistency term); rank 1 =
    most similar, equal similarities share the best rank. The embeddings come from the retriever's encoder through
    `ExpandRQueryEmbedder.encode` (L2-normalised, so cosine = dot product); a `Document` is embedded as
    ``document_prefix + title + "\\n" + content + document_suffix``, the same text the indexing pipeline embeds, and
    each expansion as ``prefix + expansion + suffix``, as the query embedder embeds it (prefixes are empty by
    default; set them for E5/BGE-style encoders).

    The encoder is an `ExpandRQueryEmbedder`: built from `model`, `device` and `encoder` (an `EncoderOptions`), or
    passed ready as `embedder=` to share one with a retriever or the training code (its prefixes are not used: this
    component puts each side's prefix itself).

    - `kept` is False (and `chosen`/`rejected` None) when fewer than two distinct expansions exist or when
      max_e (cos_doc(e) + cos_answer(e)) < `threshold`.
    - `chosen` has the highest reward (ties: higher summed cosine, then the earlier candidate); `rejected` the lowest
      among texts different from `chosen` (ties: lower summed cosine, then the later candidate).
    - Without `answer` the reward is the document term alone and the threshold applies to max_e cos_doc(e). This is
      an ablation of the paper's reward (which always uses the answer term), useful when no answer LLM is available.

    Inputs are checked once, at the edge (`run`, `score_many`); the scoring below trusts them.

    Usage:
    ```python
    from haystack import Document
    from expandr_haystack import RewardScorer

    scorer = RewardScorer(threshold=0.6)
    scorer.warm_up()
    out = scorer.run(query="what is the lift of a thin wing ?",
                     expansions=["The lift of a thin wing is ...", "Wings are ...", "Aircraft ..."],
                     document=Document(content="...", meta={"title": "..."}),
                     answer="The lift coefficient of a thin wing is 2 pi alpha.")
    out["chosen"], out["rejected"], out["rewards"], out["kept"]
    ```
    """

    def __init__(
        self,
        model: str | None = None,
        threshold: float = 0.6,
        device: ComponentDevice | None = None,
        encoder: EncoderOptions | dict[str, Any] | None = None,
        *,
        embedder: ExpandRQueryEmbedder | None = None,
        prefix: str = "",
        suffix: str = "",
        document_prefix: str = "",
        document_suffix: str = "",
    ):
        """
        :param model: The retriever's encoder: None for the bundled all-MiniLM-L6-v2, or a sentence-transformers id
            or local directory (e.g. a trained encoder). Not with `embedder`.
        :param threshold: Minimum of max_e (cos_doc + cos_answer) (or max_e cos_doc without answer) to keep a pair:
            at most 2, the largest sum of two cosines (without answer only 1 can be reached); -2 or less keeps every
            pair of two distinct expansions.
        :param device: Device for the encoder (None = best available). Not with `embedder`.
        :param encoder: How the encoder is loaded and run (`EncoderOptions`, a dict of its fields, or None for the
            defaults), as `ExpandRQueryEmbedder`'s; the reward compares cosines, so there is no output precision or
            normalisation to choose. Not with `embedder`.
        :param embedder: A ready `ExpandRQueryEmbedder` to encode with, shared with other components (no second
            encoder is built); serialised nested. None = build one from `model`, `device` and `encoder`.
        :param prefix: Put before each expansion: the query embedder's expansion prefix (its `expansion_prefix`, by
            default its query `prefix`, e.g. "query: " for E5), so the reward sees expansions as retrieval does.
        :param suffix: Put after each expansion.
        :param document_prefix: Put before the gold document and the answer: the indexing side's prefix (e.g.
            "passage: " for E5, as given to `SentenceTransformersDocumentEmbedder(prefix=...)`). The answer is
            scored as the document is (both are what an expansion should be close to).
        :param document_suffix: Put after the gold document and the answer.
        """
        check_number(threshold, "threshold", high=2.0)  # a sum of two cosines (one without answer); low: keep all
        for name, value in (("prefix", prefix), ("suffix", suffix), ("document_prefix", document_prefix),
                            ("document_suffix", document_suffix)):
            if not isinstance(value, str):
                raise TypeError(f"`{name}` must be a str; got {type(value).__name__}.")
        if embedder is not None:
            if not isinstance(embedder, ExpandRQueryEmbedder):
                raise TypeError(f"`embedder` must be an ExpandRQueryEmbedder or None; got {type(embedder).__name__}.")
            both = [name for name, value in (("model", model), ("device", device), ("encoder", encoder))
                    if value is not None]
            if both:
                raise ValueError(f"Both `embedder` and {', '.join(f'`{n}`' for n in both)} are set: the shared "
                                 f"embedder brings its own model, device and encoder options; pass one of them.")
        self.threshold = float(threshold)
        self.prefix = prefix
        self.suffix = suffix
        self.document_prefix = document_prefix
        self.document_suffix = document_suffix
        #: The `embedder` passed in (serialised nested), or None when this component built its own.
        self.embedder = embedder
        # the one embedding path of the package (validates `model` and the options; loads nothing until warm_up);
        # it embeds texts as given (prefix="" at each call): this component adds each side's prefix itself
        self._embedder = embedder or ExpandRQueryEmbedder(model=model, device=device, encoder=encoder)
        # the settings in effect (those of a shared embedder when one was passed)
        self.model = self._embedder.model
        self.device = self._embedder.device  # None = best available, resolved at warm_up (keeps YAML portable)
        self.encoder_options = self._embedder.encoder_options

    def to_dict(self) -> dict[str, Any]:
        """Serialize to a dictionary: the shared `embedder` nested when one was passed, else `model`, `device` and
        the `encoder` group (its token as the environment variable names: a plain token is refused)."""
        own = self.embedder is None
        return default_to_dict(
            self, model=self.model if own else None, threshold=self.threshold, device=self.device if own else None,
            encoder=self.encoder_options if own else None, embedder=self.embedder, prefix=self.prefix,
            suffix=self.suffix, document_prefix=self.document_prefix, document_suffix=self.document_suffix)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RewardScorer:
        """Deserialize from a dictionary made by `to_dict` (the input is not modified). Dictionaries saved by earlier
        versions, with the encoder options as flat keys (`batch_size`, `token`, `backend`, ...), load with the same
        settings: the flat keys are folded into `encoder`."""
        params = fold_legacy(dict(data.get("init_parameters", {})), "encoder", EncoderOptions, cls.__name__)
        return default_from_dict(cls, {**data, "init_parameters": params})

    def warm_up(self) -> None:
        """Load the encoder (shared with an expander/retriever naming the same model); idempotent."""
        self._embedder.warm_up()

    @component.output_types(rewards=list[float], chosen=str | None, rejected=str | None, kept=bool,
                            document_similarities=list[float], answer_similarities=list[float])
    def run(self, query: str, expansions: list[str], document: Document | str,
            answer: str | None = None) -> dict[str, Any]:
        """
        Score the candidate expansions of one query.

        :param query: The query (checked; the reward itself compares expansions with the document and answer).
        :param expansions: The candidate expansions (at least one; fewer than two distinct ones give kept=False).
        :param document: The gold (relevant) document, a `Document` or its text.
        :param answer: The LLM's answer to the query given the document; None = document-only reward (ablation).
        :returns: `rewards` (one per expansion), `chosen`/`rejected` (texts, None when not kept), `kept`,
            `document_similarities` and `answer_similarities` (cosines; the latter empty without answer).
        """
        check_query(query)
        item = (_check_expansions(expansions), _check_document(document), _check_answer(answer))
        return self._public(self._score_items([item])[0])

    def score_many(
        self,
        expansions: Sequence[Sequence[str]],
        documents: Sequence[Document | str],
        answers: Sequence[str | None] | None = None,
    ) -> list[dict[str, Any]]:
        """
        Batched `run` for training: one `encode` call for every distinct text of all items.

        :param expansions: For each item its candidate expansions (an empty list gives kept=False).
        :param documents: For each item its gold document.
        :param answers: For each item its answer (or None for that item); None = no answers (ablation).
        :returns: For each item the dict `run` returns, plus `chosen_index`, `rejected_index`, `reason`
            ("kept", "fewer_than_two_distinct" or "below_threshold") and `best_score`.
        """
        if isinstance(expansions, str) or not isinstance(expansions, Sequence):
            raise TypeError(f"`expansions` must be a list of lists of strings; got {type(expansions).__name__}.")
        if isinstance(documents, (str, Document)) or not isinstance(documents, Sequence):
            raise TypeError(f"`documents` must be a list (one document per item); got {type(documents).__name__}.")
        if len(documents) != len(expansions):
            raise ValueError(f"`documents` must have one entry per item ({len(expansions)}); got {len(documents)}.")
        if answers is not None and (isinstance(answers, str) or len(answers) != len(expansions)):
            raise ValueError(f"`answers` must be a list with one entry per item ({len(expansions)}).")
        items = [(_check_expansions(exps, f"expansions[{k}]", allow_empty=True),
                  _check_document(documents[k], f"documents[{k}]"),
                  None if answers is None else _check_answer(answers[k], f"answers[{k}]"))
                 for k, exps in enumerate(expansions)]
        return self._score_items(items)

    def _score_items(self, items: list[tuple[list[str], str, str | None]]) -> list[dict[str, Any]]:
        """The results for (expansions, document text, answer or None) items. Inputs trusted: checked by the caller
        (`run` / `score_many`)."""

        # every distinct text once, as the encoder sees it: expansions with the query side's prefix, the document
        # and the answer with the indexing side's
        def as_target(text: str) -> str:
            return f"{self.document_prefix}{text}{self.document_suffix}"

        def as_expansion(text: str) -> str:
            return f"{self.prefix}{text}{self.suffix}"

        unique: dict[str, int] = {}
        for exps, doc, ans in items:
            for text in [as_target(doc), *([as_target(ans)] if ans is not None else []), *map(as_expansion, exps)]:
                unique.setdefault(text, len(unique))
        emb = (self._embedder.encode(list(unique), prefix="", suffix="") if unique
               else np.zeros((0, 1), dtype=np.float32))

        results = []
        for exps, doc, ans in items:
            e = (emb[[unique[as_expansion(t)] for t in exps]] if exps
                 else np.zeros((0, emb.shape[1]), dtype=np.float32))
            doc_sims = [float(x) for x in e @ emb[unique[as_target(doc)]]]
            ans_sims = [float(x) for x in e @ emb[unique[as_target(ans)]]] if ans is not None else None
            rewards = expandr_reward(doc_sims, ans_sims)
            choice = select_pair(rewards, doc_sims, ans_sims, exps, self.threshold)
            results.append({
                "rewards": rewards,
                "chosen": exps[choice.chosen] if choice.kept else None,
                "rejected": exps[choice.rejected] if choice.kept else None,
                "kept": choice.kept,
                "document_similarities": doc_sims,
                "answer_similarities": ans_sims if ans_sims is not None else [],
                "chosen_index": choice.chosen,
                "rejected_index": choice.rejected,
                "reason": choice.reason,
                "best_score": choice.best_score,
            })
        return results

    @staticmethod
    def _public(result: dict[str, Any]) -> dict[str, Any]:
        return {k: result[k] for k in ("rewards", "chosen", "rejected", "kept", "document_similarities",
                                       "answer_similarities")}


__all__ = ["RewardScorer"]
