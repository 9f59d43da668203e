"""
The ExpandR method as pure functions, imported by the components (inference) and by training alike:

- `text`: the prompts, the chat messages of a query, output cleaning and query checks;
- `fusion`: the fused query vector w·q̂ + (1-w)·mean(ê);
- `reward`: ranks, the reward 1/rank_doc + 1/rank_answer, and the choice of a DPO pair.

Nothing here loads a model or touches Haystack's component machinery.
"""

from expandr_haystack.core.fusion import fuse, unit
from expandr_haystack.core.reward import PairChoice, competition_ranks, expandr_reward, select_pair
from expandr_haystack.core.text import (
    ANSWER_PROMPT,
    EXPANSION_PROMPT,
    GROUNDED_PROMPT,
    chat_messages,
    check_query,
    clean_generation,
    clean_text,
    document_text,
    format_passages,
)

__all__ = [
    "ANSWER_PROMPT",
    "EXPANSION_PROMPT",
    "GROUNDED_PROMPT",
    "PairChoice",
    "chat_messages",
    "check_query",
    "clean_generation",
    "clean_text",
    "competition_ranks",
    "document_text",
    "expandr_reward",
    "format_passages",
    "fuse",
    "select_pair",
    "unit",
]
