"""The ExpandR components, one a file: expander, embedder (fused query), retriever, reward scorer.

They are thin Haystack shells: the method's equations live in `expandr_haystack.core`, the generation engines in
`expandr_haystack.generation`.
"""

from expandr_haystack.components.embedder import ExpandRQueryEmbedder
from expandr_haystack.components.expander import LLMQueryExpander
from expandr_haystack.components.retriever import ExpandRRetriever
from expandr_haystack.components.reward import RewardScorer

__all__ = ["ExpandRQueryEmbedder", "ExpandRRetriever", "LLMQueryExpander", "RewardScorer"]
