"""The ExpandR components, one a file: expander, embedder (fused query), retriever."""

from expandr_haystack.components.embedder import ExpandRQueryEmbedder, fuse
from expandr_haystack.components.expander import ANSWER_PROMPT, EXPANSION_PROMPT, LLMQueryExpander
from expandr_haystack.components.retriever import ExpandRRetriever
from expandr_haystack.components.reward import RewardScorer

__all__ = [
           "ANSWER_PROMPT",
           "EXPANSION_PROMPT",
           "ExpandRQueryEmbedder",
           "ExpandRRetriever",
           "LLMQueryExpander",
           "RewardScorer",
           "fuse",
]
