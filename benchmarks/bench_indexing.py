"""
Indexing benchmark: documents/s through Haystack's stock `SentenceTransformersDocumentEmbedder` + `DocumentWriter`
into an `InMemoryDocumentStore` (our `expandr_haystack.indexing.indexing_pipeline`) vs raw
`SentenceTransformer.encode` of the same texts ("title\\ntext", batch size 64, normalised).

The corpus is the first `--docs` Cranfield documents (all 1,400 by default). Goal: pipeline throughput >= 0.9x raw
(medians of interleaved repeats).

    python benchmarks/bench_indexing.py [--docs 1400] [--repeats 3]
"""

from __future__ import annotations

import os

os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved, machine, median, summary, verdict
from haystack.document_stores.in_memory import InMemoryDocumentStore

from expandr_haystack.evaluation.data import bundled_path, load_collection
from expandr_haystack.evaluation.indexing import indexing_pipeline

GOAL = 0.9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=1400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    print(f"machine: {machine()}")
    docs = load_collection(bundled_path("cranfield"), "test").documents()[: args.docs]
    texts = [f"{d.meta['title']}\n{d.content}" for d in docs]  # what the embedder builds (meta_fields_to_embed)

    pipeline = indexing_pipeline(InMemoryDocumentStore(), batch_size=args.batch_size, progress_bar=False)
    pipeline.warm_up()
    backend = pipeline.get_component("embedder").embedding_backend
    encoder = getattr(backend, "model", None)
    if encoder is None:
        from expandr_haystack.models import load_encoder, resolve_device

        encoder = load_encoder(None, resolve_device(None))
    print(f"raw encoder: {'the embedder backend' if getattr(backend, 'model', None) is not None else 'own copy'}")

    def component():
        store = InMemoryDocumentStore(embedding_similarity_function="cosine")
        writer = pipeline.get_component("writer")
        writer.document_store = store
        pipeline.run({"embedder": {"documents": docs}})
        assert store.count_documents() == len(docs)

    def raw():
        encoder.encode(texts, batch_size=args.batch_size, normalize_embeddings=True, convert_to_numpy=True,
                       show_progress_bar=False)

    raw(), component()  # warm
    times = interleaved({"component": component, "raw": raw}, args.repeats)
    raw_dps = len(docs) / median(times["raw"])
    comp_dps = len(docs) / median(times["component"])
    ratio = comp_dps / raw_dps
    print(f"{len(docs)} documents, batch size {args.batch_size}, {args.repeats} interleaved repeats (median)")
    print(f"raw encode                     {raw_dps:8.1f} docs/s   {summary(times['raw'])}")
    print(f"embedder + writer (pipeline)   {comp_dps:8.1f} docs/s   {summary(times['component'])}")
    print(f"ratio {ratio:.3f}x  (goal >= {GOAL}x: {verdict(ratio >= GOAL)})")


if __name__ == "__main__":
    main()
