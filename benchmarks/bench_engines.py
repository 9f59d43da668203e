"""
Expansion engines side by side (issue 26, item 1): the engines a user would pick instead of ours, on the same
prompts and sampling, at batch 1 (one interactive query: seconds to the finished expansion) and at batch 16
(throughput), in one process.

Paths (each skipped with the reason when it cannot run here):
- `raw generate`: transformers ``model.generate`` in float32 (the baseline of every ratio);
- `packed float32` / `packed int8`: our ``LocalSampler`` with the packed decoder (int8 needs FBGEMM: x86 with AVX2;
  7-bit weights without AVX512-VNNI);
- `ctranslate2 int8` / `ctranslate2 float32`: ``ctranslate2.Generator`` over the dequantised bundled SmolLM2, converted
  once with ``TransformersConverter`` into `--work` (`pip install ctranslate2`);
- `llama.cpp <file>`: our ``engine="llama_cpp"`` (`generation.llama_cpp.LlamaCppSampler`, llama-cpp-python) on the
  bundled GGUF as shipped (Q4_1), and on any `--gguf` file (e.g. a Q8_0 conversion or a bigger model, prompted
  through its own chat template); llama-cpp-python's high-level API generates one prompt at a time, so its batch-16
  figure is 16 sequential generations (llama.cpp's own batched decoding is not measured).

Each group of engines (torch: raw generate and ours; CTranslate2; llama.cpp) runs in a process of its own, the groups
alternating within each repeat: CTranslate2's own OpenMP runtime slowed torch in a shared process by up to a third
(`GROUPS`). Run with every switch of `_common.ISA_SWITCHES` set to AVX2 (and a llama.cpp built for AVX2 only) to
time the kernels an AVX2-only CPU gets on a wider one.

Same ExpandR q2d prompts (the first `--queries` Cranfield train queries through the chat template), T 1.0, top-p
0.9, no top-k, no min-p, no repetition penalty, `--max-new-tokens`; tokens counted as generated up to and including
EOS. Batch 1 reports the median seconds per expansion and tokens/s; batch 16 tokens/s. Every ratio is against raw
generate at the same batch size, measured in the same run (paths interleaved, `--repeats`).

    python benchmarks/bench_engines.py [--queries 16] [--batch-sizes 1,16] [--max-new-tokens 64] [--repeats 2]
                                       [--work /tmp/expandr-engines] [--gguf extra.gguf ...] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_line, machine, median

#: The engines' groups, each timed in a process of its own: a library with its own OpenMP runtime (CTranslate2's
#: bundled libgomp) or thread pool (llama.cpp) slows torch in the same process long after it ran (measured: packed
#: int8 -32% and raw generate -15% once CTranslate2 had generated, 2026-12-05), so a shared process is not a fair race.
GROUPS = ("torch", "ctranslate2", "llama.cpp")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", default="/tmp/expandr-engines", help="folder of the converted CTranslate2 models")
    parser.add_argument("--gguf", action="append", default=[], help="another GGUF file for llama.cpp (repeatable)")
    parser.add_argument("--threads", type=int, default=None, help="threads for every engine (default: torch's)")
    parser.add_argument("--group", choices=GROUPS, default=None, help=argparse.SUPPRESS)  # a child's group
    parser.add_argument("--json", default=None, help=argparse.SUPPRESS)  # where a child writes its timings
    parser.add_argument("--seed-offset", type=int, default=0, help=argparse.SUPPRESS)  # the repeat a child times
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.group is not None:
        return child(args)
    import torch

    threads = args.threads or torch.get_num_threads()
    print(machine())
    print(cpu_line())
    print(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; command: python {' '.join(sys.argv)}")
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    print(f"{args.queries} prompts, {args.max_new_tokens} new tokens, T 1.0, top-p 0.9, {threads} threads, "
          f"{args.repeats} repeats; each group of engines ({', '.join(GROUPS)}) in a process of its own, the groups "
          "alternating within each repeat")
    runs: dict[int, dict[str, list[tuple[int, float]]]] = {size: {} for size in sizes}  # size -> path -> timings
    with tempfile.TemporaryDirectory() as work:
        for r in range(args.repeats):
            for group in GROUPS if r % 2 == 0 else GROUPS[::-1]:
                out = Path(work) / f"{group}-{r}.json"
                command = [sys.executable, __file__, "--group", group, "--json", str(out), "--repeats", "1",
                           "--queries", str(args.queries), "--batch-sizes", args.batch_sizes,
                           "--max-new-tokens", str(args.max_new_tokens), "--work", args.work,
                           "--threads", str(threads), "--seed-offset", str(r)]
                for gguf in args.gguf:
                    command += ["--gguf", gguf]
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                if r == 0:  # what a group skipped, once
                    print("".join(line + "\n" for line in done.stdout.splitlines() if "skipped" in line), end="")
                if done.returncode != 0:
                    raise SystemExit(f"group {group} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
                for size, timed in json.loads(out.read_text()).items():
                    for name, (tokens, seconds) in timed.items():
                        runs[int(size)].setdefault(name, []).append((tokens, seconds))
    for size in sizes:
        paths = runs[size]
        base = sum(t for t, _ in paths["raw generate"]) / sum(s for _, s in paths["raw generate"])
        print(f"\nbatch {size}:")
        print("| path | tokens/s | vs raw generate | s per expansion (median repeat / prompts) |")
        print("|---|---:|---:|---:|")
        for name, timed in paths.items():
            rate = sum(t for t, _ in timed) / sum(s for _, s in timed)
            print(f"| {name} | {rate:.1f} | {rate / base:.2f}x | "
                  f"{median([s for _, s in timed]) / args.queries:.3f} |")
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


def child(args) -> int:
    """One group's engines (`GROUPS`), each warmed up, then timed once per batch size: writes ``{size: {path:
    [tokens, seconds]}}`` to ``args.json``."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    paths, prompts = build_paths(args, torch.get_num_threads(), args.group)
    result: dict[int, dict[str, list[float]]] = {}
    for size in [int(b) for b in args.batch_sizes.split(",")]:
        for run in paths.values():  # warm-up: first-call allocations
            run(prompts[:size], size, 10_000)
        result[size] = {}
        for name in list(paths) if args.seed_offset % 2 == 0 else list(paths)[::-1]:  # alternating by repeat
            started = time.perf_counter()
            tokens = paths[name](prompts, size, args.seed_offset)
            result[size][name] = [tokens, time.perf_counter() - started]
        result[size] = {name: result[size][name] for name in paths}  # reported in the paths' order
    Path(args.json).write_text(json.dumps(result))
    return 0


def build_paths(args, threads: int, group: str):
    """The timed paths of `group` (`GROUPS`) and the prompts."""
    import torch

    from expandr_haystack.core.text import EXPANSION_PROMPT
    from expandr_haystack.evaluation.data import bundled_path, load_collection
    from expandr_haystack.generation.local import LocalSampler
    from expandr_haystack.generation.quantize import int8_unsupported_reason
    from expandr_haystack.models import _SMOLLM2_GGUF, _smollm2_dir, ensure_default_llm, load_llm

    model, tokenizer = load_llm(None, None, "cpu", "float32")
    queries = list(load_collection(bundled_path("cranfield"), split="train").queries.values())[: args.queries]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": EXPANSION_PROMPT.format(query=q)}],
                                             tokenize=False, add_generation_prompt=True) for q in queries]
    new = args.max_new_tokens
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) | {tokenizer.eos_token_id}

    def counted(rows) -> int:
        return sum(min(next((k for k, t in enumerate(row) if t in eos_ids), len(row)) + 1, len(row)) for row in rows)

    @torch.inference_mode()
    def raw(batch, size, seed) -> int:
        torch.manual_seed(seed)
        tokens = 0
        for start in range(0, len(batch), size):
            enc = tokenizer(batch[start : start + size], return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(**enc, do_sample=True, temperature=1.0, top_p=0.9, top_k=0, max_new_tokens=new,
                                 pad_token_id=tokenizer.pad_token_id)
            tokens += counted(out[:, enc["input_ids"].shape[1] :].tolist())
        return tokens

    paths = {"raw generate": raw} if group == "torch" else {}

    def ours(sampler):
        def run(batch, size, seed) -> int:
            before = sampler.tokens_generated
            sampler.sample(batch, seeds=[seed * 1000 + i for i in range(len(batch))],
                           temperatures=[1.0] * len(batch), top_p=0.9, max_new_tokens=new, batch_size=size)
            return sampler.tokens_generated - before
        return run

    if group == "torch":
        paths["packed float32"] = ours(LocalSampler(model, tokenizer))
        reason = int8_unsupported_reason()
        if reason is None:
            paths["packed int8"] = ours(LocalSampler(model, tokenizer, weight_precision="int8"))
        else:
            print(f"packed int8: skipped ({reason})")
        return paths, prompts

    if group == "ctranslate2":
        try:
            import ctranslate2
        except ImportError:
            print("ctranslate2: skipped (pip install ctranslate2)")
            return paths, prompts
        source = ensure_default_llm()
        token_of = {p: tokenizer.convert_ids_to_tokens(tokenizer(p, add_special_tokens=False).input_ids)
                    for p in prompts}  # CTranslate2 takes token strings
        for precision in ("int8", "float32"):
            target = Path(args.work) / f"smollm2-ct2-{precision}"
            if not (target / "model.bin").exists():
                ctranslate2.converters.TransformersConverter(str(source)).convert(str(target), quantization=precision,
                                                                                   force=True)
            generator = ctranslate2.Generator(str(target), device="cpu", compute_type=precision,
                                              intra_threads=threads)

            def ct2(batch, size, seed, generator=generator) -> int:
                ctranslate2.set_random_seed(seed + 1)
                results = generator.generate_batch([token_of[p] for p in batch], max_batch_size=size,
                                                   max_length=new, sampling_temperature=1.0, sampling_topp=0.9,
                                                   sampling_topk=0, include_prompt_in_result=False,
                                                   return_end_token=True)
                return counted([r.sequences_ids[0] for r in results])
            paths[f"ctranslate2 {precision}"] = ct2
        return paths, prompts

    from expandr_haystack.generation.llama_cpp import LlamaCppSampler, llama_cpp_unavailable_reason

    reason = llama_cpp_unavailable_reason()
    if reason is not None:
        print(f"llama.cpp: skipped ({reason})")
    else:
        messages = {p: [{"role": "user", "content": EXPANSION_PROMPT.format(query=q)}] for p, q in zip(prompts, queries)}
        for file in [_smollm2_dir() / _SMOLLM2_GGUF, *map(Path, args.gguf)]:
            crash = llama_crashes(file, prompts[0], threads)
            if crash:
                print(f"llama.cpp {file.name}: skipped ({crash})")
                continue
            # the engine the expander runs (engine='llama_cpp'): prompts templated by the file's own tokenizer, one
            # at a time (llama-cpp-python's high-level API), llama.cpp's extra samplers off
            run = ours(LlamaCppSampler(str(file), engine_kwargs={"n_ctx": 1024, "n_threads": threads,
                                                                 "n_threads_batch": threads}))
            paths[f"llama.cpp {file.name}"] = lambda batch, size, seed, run=run: run([messages[p] for p in batch],
                                                                                     size, seed)
    return paths, prompts


_PROBE = """
import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=1024, n_threads=int(sys.argv[3]), verbose=False)
llm.create_completion(sys.argv[2], max_tokens=4, temperature=1.0, top_p=0.9, top_k=0, min_p=0.0, seed=1)
"""


def llama_crashes(file: Path, prompt: str, threads: int) -> str | None:
    """Why llama.cpp cannot generate from `file` here (None when it can), tried in a child process: a native build
    can die in `llama_decode` (seen: SIGSEGV on multi-token prompts on an AMX-capable Xeon), which would end this run."""
    import subprocess

    done = subprocess.run([sys.executable, "-c", _PROBE, str(file), prompt, str(threads)], capture_output=True,
                          text=True, timeout=300, check=False)
    if done.returncode == 0:
        return None
    return f"a {prompt.count(' ') + 1}-word prompt ends the process with exit code {done.returncode}: " \
           f"{done.stderr.strip()[-200:]}"


if __name__ == "__main__":
    sys.exit(main())
