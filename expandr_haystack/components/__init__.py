"""The ExpandR components, one a file: expander, embedder (fused query), document embedder (indexing, any encoder
backend), retriever, reward scorer, and the local LLM as a Haystack ChatGenerator (for Haystack's own components,
e.g. the `haystack_multiquery` baseline's QueryExpander).

They are thin Haystack shells: the method's equations live in `expandr_haystack.core`, the generation engines in
`expandr_haystack.generation`.
"""

from expandr_haystack.components.chat_generator import LocalChatGenerator
from expandr_haystack.components.document_embedder import ExpandRDocumentEmbedder
from expandr_haystack.components.embedder import ExpandRQueryEmbedder
from expandr_haystack.components.expander import LLMQueryExpander
from expandr_haystack.components.retriever import ExpandRRetriever
from expandr_haystack.components.reward import RewardScorer

__all__ = ["ExpandRDocumentEmbedder", "ExpandRQueryEmbedder", "ExpandRRetriever", "LLMQueryExpander",
           "LocalChatGenerator", "RewardScorer"]
