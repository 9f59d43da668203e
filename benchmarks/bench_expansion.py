"""
Expansion throughput: the local generation paths against raw float32 ``model.generate``, same model, prompts,
batch size and sampling settings, measured in one run; then the quality check of the fast path.

Throughput (bundled SmolLM2-135M-Instruct in float32 on CPU; ExpandR q2d prompts of the first `--queries` Cranfield
train queries; sampling T 1.0, top-p 0.9, no top-k; `--max-new-tokens` new tokens; `--batch-size` rows per batch):

- `raw generate`: ``model.generate(do_sample=True, temperature=1.0, top_p=0.9, top_k=0)`` on left-padded batches in
  the given order (the baseline);
- `sampler/transformers`: ``LocalSampler`` through the model's own forward (per-row seeds, length-sorted batches);
- `sampler/packed`: ``LocalSampler`` with ``PackedLlamaDecoder`` (prepacked float32 weights, fused projections,
  preallocated KV cache) - the default on CPU;
- `expander (auto)`: the whole ``LLMQueryExpander.expand`` (prompt building, cleaning; no cache) on the default path.

The variants alternate within each repeat; tokens/s counts sampled tokens up to and including each row's EOS (the
runs sample different texts, so their lengths differ: tokens/s, not wall time, is compared). Also printed: how many
texts the packed and transformers samplers produce identically from the same seeds.

Quality (`--quality`, on by default): ``expand`` nDCG@10 on the bundled Cranfield test split (75 queries) with the
transformers path and with the packed path, same prompts and seed, fresh caches, `--quality-tokens` tokens.

    python benchmarks/bench_expansion.py [--queries 32] [--batch-size 16] [--max-new-tokens 64] [--repeats 3]
                                         [--no-quality] [--quality-tokens 96] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median, verdict


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quality", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--quality-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)

    import torch

    from expandr_haystack import LLMQueryExpander
    from expandr_haystack.core.text import EXPANSION_PROMPT
    from expandr_haystack.evaluation.data import bundled_path, load_collection
    from expandr_haystack.generation.local import LocalSampler
    from expandr_haystack.models import load_llm

    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine())
    model, tokenizer = load_llm(None, None, "cpu", "float32")
    queries = list(load_collection(bundled_path("cranfield"), split="train").queries.values())[: args.queries]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": EXPANSION_PROMPT.format(query=q)}],
                                             tokenize=False, add_generation_prompt=True) for q in queries]
    new, bs = args.max_new_tokens, args.batch_size
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) | {tokenizer.eos_token_id}
    print(f"{len(prompts)} prompts, batch size {bs}, {new} new tokens, T 1.0, top-p 0.9, float32, "
          f"{args.repeats} repeats")

    counted: dict[str, list[int]] = {}

    @torch.inference_mode()
    def raw(seed: int) -> int:
        torch.manual_seed(seed)
        tokens = 0
        for start in range(0, len(prompts), bs):
            enc = tokenizer(prompts[start : start + bs], return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(**enc, do_sample=True, temperature=1.0, top_p=0.9, top_k=0, max_new_tokens=new,
                                 pad_token_id=tokenizer.pad_token_id)
            for row in out[:, enc["input_ids"].shape[1] :].tolist():
                cut = next((k for k, t in enumerate(row) if t in eos_ids), len(row))
                tokens += min(cut + 1, len(row))
        return tokens

    samplers = {name: LocalSampler(model, tokenizer, backend=name) for name in ("transformers", "packed")}
    texts: dict[str, list[str]] = {}

    def sampler_run(name: str, seed: int) -> int:
        sampler = samplers[name]
        before = sampler.tokens_generated
        texts[name] = sampler.sample(prompts, seeds=[seed * 1000 + i for i in range(len(prompts))],
                                     temperatures=[1.0] * len(prompts), top_p=0.9, max_new_tokens=new, batch_size=bs)
        return sampler.tokens_generated - before

    expander = LLMQueryExpander(max_new_tokens=new, batch_size=bs, temperature=1.0, top_p=0.9)
    expander.warm_up()

    def expander_run(seed: int) -> int:
        sampler = expander._sampler
        before = sampler.tokens_generated
        expander.seed = seed  # a fresh seed each repeat: no cache, every row generated
        expander.expand(queries)
        return sampler.tokens_generated - before

    variants = {"raw generate": raw, "sampler/transformers": lambda s: sampler_run("transformers", s),
                "sampler/packed": lambda s: sampler_run("packed", s), f"expander ({expander.engine})":
                expander_run}
    for fn in variants.values():  # warm-up: first-call allocations, oneDNN primitive creation
        fn(10_000) if fn is not raw else None
    raw(10_000)
    times = {k: [] for k in variants}
    for name in variants:
        counted[name] = []
    for r in range(args.repeats):
        names = list(variants) if r % 2 == 0 else list(variants)[::-1]
        for name in names:
            started = time.perf_counter()
            n = variants[name](r)
            times[name].append(time.perf_counter() - started)
            counted[name].append(n)
    same = sum(a == b for a, b in zip(texts["transformers"], texts["packed"]))

    base_rate = sum(counted["raw generate"]) / sum(times["raw generate"])
    print()
    print("| path | tokens (per repeat) | median s | tokens/s | vs raw generate |")
    print("|---|---:|---:|---:|---:|")
    for name in variants:
        rate = sum(counted[name]) / sum(times[name])
        print(f"| {name} | {median(counted[name]):.0f} | {median(times[name]):.2f} | {rate:.1f} | "
              f"{rate / base_rate:.2f}x |")
    packed_rate = sum(counted["sampler/packed"]) / sum(times["sampler/packed"])
    print(f"\npacked vs raw generate: {packed_rate / base_rate:.2f}x (goal >= 2x: "
          f"{verdict(packed_rate / base_rate >= 2.0)})")
    print(f"same seeds, packed vs transformers sampler: {same}/{len(prompts)} texts identical (last repeat)")

    if args.quality:
        from expandr_haystack.evaluation.indexing import build_document_store
        from expandr_haystack.evaluation.runner import evaluate

        collection = load_collection(bundled_path("cranfield"), split="test")
        store = build_document_store(collection.documents(), progress_bar=False)
        scores, generated = {}, {}
        with tempfile.TemporaryDirectory() as tmp:
            for backend in ("transformers", "packed"):
                started = time.perf_counter()
                e = LLMQueryExpander(max_new_tokens=args.quality_tokens, batch_size=bs, backend=backend,
                                     cache=str(Path(tmp) / f"{backend}.sqlite"))
                result = evaluate(collection, ["expand"], expander=e, store=store, progress_bar=False)
                scores[backend] = result["expand"]["ndcg@10"]
                generated[backend] = result.expansions
                print(f"expand nDCG@10 with the {backend} path: {100 * scores[backend]:.2f} "
                      f"({time.perf_counter() - started:.0f} s)")
        diff = 100 * (scores["packed"] - scores["transformers"])
        same = sum(generated["transformers"][q] == generated["packed"][q] for q in generated["packed"])
        print(f"difference {diff:+.2f} nDCG@10 points (goal within 0.5: {verdict(abs(diff) <= 0.5)}); "
              f"{same}/{len(collection.queries)} expansions identical")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
