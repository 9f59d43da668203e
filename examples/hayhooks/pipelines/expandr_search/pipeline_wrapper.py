"""
Hayhooks PipelineWrapper: ExpandR search over pgvector at `POST /expandr_search/run`.

Hayhooks deploys this folder (its name is the pipeline's name) when `hayhooks run --pipelines-dir` points at the
folder above it. `setup` loads `expandr_search.yml` next to this file with Haystack's loader and warms the models up,
so the first request does not pay for loading them. Importing `expandr_haystack` here adds our module (only) to
Haystack's deserialization allow-list, so this route needs no HAYSTACK_DESERIALIZATION_ALLOWLIST setting.

Environment:
- PG_CONN_STR (required): the PostgreSQL + pgvector connection string (the table is filled by ../../index.py).
- EXPANDR_CACHE_DIR: the folder of the expansion cache (expansions.sqlite; created when missing). Default:
  `expandr_cache` in the server's working directory, as the YAML says. A query asked again costs no LLM call.
- EXPANDR_MAX_NEW_TOKENS: the expansion's length in tokens (default: the YAML's 64). Generation dominates the cost of
  an uncached query: about 30 tokens/s on 2 CPU cores at batch 1, so 64 tokens ~ 2 s.

Request body: `{"query": "...", "top_k": 5, "filters": {...}}` (`top_k`, 1..100, and Haystack `filters` optional).
Response: `{"result": {"query", "expansions", "failures", "documents": [{"id", "content", "score", "meta"}]}}`.
An empty or blank query, a bad `top_k` or malformed `filters` answer 422 with the reason in `detail`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from hayhooks import BasePipelineWrapper
from haystack import Document, Pipeline
from haystack.core.errors import PipelineRuntimeError
from haystack.errors import FilterError
from haystack.utils.filters import document_matches_filter
from pydantic import BaseModel

import expandr_haystack  # noqa: F401 - adds `expandr_haystack` (only) to Haystack's deserialization allow-list
from expandr_haystack.core.text import check_query

PIPELINE_YAML = Path(__file__).resolve().with_name("expandr_search.yml")
CACHE_DIR_ENV = "EXPANDR_CACHE_DIR"
MAX_NEW_TOKENS_ENV = "EXPANDR_MAX_NEW_TOKENS"
MAX_TOP_K = 100


class Hit(BaseModel):
    """One retrieved document."""

    id: str
    content: str | None
    score: float | None
    meta: dict[str, Any]


class SearchResult(BaseModel):
    """The query as searched, its LLM expansion(s), any expansion failure, and the documents, best first."""

    query: str
    expansions: list[str]
    failures: list[str]
    documents: list[Hit]


def load_pipeline(yaml_path: Path = PIPELINE_YAML) -> Pipeline:
    """The search pipeline of `yaml_path`, with the cache folder and expansion length the environment sets."""
    if not os.environ.get("PG_CONN_STR"):
        raise RuntimeError("PG_CONN_STR is not set: the ExpandR search pipeline reads its pgvector table through it "
                           "(e.g. postgresql://postgres@127.0.0.1:5433/postgres; examples/hayhooks/README.md).")
    pipeline = Pipeline.loads(yaml_path.read_text())
    expander = pipeline.get_component("expander")
    cache_dir = os.environ.get(CACHE_DIR_ENV)
    if cache_dir:
        expander.cache = str(Path(cache_dir) / "expansions.sqlite")
    max_new_tokens = os.environ.get(MAX_NEW_TOKENS_ENV)
    if max_new_tokens:
        try:
            expander.generation = expander.generation.replace(max_new_tokens=int(max_new_tokens))
        except ValueError:
            raise ValueError(f"{MAX_NEW_TOKENS_ENV} must be a whole number of tokens >= 1; got "
                             f"{max_new_tokens!r}.") from None
    return pipeline


def bad_request(message: str) -> HTTPException:
    return HTTPException(status_code=422, detail=message)


class PipelineWrapper(BasePipelineWrapper):
    def setup(self) -> None:
        self.pipeline = load_pipeline()
        self.pipeline.warm_up()  # the LLM and the encoder load now, not on the first request

    async def run_api_async(self, query: str, top_k: int | None = None,
                            filters: dict[str, Any] | None = None) -> SearchResult:
        """
        Search the Cranfield collection with ExpandR query expansion.

        An LLM writes a passage answering the query; the query and the passage together retrieve the documents (one
        pgvector search with their fused vector). Awaited on the server's event loop: the LLM and the encoder run in
        worker threads, the store is queried through its async connection.

        :param query: The search query (not empty).
        :param top_k: How many documents to return (1 to 100; default 5).
        :param filters: Haystack metadata filters, e.g. {"field": "meta.title", "operator": "==", "value": "..."}.
        """
        try:
            query = check_query(query)
        except (TypeError, ValueError) as error:
            raise bad_request(str(error)) from None
        if top_k is not None and not 1 <= top_k <= MAX_TOP_K:
            raise bad_request(f"`top_k` must be between 1 and {MAX_TOP_K}; got {top_k}.")
        if filters is not None:  # checked before the LLM runs: a malformed filter costs no generation
            try:
                document_matches_filter(filters, Document(content=""))
            except FilterError as error:
                raise bad_request(f"`filters`: {error}") from None
        data: dict[str, Any] = {"expander": {"query": query}, "retriever": {"top_k": top_k, "filters": filters}}
        try:
            result = await self.pipeline.run_async(data, include_outputs_from={"expander"})
        except PipelineRuntimeError as error:
            if isinstance(error.__cause__, FilterError):
                raise bad_request(f"`filters`: {error.__cause__}") from None
            raise
        expander = result["expander"]
        return SearchResult(
            query=expander["query"], expansions=expander["expansions"], failures=expander["failures"],
            documents=[Hit(id=d.id, content=d.content, score=d.score, meta=d.meta)
                       for d in result["retriever"]["documents"]])
