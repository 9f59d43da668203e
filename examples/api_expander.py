"""
LLMQueryExpander with a remote, OpenAI-compatible chat model instead of the local one (not run in CI: needs a key).

    OPENAI_API_KEY=... python examples/api_expander.py [--model gpt-4o-mini] [--api-base-url URL]

The key is read through Haystack's `Secret` (an environment variable): it never appears in `to_dict`, YAML, logs or
the expansion cache. Remote calls run concurrently (`max_concurrency`), failures are retried with exponential
backoff (`max_retries`, `retry_backoff`), and the cache makes sure no query is paid for twice.
"""

import argparse
import os

os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")

from haystack import Pipeline
from haystack.components.generators.chat import OpenAIChatGenerator
from haystack.utils import Secret

from expandr_haystack import ExpandRRetriever, LLMQueryExpander
from expandr_haystack.evaluation.data import bundled_path, load_collection
from expandr_haystack.evaluation.indexing import build_document_store
from expandr_haystack.options import SamplerOptions


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gpt-4o-mini")
    parser.add_argument("--api-base-url", default=None, help="any OpenAI-compatible server (vLLM, TGI, ...)")
    parser.add_argument("--query", default="what problems of heat conduction in composite slabs have been solved so far .")
    args = parser.parse_args()

    generator = OpenAIChatGenerator(api_key=Secret.from_env_var("OPENAI_API_KEY"), model=args.model,
                                    api_base_url=args.api_base_url, generation_kwargs={"max_completion_tokens": 256})
    expander = LLMQueryExpander(chat_generator=generator, n_expansions=2, cache="api_expansions.sqlite",
                                sampler=SamplerOptions(max_concurrency=8, max_retries=3, retry_backoff=1.0),
                                on_failure="skip")
    store = build_document_store(load_collection(bundled_path("cranfield"), "test").documents()[:300])
    p = Pipeline()
    p.add_component("expander", expander)
    p.add_component("retriever", ExpandRRetriever(document_store=store, top_k=5))
    p.connect("expander.query", "retriever.query")
    p.connect("expander.expansions", "retriever.expansions")
    out = p.run({"expander": {"query": args.query}}, include_outputs_from={"expander"})
    for e in out["expander"]["expansions"]:
        print("expansion:", e[:300])
    for d in out["retriever"]["documents"]:
        print(f"  {d.id:>5} {d.score:.3f} {d.meta['title'][:90]}")
    print("cache:", expander.cache_stats)


if __name__ == "__main__":
    main()
