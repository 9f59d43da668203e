"""
Index the bundled Cranfield documents into the pgvector table that the Hayhooks ExpandR search pipeline reads
(pipelines/expandr_search/expandr_search.yml: its store settings are read from that file, so both name the same
table). Run it once: the table lives in PostgreSQL and survives server restarts. Running it again writes only the
documents the table does not hold yet (none: nothing is loaded, nothing written).

    export PG_CONN_STR=postgresql://postgres@127.0.0.1:5433/postgres    # examples/servers/postgres.py prints it
    python examples/hayhooks/index.py [--docs 1400] [--recreate]

Documents are embedded by Haystack's stock SentenceTransformersDocumentEmbedder with the retriever's encoder
(bundled all-MiniLM-L6-v2; title + text) and written by DocumentWriter (`expandr_haystack.evaluation.indexing`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")

import yaml
from haystack_integrations.document_stores.pgvector import PgvectorDocumentStore

from expandr_haystack.evaluation.data import bundled_path, load_collection
from expandr_haystack.evaluation.indexing import indexing_pipeline

PIPELINE_YAML = Path(__file__).resolve().parent / "pipelines" / "expandr_search" / "expandr_search.yml"


def store_settings(yaml_path: Path = PIPELINE_YAML) -> dict:
    """The serialized PgvectorDocumentStore of the pipeline's wrapped retriever (the table the pipeline reads)."""
    wrapped = yaml.safe_load(yaml_path.read_text())["components"]["retriever"]["init_parameters"]["retriever"]
    return wrapped["init_parameters"]["document_store"]


def open_store(recreate: bool = False, yaml_path: Path = PIPELINE_YAML) -> PgvectorDocumentStore:
    """The pipeline's PgvectorDocumentStore (connection from PG_CONN_STR); `recreate` drops and recreates its
    table."""
    if not os.environ.get("PG_CONN_STR"):
        raise SystemExit("PG_CONN_STR is not set: export the PostgreSQL connection string, e.g. the line "
                         "`python examples/servers/postgres.py start --data pgdata` prints.")
    settings = store_settings(yaml_path)
    if recreate:
        settings = {**settings, "init_parameters": {**settings["init_parameters"], "recreate_table": True}}
    return PgvectorDocumentStore.from_dict(settings)


def index(n_docs: int | None = None, recreate: bool = False, yaml_path: Path = PIPELINE_YAML) -> dict[str, int]:
    """Write the first `n_docs` Cranfield documents (all: None) that the table lacks; return counts."""
    documents = load_collection(bundled_path("cranfield"), "test").documents()[:n_docs]
    store = open_store(recreate, yaml_path)
    try:
        ids = [d.id for d in documents]
        present = {d.id for d in store.filter_documents({"field": "id", "operator": "in", "value": ids})}
        missing = [d for d in documents if d.id not in present]
        if missing:
            indexing_pipeline(store, progress_bar=False).run({"embedder": {"documents": missing}})
        return {"wanted": len(documents), "written": len(missing), "in_table": store.count_documents()}
    finally:
        store.close()


def main(argv: list[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=None, help="only the first N Cranfield documents (default: all "
                                                               "1,400)")
    parser.add_argument("--recreate", action="store_true", help="drop the table first and index afresh")
    args = parser.parse_args(argv)
    if args.docs is not None and args.docs < 1:
        parser.error(f"--docs must be >= 1; got {args.docs}")
    started = time.perf_counter()
    counts = index(args.docs, args.recreate)
    table = store_settings()["init_parameters"]["table_name"]
    print(f"table {table!r}: {counts['written']} of {counts['wanted']} documents written "
          f"({counts['wanted'] - counts['written']} already there), {counts['in_table']} in the table "
          f"({time.perf_counter() - started:.1f} s)")
    return counts


if __name__ == "__main__":
    main(sys.argv[1:])
