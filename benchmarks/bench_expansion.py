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
- `sampler/packed-int8` (and `-bfloat16` where the CPU has native bfloat16; `--precisions`): the packed decoder with
  int8 (bfloat16) weights, the vocabulary head included (issue 15);
- `expander (...)`: the whole ``LLMQueryExpander.expand`` (prompt building, cleaning; no cache) on the default path,
  and with ``precision`` set to the fastest non-float32 precision given.

The variants alternate within each repeat; tokens/s counts sampled tokens up to and including each row's EOS (the
runs sample different texts, so their lengths differ: tokens/s, not wall time, is compared). Also printed: how many
texts the packed and transformers samplers produce identically from the same seeds.

Quality (`--quality`, on by default): ``expand`` nDCG@10 on the bundled Cranfield test split (75 queries, or the
first `--quality-queries`) for each of `--quality-paths` (default: transformers and packed; issue 15 compares
``packed`` with ``packed-int8``) and each of `--quality-seeds`, same prompts, fresh caches, `--quality-tokens`
tokens; prints each score, the mean and standard deviation per path, the difference of the first two paths with a
paired randomization test on the per-query nDCG@10 averaged over the seeds, and how many expansions they share.
`--no-throughput` runs the quality part alone.

    python benchmarks/bench_expansion.py [--queries 32] [--batch-size 16] [--max-new-tokens 64] [--repeats 3]
                                         [--precisions int8] [--no-quality] [--quality-tokens 96] [--threads N]
                                         [--quality-paths transformers,packed] [--quality-seeds 42]
                                         [--quality-queries N] [--no-throughput]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_line, machine, median, verdict


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quality", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--quality-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--precisions", default="int8",
                        help="packed-decoder precisions besides float32, comma-separated ('' = none); one the CPU "
                             "cannot run is reported and skipped")
    parser.add_argument("--throughput", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--only", default=None,
                        help="comma-separated paths to time besides raw generate (e.g. 'sampler/packed,"
                             "sampler/packed-int8' on a busy machine); default: all")
    parser.add_argument("--quality-paths", default="transformers,packed",
                        help="comma-separated: transformers, packed, packed-int8, packed-bfloat16")
    parser.add_argument("--quality-seeds", default="42")
    parser.add_argument("--quality-queries", type=int, default=None, help="first N Cranfield test queries")
    args = parser.parse_args(argv)

    import torch

    from expandr_haystack.generation.kernels import unavailable_reason
    from expandr_haystack.generation.quantize import auto_precision, int8_weight_levels

    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine())
    print(cpu_line())
    reason = unavailable_reason()
    print(f"precision 'auto' resolves to {auto_precision()[0]!r} ({auto_precision()[1]}); int8 weights: "
          f"{int8_weight_levels()} levels a sign; int8's fused CPU kernels: "
          f"{'on' if reason is None else f'off ({reason})'}")
    if args.throughput:
        throughput(args)
    if args.quality:
        quality(args)
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


def precisions_here(names: str) -> list[str]:
    """The precisions of `names` (comma-separated) this machine runs; the others are reported and left out."""
    from expandr_haystack.generation.quantize import resolve_precision

    kept = []
    for name in filter(None, (n.strip() for n in names.split(","))):
        try:
            kept.append(resolve_precision(name))
        except ValueError as error:
            print(f"skipped precision {name!r}: {error}")
    return list(dict.fromkeys(p for p in kept if p != "float32"))


def throughput(args) -> None:
    import torch

    from expandr_haystack import LLMQueryExpander
    from expandr_haystack.core.text import EXPANSION_PROMPT
    from expandr_haystack.evaluation.data import bundled_path, load_collection
    from expandr_haystack.generation.local import LocalSampler
    from expandr_haystack.models import load_llm
    from expandr_haystack.options import GenerationSettings

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

    precisions = precisions_here(args.precisions)
    samplers = {name: LocalSampler(model, tokenizer, engine=name) for name in ("transformers", "packed")}
    for precision in precisions:
        samplers[f"packed-{precision}"] = LocalSampler(model, tokenizer, weight_precision=precision)
    texts: dict[str, list[str]] = {}

    def sampler_run(name: str, seed: int) -> int:
        sampler = samplers[name]
        before = sampler.tokens_generated
        texts[name] = sampler.sample(prompts, seeds=[seed * 1000 + i for i in range(len(prompts))],
                                     temperatures=[1.0] * len(prompts), top_p=0.9, max_new_tokens=new, batch_size=bs)
        return sampler.tokens_generated - before

    expanders = [LLMQueryExpander(generation=GenerationSettings(max_new_tokens=new, batch_size=bs, temperature=1.0,
                                                                top_p=0.9))]
    if precisions:  # the fastest non-float32 precision is the one to report at the expander level
        expanders.append(expanders[0].with_settings(weight_precision=precisions[0]))
    for expander in expanders:
        expander.warm_up()

    def expander_run(expander, seed: int) -> int:
        sampler = expander._sampler
        before = sampler.tokens_generated
        expander.generation = expander.generation.replace(seed=seed)  # a fresh seed each repeat: every row generated
        expander.expand(queries)
        return sampler.tokens_generated - before

    variants = {"raw generate": raw}
    for name in samplers:
        variants[f"sampler/{name}"] = lambda s, name=name: sampler_run(name, s)
    for expander in expanders:
        variants[f"expander ({expander.engine})"] = lambda s, e=expander: expander_run(e, s)
    if args.only:
        keep = {"raw generate", "sampler/packed"}
        keep |= {n.strip() for n in args.only.split(",")}
        unknown = keep - set(variants)
        if unknown:
            raise SystemExit(f"--only: unknown paths {sorted(unknown)}; known: {list(variants)}")
        variants = {n: f for n, f in variants.items() if n in keep}
    for fn in variants.values():  # warm-up: first-call allocations, oneDNN primitive creation
        fn(10_000) if fn is not raw else None
    raw(10_000)
    times = {k: [] for k in variants}
    cpu = {k: [] for k in variants}  # process CPU seconds: with --threads 1, the time a busy machine did not steal
    for name in variants:
        counted[name] = []
    for r in range(args.repeats):
        names = list(variants) if r % 2 == 0 else list(variants)[::-1]
        for name in names:
            started, started_cpu = time.perf_counter(), time.process_time()
            n = variants[name](r)
            times[name].append(time.perf_counter() - started)
            cpu[name].append(time.process_time() - started_cpu)
            counted[name].append(n)

    base_rate = sum(counted["raw generate"]) / sum(times["raw generate"])
    base_cpu_rate = sum(counted["raw generate"]) / sum(cpu["raw generate"])
    print()
    print("| path | tokens (per repeat) | median s | tokens/s | vs raw generate | tokens/CPU-s | vs raw (CPU time) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in variants:
        rate = sum(counted[name]) / sum(times[name])
        cpu_rate = sum(counted[name]) / sum(cpu[name])
        print(f"| {name} | {median(counted[name]):.0f} | {median(times[name]):.2f} | {rate:.1f} | "
              f"{rate / base_rate:.2f}x | {cpu_rate:.1f} | {cpu_rate / base_cpu_rate:.2f}x |")
    print(f"load average now: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (CPU-time ratios are the ones a "
          "contended machine leaves meaningful, with --threads 1)")
    packed_rate = sum(counted["sampler/packed"]) / sum(times["sampler/packed"])
    print(f"\npacked vs raw generate: {packed_rate / base_rate:.2f}x (goal >= 2x: "
          f"{verdict(packed_rate / base_rate >= 2.0)})")
    packed_cpu_rate = sum(counted["sampler/packed"]) / sum(cpu["sampler/packed"])
    for precision in precisions:
        name = f"sampler/packed-{precision}"
        rate, cpu_rate = sum(counted[name]) / sum(times[name]), sum(counted[name]) / sum(cpu[name])
        print(f"packed-{precision} vs raw generate: {rate / base_rate:.2f}x wall, {cpu_rate / base_cpu_rate:.2f}x CPU "
              f"time; vs packed float32: {rate / packed_rate:.2f}x wall, {cpu_rate / packed_cpu_rate:.2f}x CPU time "
              f"(issue 15 goal >= 4x raw: {verdict(max(rate / base_rate, cpu_rate / base_cpu_rate) >= 4.0)})")
    if "transformers" in texts:
        same = sum(a == b for a, b in zip(texts["transformers"], texts["packed"]))
        print(f"same seeds, packed vs transformers sampler: {same}/{len(prompts)} texts identical (last repeat)")
    for precision in precisions:
        same = sum(a == b for a, b in zip(texts["packed"], texts[f"packed-{precision}"]))
        print(f"same seeds, packed-{precision} vs packed float32: {same}/{len(prompts)} texts identical "
              f"(last repeat)")


def quality(args) -> None:
    from expandr_haystack import LLMQueryExpander
    from expandr_haystack.evaluation.data import bundled_path, load_collection
    from expandr_haystack.evaluation.indexing import build_document_store
    from expandr_haystack.evaluation.runner import evaluate
    from expandr_haystack.evaluation.stats import average_per_query, paired_randomization_test
    from expandr_haystack.options import GenerationSettings, SamplerOptions

    collection = load_collection(bundled_path("cranfield"), split="test")
    if args.quality_queries:
        collection = collection.subset(list(collection.queries)[: args.quality_queries], split="test")
    paths = [p.strip() for p in args.quality_paths.split(",") if p.strip()]
    seeds = [int(s) for s in args.quality_seeds.split(",")]
    print(f"\nquality: expand nDCG@10, Cranfield test ({len(collection.queries)} queries), "
          f"{args.quality_tokens} new tokens, seeds {seeds}")
    store = build_document_store(collection.documents(), progress_bar=False)
    scores: dict[str, list[float]] = {p: [] for p in paths}
    per_query: dict[str, list] = {p: [] for p in paths}  # each seed's per-query scores
    generated: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for path in paths:
                backend, _, precision = path.partition("-")
                started = time.perf_counter()
                e = LLMQueryExpander(generation=GenerationSettings(max_new_tokens=args.quality_tokens,
                                                                   batch_size=args.batch_size, seed=seed),
                                     sampler=SamplerOptions(engine=backend, weight_precision=precision or "float32"),
                                     cache=str(Path(tmp) / f"{path}-{seed}.sqlite"))
                result = evaluate(collection, ["expand"], expander=e, store=store, progress_bar=False)
                scores[path].append(100 * result["expand"]["ndcg@10"])
                per_query[path].append(result.per_query["expand"])
                generated[path, seed] = result.expansions
                print(f"seed {seed}, {path} ({e.engine}): {scores[path][-1]:.2f} "
                      f"({time.perf_counter() - started:.0f} s)", flush=True)
    print("\n| path | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | sd |")
    print("|---|" + "---:|" * (len(seeds) + 2))
    for path in paths:
        sd = statistics.stdev(scores[path]) if len(seeds) > 1 else 0.0
        print(f"| {path} | " + " | ".join(f"{x:.2f}" for x in scores[path]) +
              f" | {statistics.mean(scores[path]):.2f} | {sd:.2f} |")
    if len(paths) >= 2:
        first, second = paths[:2]
        diff = statistics.mean(scores[second]) - statistics.mean(scores[first])
        same = sum(generated[first, s][q] == generated[second, s][q] for s in seeds for q in generated[first, s])
        p_value = paired_randomization_test(average_per_query(per_query[second]), average_per_query(per_query[first]))
        print(f"{second} - {first}: {diff:+.2f} nDCG@10 points (goal within 0.5: {verdict(abs(diff) <= 0.5)}); "
              f"paired randomization test on the per-query means over seeds: p = {p_value:.3f}; "
              f"{same}/{len(seeds) * len(collection.queries)} expansions identical")


if __name__ == "__main__":
    raise SystemExit(main())
