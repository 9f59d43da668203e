"""
Text rules of ExpandR, written once: the prompts, the chat messages of a query (the same for inference and for the
DPO pairs), output cleaning, query checks, and the text a document is embedded as.
"""

from __future__ import annotations

import re
from typing import Any

#: The ExpandR query-to-document prompt (paper, q2d).
EXPANSION_PROMPT = "Please write a passage to answer the question.\nQuestion: {query}\nPassage:"
#: The ExpandR query-to-answer prompt used for the reward's self-consistency term (paper, q2a): sees the gold document.
ANSWER_PROMPT = (
    "Answer the question directly using the passage.\nPassage: {document}\nQuestion: {query}\nAnswer:"
)

#: Grounded q2d (beyond the paper): the top hits of a first dense pass, then the q2d instruction. The expander fills
#: `{passages}` with `format_passages` of the documents it is given.
GROUNDED_PROMPT = (
    "Passages:\n{passages}\n\nUsing the passages above where they are relevant, please write a passage to answer "
    "the question.\nQuestion: {query}\nPassage:"
)

_PREAMBLE = re.compile(
    r"^\s*(?:(?:sure|certainly|of course|okay|ok|absolutely|great)\b[!,.]*\s*)?"
    r"(?:(?:i(?:'d| would| am|'m) (?:be )?(?:happy|glad|here) to help|i can help)[^.!:\n]{0,60}[.!:]\s*)?"
    r"(?:here(?:'s| is| are)\b[^:\n]{0,100}[:.]\s*)?"
    r"(?:(?:passage|answer|response)\s*:\s*)?",
    re.IGNORECASE,
)
_QUOTES = "\"'“”‘’`"


def format_passages(documents: Any, k: int = 3, words: int = 50) -> str:
    """
    The `{passages}` block of a grounded prompt: the first `k` documents, each as ``[i] title. text`` cut to `words`
    words (documents are Haystack Documents, `title` from `meta`, or plain strings).
    """
    lines = []
    for i, document in enumerate(list(documents)[:k], start=1):
        if isinstance(document, str):
            text = document
        else:
            title = str((document.meta or {}).get("title") or "").strip().rstrip(".").strip()
            text = f"{title}. {document.content or ''}" if title else (document.content or "")
        lines.append(f"[{i}] " + " ".join(clean_text(text).split()[:words]))
    return "\n".join(lines)


#: A placeholder of a prompt: Haystack's Jinja ``{{ name }}`` (spaces optional) or this package's ``{name}``.
_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}|\{(\w+)\}")


def has_placeholder(prompt: str, name: str) -> bool:
    """Whether `prompt` holds the placeholder `name`, as ``{name}`` or as Jinja's ``{{ name }}``."""
    return any((m.group(1) or m.group(2)) == name for m in _PLACEHOLDER.finditer(prompt))


def render_prompt(prompt: str, query: str, document: str | None = None, **fields: str) -> str:
    """
    The user turn: `prompt` with `{query}` (and `{document}`, and any other `{name}` in `fields`) filled in. Each
    placeholder may also be written as Haystack's Jinja ``{{ query }}`` (spaces optional); both forms are filled in
    one pass, so text inside a value (a query that contains "{document}") is never substituted again. Other braces
    are left as they are.
    """
    values = {"query": query, "document": document or "", **fields}

    def fill(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        return values[name] if name in values else match.group(0)

    return _PLACEHOLDER.sub(fill, prompt)


def chat_messages(prompt: str, query: str, system_prompt: str | None = None, document: str | None = None,
                  **fields: str) -> list[dict[str, str]]:
    """
    The chat messages sent for one query: an optional system turn, then the rendered prompt as the user turn.

    The expander templates exactly these messages, and a DPO pair's ``prompt`` column is exactly these messages, so
    the policy DPO trains is the one inference samples.
    """
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": render_prompt(prompt, query, document, **fields)}]


def clean_generation(text: str, query: str | None = None) -> str:
    """
    Strip chat preambles ("Sure! Here is a passage:"), labels ("Passage:"), an echoed prompt, quotes and whitespace.

    :returns: The cleaned text; may be "" when nothing but boilerplate was generated.
    """
    text = text.replace("\r", "").strip()
    lines = [ln for ln in text.split("\n") if not re.match(r"^\s*(question|please write a passage)\b", ln, re.IGNORECASE)]
    text = "\n".join(lines).strip()
    if query and text.lower().startswith(query.strip().lower()):
        rest = text[len(query.strip()):].lstrip(" :.-\n")
        # a statement query (a SciFact claim) is often restated verbatim as the whole "passage": keep that
        # restatement (it fuses to the query itself) rather than returning "" and failing the row
        text = rest if _strip_boilerplate(rest) else text
    return _strip_boilerplate(text)


def _strip_boilerplate(text: str) -> str:
    for _ in range(2):
        text = _PREAMBLE.sub("", text, count=1).strip()
    if len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
        text = text[1:-1].strip()
    return re.sub(r"[ \t]+", " ", re.sub(r"\n{3,}", "\n\n", text)).strip()


def clean_text(text: str) -> str:
    """Drop control characters (except tab/newline: they carry nothing for retrieval) and replace lone surrogates
    (invalid unicode, which tokenizers reject) with '?'."""
    cleaned = "".join(ch for ch in text if ch in "\t\n" or (ord(ch) >= 32 and ord(ch) != 127))
    return cleaned.encode("utf-8", errors="replace").decode("utf-8")


def check_query(query: Any, argument: str = "query") -> str:
    """A query as every component accepts it: a non-blank str, control characters dropped, invalid unicode
    replaced. Errors name `argument`."""
    if not isinstance(query, str):
        raise TypeError(f"`{argument}` must be a str; got {type(query).__name__} ({query!r:.80}).")
    if not query.strip():
        raise ValueError(f"`{argument}` must be a non-empty string; got {query!r}.")
    cleaned = clean_text(query)
    if not cleaned.strip():
        raise ValueError(f"`{argument}` contains only control characters; got {query!r:.80}.")
    return cleaned


def check_expansions(expansions: Any, argument: str = "expansions") -> list[str]:
    """A list of strings (blank ones are kept here and ignored by the fusion). Errors name `argument`."""
    if isinstance(expansions, str) or not isinstance(expansions, (list, tuple)):
        raise TypeError(f"`{argument}` must be a list of strings; got {type(expansions).__name__}.")
    for j, e in enumerate(expansions):
        if not isinstance(e, str):
            raise TypeError(f"`{argument}[{j}]` must be a string; got {type(e).__name__} ({e!r:.60}).")
    return list(expansions)


def document_text(document: Any) -> str:
    """
    The text the retriever's index embeds for a document: ``title + "\\n" + content`` when `meta` has a title (as
    `SentenceTransformersDocumentEmbedder(meta_fields_to_embed=["title"])` with its "\\n" separator), else content.
    A str is returned as it is.
    """
    if isinstance(document, str):
        return document
    title = (document.meta or {}).get("title")
    parts = ([str(title)] if title is not None else []) + [document.content or ""]
    return "\n".join(parts)


__all__ = [
    "ANSWER_PROMPT",
    "EXPANSION_PROMPT",
    "GROUNDED_PROMPT",
    "chat_messages",
    "check_expansions",
    "check_query",
    "clean_generation",
    "clean_text",
    "document_text",
    "format_passages",
    "has_placeholder",
    "render_prompt",
]
