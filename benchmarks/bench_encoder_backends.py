"""
Encoder backends for indexing (issue 15, goal 2): documents/s of `SentenceTransformer.encode` on the same texts with
an optimised inference backend, as a ratio to raw torch float32 `encode` measured in the same run (interleaved
repeats, medians), one-query encoding latency, and retrieval quality (nDCG@10, dense, no expansion).

Variants (every one is a full `SentenceTransformer.encode`: the same tokenisation, length sorting, pooling and
normalisation; only the transformer's forward pass differs):

- ``torch``: the baseline, `load_encoder(None, "cpu")` (float32).
- ``st-onnx`` / ``st-openvino``: sentence-transformers' own ``backend="onnx"`` / ``"openvino"`` through
  `load_encoder(backend=...)` (Optimum). Reported as unavailable, with the reason, where they do not load.
- ``ort-fp32`` / ``ort-int8``: the same ONNX Runtime engine Optimum wraps, without Optimum: the transformer is
  exported with `torch.onnx.export` once into ``--work`` and run by an `onnxruntime.InferenceSession` in place of the
  torch module; ``ort-int8`` is that graph dynamically quantised (int8 weights, per channel), with the configuration
  picked from the CPU flags detected at run time (avx512_vnni: full 8-bit weights; avx512 / avx2 without VNNI:
  7-bit weights, ``reduce_range``, as ONNX Runtime advises; others: none). Needs ``onnxruntime`` and ``onnx``.
- ``ct2-<compute_type>`` (issue 26): the package's own ``backend="ctranslate2"`` through `load_encoder`: the
  transformer converted by CTranslate2 (cached under ``$EXPANDR_HOME/encoders/ctranslate2``) and run by its
  `Encoder`, ``--ct2`` compute types (default int8), ``--ct2-max-batch-tokens`` tokens per CTranslate2 call, with
  ``--threads`` (or torch's count) as its ``intra_threads``. Needs ``ctranslate2``.

Quality: nDCG@10 on the bundled Cranfield test split (all 1,400 documents; ``--no-quality`` skips it), and with
``--scifact DIR`` (a BEIR folder) on SciFact dev over a reduced corpus: every document judged for a dev query plus
``--scifact-distractors`` others drawn with a fixed seed (0 = the whole corpus), plus the mean and minimum cosine
between each variant's document vectors and torch's.

    python benchmarks/bench_encoder_backends.py [--docs 256] [--repeats 3] [--threads N] [--fused] [--work DIR]
        [--ct2 int8,float32] [--ct2-max-batch-tokens 256] [--scifact DIR] [--no-quality]

The run is long on a busy two-core machine (each variant encodes Cranfield once more for quality): keep ``--docs``
small there.
"""

from __future__ import annotations

import os

os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import copy
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Set as AbstractSet
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np
from _common import machine

from expandr_haystack.evaluation.data import bundled_path, load_collection
from expandr_haystack.evaluation.metrics import evaluate_run
from expandr_haystack.generation.quantize import cpu_flags
from expandr_haystack.models import load_encoder

GOAL = 2.0


def quantization_config(flags: AbstractSet[str]) -> tuple[str, bool] | None:
    """(name, reduce_range) of the dynamic int8 configuration for this CPU, or None where none fits (not x86)."""
    if "avx512_vnni" in flags or "avx_vnni" in flags:
        return ("avx512_vnni" if "avx512_vnni" in flags else "avx_vnni"), False
    if "avx512f" in flags:
        return "avx512", True
    if "avx2" in flags:
        return "avx2", True
    return None


class _OrtTransformer:
    """Stands in for the Hugging Face model inside sentence-transformers' `Transformer` module: the same keyword
    inputs, `{"last_hidden_state": tensor}` out, computed by an ONNX Runtime session."""

    def __init__(self, session, config):
        import torch

        self.torch = torch
        self.session = session
        self.config = config
        self.inputs = [i.name for i in session.get_inputs()]

    def forward(self, **features):
        feed = {name: features[name].cpu().numpy() for name in self.inputs}
        return {"last_hidden_state": self.torch.from_numpy(self.session.run(None, feed)[0])}

    __call__ = forward


def export_onnx(encoder, path: Path) -> Path:
    """Export the encoder's transformer (inputs as its tokenizer gives them) to `path` once; reuse it afterwards."""
    import torch

    if path.exists():
        return path
    hf = encoder[0].auto_model.eval()
    sample = encoder.tokenize(["a short text", "a somewhat longer second text to pad"])
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in sample]

    class Wrapper(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, *args):
            return self.model(**dict(zip(names, args)), return_dict=True).last_hidden_state

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Wrapper(hf), tuple(sample[n] for n in names), str(tmp), dynamo=False, opset_version=17,
                          input_names=names, output_names=["last_hidden_state"],
                          dynamic_axes={n: {0: "batch", 1: "sequence"} for n in [*names, "last_hidden_state"]})
    tmp.rename(path)
    return path


def quantize_onnx(source: Path, target: Path, reduce_range: bool) -> Path:
    if target.exists():
        return target
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = target.with_suffix(".partial.onnx")
    # DefaultTensorType: the fused graph's contrib operators (BiasGelu, ...) have no shape-inferred type
    quantize_dynamic(str(source), str(tmp), weight_type=QuantType.QInt8, per_channel=True, reduce_range=reduce_range,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    tmp.rename(target)
    return target


def fuse_onnx(source: Path, target: Path, config) -> Path:
    """ONNX Runtime's transformer optimiser on an export of the eager-attention model: fused embedding + LayerNorm,
    Attention, BiasGelu and SkipLayerNorm kernels (what Optimum's optimisation levels O2+ apply). Returns `target`."""
    if target.exists():
        return target
    from onnxruntime.transformers import optimizer

    tmp = target.with_suffix(".partial.onnx")
    fused = optimizer.optimize_model(str(source), model_type="bert", num_heads=config.num_attention_heads,
                                     hidden_size=config.hidden_size)
    print(f"fused operators: { {k: v for k, v in fused.get_fused_operator_statistics().items() if v} }")
    fused.save_model_to_file(str(tmp))
    tmp.rename(target)
    return target


def ort_encoder(base, onnx_file: Path, threads: int):
    """A copy of `base` whose transformer runs in ONNX Runtime (same tokenizer, pooling, normalisation)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    encoder = copy.deepcopy(base)
    module = encoder[0]
    stand_in = _OrtTransformer(session, module.model.config)
    module._modules.pop("model", None)  # no torch weights left behind: the session computes the forward pass
    object.__setattr__(module, "model", stand_in)
    return encoder


class _Skipped(Exception):
    """No ONNX Runtime variant asked for (`--only`): nothing to export."""


def encode(encoder, texts, batch_size):
    return encoder.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                          show_progress_bar=False)


def timed_interleaved(fns, repeats):
    """Wall and CPU seconds of each function, alternating within a round, order reversed every other round."""
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            w, c = time.perf_counter(), time.process_time()
            fns[name]()
            wall[name].append(time.perf_counter() - w)
            cpu[name].append(time.process_time() - c)
    return wall, cpu


def dense_ndcg(encoder, collection, doc_ids, batch_size):
    """nDCG@10 (x100) of dense retrieval over `doc_ids` with `encoder`, and the document vectors."""
    texts = [f"{collection.corpus[d]['title']}\n{collection.corpus[d]['text']}" for d in doc_ids]
    docs = encode(encoder, texts, batch_size)
    qids = list(collection.queries)
    queries = encode(encoder, [collection.queries[q] for q in qids], batch_size)
    scores = queries @ docs.T
    run = {}
    for i, q in enumerate(qids):
        top = np.argsort(-scores[i])[:10]
        run[q] = {doc_ids[j]: float(scores[i, j]) for j in top}
    means, _ = evaluate_run(collection.qrels, run)
    return 100 * means["ndcg@10"], docs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=256, help="Cranfield documents timed (default 256 of 1,400)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--latency-queries", type=int, default=20, help="one-query encodes per variant (median)")
    parser.add_argument("--work", default=None, help="folder for the ONNX exports (default: a temporary one)")
    parser.add_argument("--no-quality", action="store_true", help="skip nDCG@10 (the longest part)")
    parser.add_argument("--scifact", default=None, help="a BEIR SciFact folder: also measure nDCG@10 on dev")
    parser.add_argument("--scifact-distractors", type=int, default=400)
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for torch and ONNX Runtime alike (default: torch's default)")
    parser.add_argument("--fused", action="store_true",
                        help="also ort-fp32-fused / ort-int8-fused: ONNX Runtime's transformer optimiser applied")
    parser.add_argument("--only", default=None, help="comma-separated variants to run besides torch")
    parser.add_argument("--no-speed", action="store_true", help="skip throughput and latency (quality only)")
    parser.add_argument("--quality-variants", default=None,
                        help="comma-separated variants whose quality is measured (default: all)")
    parser.add_argument("--no-cranfield", action="store_true", help="skip the Cranfield quality (SciFact only)")
    parser.add_argument("--ct2", default="int8",
                        help="comma-separated CTranslate2 compute types, one ct2-<type> variant each ('' = none)")
    parser.add_argument("--ct2-max-batch-tokens", type=int, default=None,
                        help="tokens per CTranslate2 call (default: the backend's, 256)")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    flags = cpu_flags()
    print(f"machine: {machine()}")
    print(f"cpu: {platform.processor() or platform.machine()}, SIMD flags: "
          f"{' '.join(sorted(f for f in flags if f.startswith(('avx', 'amx', 'sse4', 'fma', 'vnni'))))}")
    threads = torch.get_num_threads()
    collection = load_collection(bundled_path("cranfield"), "test")
    doc_ids = list(collection.corpus)
    texts = [f"{collection.corpus[d]['title']}\n{collection.corpus[d]['text']}" for d in doc_ids[: args.docs]]

    base = load_encoder(None, "cpu")
    variants = {"torch": base}
    unavailable = {}
    for backend in ("onnx", "openvino"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                variants[f"st-{backend}"] = load_encoder(None, "cpu", backend=backend)
        except Exception as exc:  # noqa: BLE001 - reported, not hidden
            unavailable[f"st-{backend}"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    try:
        if args.only and not any(name.startswith("ort-") for name in args.only.split(",")):
            raise _Skipped
        import onnx  # noqa: F401 - torch.onnx.export needs it (a non-ImportError otherwise)
        import onnxruntime  # noqa: F401

        work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="expandr-onnx-"))
        started = time.perf_counter()
        fp32 = export_onnx(base, work / "model.onnx")
        print(f"ONNX export: {fp32} ({fp32.stat().st_size / 2**20:.1f} MiB, {time.perf_counter() - started:.1f} s)")
        variants["ort-fp32"] = ort_encoder(base, fp32, threads)
        config = quantization_config(flags)
        if config is None:
            unavailable["ort-int8"] = "no int8 configuration for this CPU (needs avx2, avx512 or VNNI)"
        else:
            started = time.perf_counter()
            int8 = quantize_onnx(fp32, work / f"model_qint8_{config[0]}.onnx", config[1])
            print(f"int8 config {config[0]} (reduce_range={config[1]}): {int8.name} "
                  f"({int8.stat().st_size / 2**20:.1f} MiB, {time.perf_counter() - started:.1f} s)")
            variants["ort-int8"] = ort_encoder(base, int8, threads)
        if args.fused:
            eager = load_encoder(None, "cpu", model_kwargs={"attn_implementation": "eager"})
            fused = fuse_onnx(export_onnx(eager, work / "model_eager.onnx"), work / "model_fused.onnx",
                              base[0].auto_model.config)
            variants["ort-fp32-fused"] = ort_encoder(base, fused, threads)
            if config is not None:
                int8 = quantize_onnx(fused, work / f"model_fused_qint8_{config[0]}.onnx", config[1])
                variants["ort-int8-fused"] = ort_encoder(base, int8, threads)
    except ImportError as exc:
        unavailable["ort-fp32"] = unavailable["ort-int8"] = f"ImportError: {exc}"
    except _Skipped:
        pass
    for compute_type in filter(None, args.ct2.split(",")):
        options = {"compute_type": compute_type, "intra_threads": threads}
        if args.ct2_max_batch_tokens:
            options["max_batch_tokens"] = args.ct2_max_batch_tokens
        try:
            started = time.perf_counter()
            variants[f"ct2-{compute_type}"] = load_encoder(None, "cpu", backend="ctranslate2", model_kwargs=options)
            print(f"ct2-{compute_type}: {variants[f'ct2-{compute_type}'][0].model} "
                  f"(loaded in {time.perf_counter() - started:.1f} s)")
        except (ImportError, ValueError) as exc:
            unavailable[f"ct2-{compute_type}"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    if args.only:
        keep = {"torch", *args.only.split(",")}
        variants = {k: v for k, v in variants.items() if k in keep}
    for name, why in unavailable.items():
        print(f"{name}: unavailable ({why})")

    if not args.no_speed:
        speed(args, variants, texts, collection, threads)
    if args.no_quality:
        return
    if args.quality_variants:
        variants = {k: v for k, v in variants.items() if k in args.quality_variants.split(",")}
    quality(args, variants, collection, doc_ids)


def speed(args, variants, texts, collection, threads) -> None:
    # Throughput: the same texts, interleaved repeats, after one warm call each.
    fns = {name: (lambda enc=enc: encode(enc, texts, args.batch_size)) for name, enc in variants.items()}
    for fn in fns.values():
        fn()
    wall, cpu = timed_interleaved(fns, args.repeats)
    print(f"\n{len(texts)} Cranfield documents, batch size {args.batch_size}, {threads} threads, "
          f"{args.repeats} interleaved repeats (medians)")
    base_dps = len(texts) / statistics.median(wall["torch"])
    base_cpu = statistics.median(cpu["torch"]) / len(texts)
    print(f"{'variant':16} {'docs/s':>8} {'ratio':>7} {'CPU ms/doc':>11} {'CPU ratio':>9}   wall s (min..max)")
    for name in variants:
        dps = len(texts) / statistics.median(wall[name])
        cms = statistics.median(cpu[name]) / len(texts)
        print(f"{name:16} {dps:8.1f} {dps / base_dps:6.2f}x {1000 * cms:11.1f} {base_cpu / cms:8.2f}x   "
              f"{statistics.median(wall[name]):.2f} ({min(wall[name]):.2f}..{max(wall[name]):.2f})")
        if name != "torch":
            print(f"{'':16} goal >= {GOAL}x raw torch: {'met' if dps / base_dps >= GOAL else 'MISSED'}")

    # One-query latency: the first Cranfield queries, one at a time, interleaved.
    queries = list(collection.queries.values())[: args.latency_queries]
    latency = {name: [] for name in variants}
    for q in queries:
        for name, enc in variants.items():
            started = time.perf_counter()
            enc.encode([q], normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
            latency[name].append(1000 * (time.perf_counter() - started))
    print(f"\none-query latency over {len(queries)} queries (median ms, min..max)")
    for name, ms in latency.items():
        print(f"{name:16} {statistics.median(ms):8.1f}  ({min(ms):.1f}..{max(ms):.1f})")


def quality(args, variants, collection, doc_ids) -> None:
    print("\nquality: nDCG@10 x100, dense retrieval, no expansion; cosine to the first variant listed")
    reference = {}
    for name, enc in variants.items() if not args.no_cranfield else ():
        started = time.perf_counter()
        ndcg, vectors = dense_ndcg(enc, collection, doc_ids, args.batch_size)
        reference.setdefault("cranfield", vectors)
        cos = (vectors * reference["cranfield"]).sum(1)
        print(f"cranfield test ({len(doc_ids)} docs, {len(collection.queries)} queries) {name:10} {ndcg:6.2f}  "
              f"cosine mean {cos.mean():.5f} min {cos.min():.5f}  ({time.perf_counter() - started:.0f} s)",
              flush=True)
    if args.scifact:
        scifact = load_collection(args.scifact, "dev")
        judged = sorted({d for q in scifact.qrels.values() for d in q if d in scifact.corpus})
        rest = sorted(set(scifact.corpus) - set(judged))
        if args.scifact_distractors:
            rest = random.Random(0).sample(rest, min(args.scifact_distractors, len(rest)))
        ids = judged + rest
        for name, enc in variants.items():
            started = time.perf_counter()
            ndcg, vectors = dense_ndcg(enc, scifact, ids, args.batch_size)
            reference.setdefault("scifact", vectors)
            cos = (vectors * reference["scifact"]).sum(1)
            print(f"scifact dev ({len(ids)} of {len(scifact.corpus)} docs, {len(scifact.queries)} queries) "
                  f"{name:10} {ndcg:6.2f}  cosine mean {cos.mean():.5f} min {cos.min():.5f}  "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
