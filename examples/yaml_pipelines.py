"""
Load the indexing and search pipelines from YAML with Haystack's own loader, index a slice of the bundled Cranfield
collection and search it: with the paper's q2d expansion (search.yaml) and with grounded expansion
(grounded_search.yaml: first pass -> expander reading its hits -> retriever).

    python examples/yaml_pipelines.py [--docs 300] [--query "..."]
"""

import argparse
import os
from pathlib import Path

os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")

from haystack import Pipeline

import expandr_haystack  # noqa: F401 - adds `expandr_haystack` (only) to Haystack's deserialization allow-list
from expandr_haystack.evaluation.data import bundled_path, load_collection
from expandr_haystack.evaluation.indexing import use_bundled_encoder

HERE = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=300, help="index the first N documents")
    parser.add_argument("--query", default="what problems of heat conduction in composite slabs have been solved so far .")
    args = parser.parse_args()

    indexing = use_bundled_encoder(Pipeline.loads((HERE / "indexing.yaml").read_text()))
    search = Pipeline.loads((HERE / "search.yaml").read_text())
    grounded = Pipeline.loads((HERE / "grounded_search.yaml").read_text())
    documents = load_collection(bundled_path("cranfield"), "test").documents()[: args.docs]
    indexing.run({"embedder": {"documents": documents}})

    result = search.run({"expander": {"query": args.query}}, include_outputs_from={"expander"})
    print("query:    ", args.query)
    print("expansion:", result["expander"]["expansions"][0][:300])
    for d in result["retriever"]["documents"]:
        print(f"  {d.id:>5} {d.score:.3f} {d.meta['title'][:90]}")
    result = grounded.run({"first_pass": {"query": args.query}, "expander": {"query": args.query}},
                          include_outputs_from={"expander"})
    print("grounded expansion:", result["expander"]["expansions"][0][:300])
    for d in result["retriever"]["documents"]:
        print(f"  {d.id:>5} {d.score:.3f} {d.meta['title'][:90]}")


if __name__ == "__main__":
    main()
