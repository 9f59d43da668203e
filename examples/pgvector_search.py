"""
ExpandR over PostgreSQL + pgvector (examples/pgvector_search.yaml).

1. The server: `--dsn`, else the environment variable PG_CONN_STR, else a local PostgreSQL + pgvector started here
   with examples/servers/postgres.py, its data in `./pgdata` (kept; the server is stopped at exit).
2. If the YAML's table (`cranfield`) is empty, or with `--reindex`, index the first `--docs` Cranfield documents into
   it with Haystack's stock SentenceTransformersDocumentEmbedder + DocumentWriter.
3. Load the search pipeline from YAML with Haystack's loader (its store reads the DSN from PG_CONN_STR) and run a
   query: LLMQueryExpander -> ExpandRRetriever wrapping PgvectorEmbeddingRetriever.

    python examples/pgvector_search.py [--dsn postgresql://...] [--docs 300] [--reindex] [--query "..."]
        [--fusion mean|rrf] [--max-new-tokens 96]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")

import yaml
from haystack import Pipeline
from haystack_integrations.document_stores.pgvector import PgvectorDocumentStore

import expandr_haystack  # noqa: F401 - adds `expandr_haystack` (only) to Haystack's deserialization allow-list
from expandr_haystack.evaluation.data import bundled_path, load_collection
from expandr_haystack.evaluation.indexing import indexing_pipeline

HERE = Path(__file__).parent
QUERY = "what problems of heat conduction in composite slabs have been solved so far ."
#: The environment variable the YAML's store reads its connection string from.
DSN_VARIABLE = "PG_CONN_STR"


def postgres_launcher() -> Any:
    """examples/servers/postgres.py as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("expandr_example_postgres", HERE / "servers" / "postgres.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def pgvector_store_of(yaml_text: str) -> PgvectorDocumentStore:
    """A PgvectorDocumentStore built from the serialized store of the YAML's retriever (the same table)."""
    wrapped = yaml.safe_load(yaml_text)["components"]["retriever"]["init_parameters"]["retriever"]
    return PgvectorDocumentStore.from_dict(wrapped["init_parameters"]["document_store"])


def index_if_needed(store: PgvectorDocumentStore, docs: int, reindex: bool) -> int:
    """Index the first `docs` Cranfield test documents into `store` if it is empty or `reindex`; its count after."""
    if reindex:
        store.delete_all_documents()
    held = store.count_documents()
    if held:
        print(f"table {store.table_name!r} holds {held} documents (--reindex to index the first {docs} again)")
        return held
    documents = load_collection(bundled_path("cranfield"), "test").documents()[:docs]
    indexing_pipeline(store, progress_bar=False).run({"embedder": {"documents": documents}})
    held = store.count_documents()
    print(f"indexed {held} documents into table {store.table_name!r}")
    return held


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsn", default=os.environ.get(DSN_VARIABLE),
                        help=f"PostgreSQL connection string (default: ${DSN_VARIABLE}; neither: a server started in "
                             "./pgdata)")
    parser.add_argument("--docs", type=int, default=300, help="index the first N Cranfield test documents")
    parser.add_argument("--reindex", action="store_true", help="empty the table and index it again")
    parser.add_argument("--query", default=QUERY)
    parser.add_argument("--fusion", choices=("mean", "rrf"), default=None, help="override the YAML's fusion")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="override the YAML's max_new_tokens")
    args = parser.parse_args(argv)

    launcher, started = None, None
    if not args.dsn:
        launcher = postgres_launcher()
        try:
            started = launcher.start(Path("pgdata"))
        except RuntimeError as error:
            raise RuntimeError(f"{error}\nCould not start a local server in ./pgdata (as root it runs as `nobody`, "
                               "which must be able to enter this folder): pass --dsn, or run from another folder."
                               ) from error
        args.dsn = started.dsn
        print(f"no --dsn and no ${DSN_VARIABLE}: started PostgreSQL + pgvector on {started.dsn} (data {started.data}; "
              "stopped at exit, data kept)")
    os.environ[DSN_VARIABLE] = args.dsn  # what the YAML's store reads
    try:
        text = (HERE / "pgvector_search.yaml").read_text()
        store = pgvector_store_of(text)
        try:
            index_if_needed(store, args.docs, args.reindex)
        finally:
            store.close()

        search = Pipeline.loads(text)
        retriever, expander = search.get_component("retriever"), search.get_component("expander")
        if args.fusion:
            retriever.fusion = retriever.fusion.replace(method=args.fusion)
        if args.max_new_tokens:
            expander.generation = expander.generation.replace(max_new_tokens=args.max_new_tokens)
        try:
            result = search.run({"expander": {"query": args.query}}, include_outputs_from={"expander"})
        finally:
            search.close()  # closes the connection (ExpandRRetriever.close -> PgvectorEmbeddingRetriever.close)
    finally:
        if started is not None:
            launcher.stop(started.data)
            print(f"stopped the server (data kept in {started.data})")
    docs = result["retriever"]["documents"]
    print("query:    ", args.query)
    print("expansion:", result["expander"]["expansions"][0][:300] if result["expander"]["expansions"] else "(none)")
    for d in docs:
        print(f"  {d.id:>5} {d.score:.3f} {d.meta.get('title', '')[:90]}")
    return result


if __name__ == "__main__":
    main()
