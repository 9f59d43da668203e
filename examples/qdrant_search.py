"""
ExpandR over Qdrant (examples/qdrant_search.yaml), in Qdrant's local mode: no server needed.

1. Index the first `--docs` Cranfield documents into the Qdrant collection named by the YAML (local folder
   `qdrant_data` under the working directory) with Haystack's stock SentenceTransformersDocumentEmbedder +
   DocumentWriter, then close that client (local mode allows one client per folder).
2. Load the search pipeline from YAML with Haystack's loader and run a query: LLMQueryExpander -> ExpandRRetriever
   wrapping QdrantEmbeddingRetriever.

    python examples/qdrant_search.py [--docs 300] [--query "..."] [--fusion mean|rrf] [--max-new-tokens 96]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")

import yaml
from haystack import Pipeline
from haystack_integrations.document_stores.qdrant import QdrantDocumentStore

import expandr_haystack  # noqa: F401 - adds `expandr_haystack` (only) to Haystack's deserialization allow-list
from expandr_haystack.evaluation.data import bundled_path, load_collection
from expandr_haystack.evaluation.indexing import indexing_pipeline

HERE = Path(__file__).parent
QUERY = "what problems of heat conduction in composite slabs have been solved so far ."


def qdrant_store_of(yaml_text: str):
    """A QdrantDocumentStore built from the serialized store of the YAML's retriever (the same collection)."""
    wrapped = yaml.safe_load(yaml_text)["components"]["retriever"]["init_parameters"]["retriever"]
    return QdrantDocumentStore.from_dict(wrapped["init_parameters"]["document_store"])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=300, help="index the first N Cranfield test documents")
    parser.add_argument("--query", default=QUERY)
    parser.add_argument("--fusion", choices=("mean", "rrf"), default=None, help="override the YAML's fusion")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="override the YAML's max_new_tokens")
    args = parser.parse_args(argv)

    text = (HERE / "qdrant_search.yaml").read_text()
    store = qdrant_store_of(text)
    documents = load_collection(bundled_path("cranfield"), "test").documents()[: args.docs]
    indexing_pipeline(store, progress_bar=False).run({"embedder": {"documents": documents}})
    print(f"indexed {store.count_documents()} documents into Qdrant collection {store.index!r}")
    store.close()  # local mode: one client per folder; the search pipeline opens its own

    search = Pipeline.loads(text)
    retriever, expander = search.get_component("retriever"), search.get_component("expander")
    if args.fusion:
        retriever.fusion = retriever.fusion.replace(method=args.fusion)
    if args.max_new_tokens:
        expander.generation = expander.generation.replace(max_new_tokens=args.max_new_tokens)
    try:
        result = search.run({"expander": {"query": args.query}}, include_outputs_from={"expander"})
    finally:
        search.close()  # closes the Qdrant client (ExpandRRetriever.close -> QdrantEmbeddingRetriever.close)
    docs = result["retriever"]["documents"]
    print("query:    ", args.query)
    print("expansion:", result["expander"]["expansions"][0][:300])
    for d in docs:
        print(f"  {d.id:>5} {d.score:.3f} {d.meta.get('title', '')[:90]}")
    return result


if __name__ == "__main__":
    main()
