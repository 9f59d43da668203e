"""
expandr-haystack: ExpandR (LLM query expansion trained jointly with a dense retriever) as Haystack components.

Importing this package adds `expandr_haystack` (and nothing else) to Haystack's deserialization allow-list, so YAML
pipelines naming our components load with `Pipeline.loads` while every other module stays refused.
"""

from haystack.core.serialization import allow_deserialization_module

from expandr_haystack.components import (
    ExpandRDocumentEmbedder,
    ExpandRQueryEmbedder,
    ExpandRRetriever,
    LLMQueryExpander,
    LocalChatGenerator,
    RewardScorer,
)
from expandr_haystack.core import ANSWER_PROMPT, EXPANSION_PROMPT, GROUNDED_PROMPT, fuse

allow_deserialization_module("expandr_haystack")

# The one place the version is written: pyproject.toml reads it ([tool.setuptools.dynamic]), `expandr --version`
# prints it.
__version__ = "0.1.0"
__all__ = [
    "ANSWER_PROMPT",
    "EXPANSION_PROMPT",
    "GROUNDED_PROMPT",
    "ExpandRDocumentEmbedder",
    "ExpandRQueryEmbedder",
    "ExpandRRetriever",
    "LLMQueryExpander",
    "LocalChatGenerator",
    "RewardScorer",
    "__version__",
    "fuse",
]
