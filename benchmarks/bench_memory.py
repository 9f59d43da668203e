"""
Peak memory of `make run` or of a training run: runs `examples/search.py` (what `make run` runs), or with `--train
CONFIG` `training/joint.py --config CONFIG` (extra `--set`/`--output` arguments passed through), in a subprocess and
reports its peak resident set size, both sampled (psutil, every `--interval` s, process and its children) and from
the kernel's `ru_maxrss` of the child. `--timeline FILE` writes (seconds, MiB) every 10 s and the run's log lines
with their time, to see which step the memory goes to.

By default the run is `make run` itself (all 75 test queries, the default cache, so expansions already cached by an
earlier run are hits); `--max-queries N` and `--cache PATH` are passed through (e.g. a fresh cache to include
generation). The output says whether expansions were generated or read from the cache.

    python benchmarks/bench_memory.py [--max-queries N] [--cache PATH] [--interval 0.05]
    python benchmarks/bench_memory.py --train training/configs/tiny-cpu.yaml --output runs/tiny-cpu \
        [--set expansion.mode=grounded ...] [--timeline runs/tiny-cpu.memory.json]
    python benchmarks/bench_memory.py --train training/configs/tiny-cpu.yaml --output runs/tiny-cpu-2p --nproc 2

`--nproc N` runs the training under `torchrun --standalone --nproc_per_node N` (OMP_NUM_THREADS=1 per process unless
set) and reports the peak RSS of each rank as well (the processes found by their ``RANK`` variable).
"""

from __future__ import annotations

import os

os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-queries", type=int, default=None)
    parser.add_argument("--cache", default=None)
    parser.add_argument("--interval", type=float, default=0.05)
    parser.add_argument("--train", default=None, metavar="CONFIG", help="measure `training/joint.py --config CONFIG`")
    parser.add_argument("--output", default=None, help="the training run folder (with --train)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="passed to training/joint.py")
    parser.add_argument("--timeline", default=None, help="write the RSS timeline and the run's log lines (JSON)")
    parser.add_argument("--resume", action="store_true", help="passed to training/joint.py (continue a stopped run)")
    parser.add_argument("--nproc", type=int, default=1, help="with --train: processes under torchrun (default 1)")
    args = parser.parse_args()

    import psutil

    print(f"machine: {machine()}")
    if args.train:
        launcher = [sys.executable]
        if args.nproc > 1:
            launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc)]
        cmd = [*launcher, str(ROOT / "training" / "joint.py"), "--config", args.train, "--no-progress"]
        cmd += ["--output", args.output] if args.output else []
        cmd += [f"--set={item}" for item in args.overrides]
        cmd += ["--resume"] if args.resume else []
    else:
        cmd = [sys.executable, str(ROOT / "examples" / "search.py")]
    if args.max_queries is not None:
        cmd += ["--max-queries", str(args.max_queries)]
    if args.cache is not None:
        cmd += ["--cache", args.cache]
    print("command:", " ".join(cmd))
    env = dict(os.environ, HAYSTACK_TELEMETRY_ENABLED="False", TOKENIZERS_PARALLELISM="false")
    if args.nproc > 1:
        env.setdefault("OMP_NUM_THREADS", "1")
    ranks: dict[str, int] = {}  # RANK -> peak RSS of that process
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"rss": 0, "at": 0.0}
    timeline: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample():
        p = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                children = p.children(recursive=True)
                rss = p.memory_info().rss + sum(c.memory_info().rss for c in children)
            except psutil.Error:
                break
            for child in children if args.nproc > 1 else ():
                try:
                    rank = child.environ().get("RANK")
                    if rank is not None:
                        ranks[rank] = max(ranks.get(rank, 0), child.memory_info().rss)
                except psutil.Error:
                    pass
            now = time.perf_counter() - started
            if rss > peak["rss"]:
                peak.update(rss=rss, at=now)
            if not timeline or now - timeline[-1][0] >= 10:
                timeline.append((round(now, 1), round(rss / 2**20)))
            stop.wait(args.interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    lines: list[tuple[float, str]] = []
    for line in proc.stdout:  # streamed, so a long run shows its progress
        lines.append((round(time.perf_counter() - started, 1), line.rstrip()))
        if args.train:
            print(f"[{lines[-1][0]:7.0f} s] {line.rstrip()}", flush=True)
    output = "\n".join(text for _, text in lines)
    proc.wait()
    elapsed = time.perf_counter() - started
    stop.set()
    sampler.join()
    maxrss_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    tail = [ln for ln in output.splitlines() if ln.strip() and "it/s]" not in ln and "s/it]" not in ln]
    print("\n".join("  | " + ln for ln in tail[-6:]))
    if args.timeline:
        import json

        Path(args.timeline).parent.mkdir(parents=True, exist_ok=True)
        Path(args.timeline).write_text(json.dumps({
            "command": cmd, "machine": machine(), "wall_s": round(elapsed), "peak_rss_mib": round(peak["rss"] / 2**20),
            "peak_at_s": round(peak["at"]), "ru_maxrss_mib": round(maxrss_kib / 1024),
            "peak_rss_mib_by_rank": {r: round(v / 2**20) for r, v in sorted(ranks.items())},
            "rss_mib": timeline, "log": lines}, indent=1))

    if proc.returncode != 0:
        print(f"{cmd[1]} failed with exit status {proc.returncode}")
        sys.exit(proc.returncode)
    print(f"wall time {elapsed:.0f} s")
    print(f"peak RSS (sampled every {args.interval} s): {peak['rss'] / 2**20:.0f} MiB at {peak['at']:.0f} s")
    print(f"peak RSS (ru_maxrss of the child):       {maxrss_kib / 1024:.0f} MiB")
    for rank, value in sorted(ranks.items()):
        print(f"peak RSS of rank {rank}:                    {value / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
