"""
The component checks of the GPU check (`benchmarks/gpu_check.sh`, issue #14), and its helpers.

    python benchmarks/gpu_components.py env                          # versions, the GPU, the CPU
    python benchmarks/gpu_components.py tiny-models DIR              # DIR/llm, DIR/encoder: tiny random-weight models
    python benchmarks/gpu_components.py check --device cuda [--llm DIR/llm --encoder DIR/encoder]
        [--dtypes bfloat16,float16,float32] [--max-new-tokens 16] [--json components.json]
    python benchmarks/gpu_components.py validate-config training/configs/gpu-check.yaml [--set device=cpu ...]

`check` runs each component on `--device` and fails (exit 1) on any error: the expander with the transformers
backend in every dtype of `--dtypes` (the loaded model's dtype and device, non-empty output, the same text again for
the same batch, cache hits for the same settings and none across dtypes; whether a row's text changes between a
batch and alone is *measured* and reported, not asserted, as the contract of `expandr_haystack.generation` says:
``queries_equal_alone_vs_batch`` counts queries whose expansions, dropped empty ones included, are the same),
`ExpandRQueryEmbedder`, `ExpandRRetriever` (mean, rrf, a metadata filter), `RewardScorer`, and a YAML round trip of
an expander -> retriever pipeline with the device. It prints one line per check and writes them all to `--json`.

`tiny-models` writes a random-weight Llama with the bundled SmolLM2 tokenizer and a random-weight BERT
sentence-transformer with the bundled MiniLM tokenizer (~11 MB together): the real weights do not fit a device
machine's 64 MiB transfer limit, and the checks are about devices and dtypes, not text quality.
"""

from __future__ import annotations

import os

os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import math
import platform
import shutil
import sys
import tempfile
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any

QUERIES = ["what similarity laws must be obeyed when constructing aeroelastic models of heated high speed aircraft .",
           "what problems of heat conduction in composite slabs have been solved so far .",
           "what is the lift of a wing in a propeller slipstream .",
           "how does a boundary layer behave at supersonic speeds ."]
PACKAGES = ("torch", "transformers", "tokenizers", "huggingface-hub", "sentence-transformers", "peft", "trl",
            "accelerate", "datasets", "pyarrow", "numpy", "haystack-ai", "faiss-cpu", "faiss-gpu", "vllm")


# -- env ---------------------------------------------------------------------------------------------------------
def env() -> int:
    import torch

    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPU cores")
    for name in PACKAGES:
        try:
            print(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            print(f"{name} (not installed)")
    print(f"torch CUDA build: {torch.version.cuda}; CUDA available: {torch.cuda.is_available()}")
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, bf16 supported: "
              f"{torch.cuda.is_bf16_supported()}")
    return 0


# -- tiny models -------------------------------------------------------------------------------------------------
def tiny_models(out: Path, seed: int = 0) -> dict[str, str]:
    """DIR/llm (random Llama, bundled SmolLM2 tokenizer) and DIR/encoder (random BERT sentence-transformer, bundled
    MiniLM tokenizer, mean pooling, normalised); returns their paths."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers import models as st_models
    from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    from expandr_haystack.models import resolve_encoder_path, resolve_llm_path

    torch.manual_seed(seed)
    llm_dir, encoder_dir = out / "llm", out / "encoder"
    tokenizer = AutoTokenizer.from_pretrained(resolve_llm_path(None))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                         else tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    for name, p in model.named_parameters():  # larger weights than the init: peaked next-token distributions (logit
        if "norm" not in name:                # sd ~8), so sampling looks at a few tokens as with real weights, not 49k
            p.data.normal_(0, 1.4 if "embed_tokens" in name else 0.2)
    model.save_pretrained(str(llm_dir))
    tokenizer.save_pretrained(str(llm_dir))

    bert_tokenizer = AutoTokenizer.from_pretrained(resolve_encoder_path(None))
    bert_dir = out / ".bert"
    BertModel(BertConfig(vocab_size=len(bert_tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=512)).save_pretrained(str(bert_dir))
    bert_tokenizer.save_pretrained(str(bert_dir))
    transformer = st_models.Transformer(str(bert_dir), max_seq_length=256)
    dimension = getattr(transformer, "get_embedding_dimension", None) or transformer.get_word_embedding_dimension
    pooling = st_models.Pooling(dimension(), "mean")
    SentenceTransformer(modules=[transformer, pooling, st_models.Normalize()], device="cpu").save(str(encoder_dir))

    shutil.rmtree(bert_dir, ignore_errors=True)
    return {"llm": str(llm_dir), "encoder": str(encoder_dir)}


# -- checks ------------------------------------------------------------------------------------------------------
class Checks:
    """Runs named checks; each records ok, seconds and details (or the error)."""

    def __init__(self):
        self.rows: list[dict[str, Any]] = []

    def run(self, name: str, fn) -> Any:
        started = time.perf_counter()
        row: dict[str, Any] = {"check": name}
        try:
            row["details"] = fn() or {}
            row["ok"] = True
        except Exception as exc:  # noqa: BLE001 - a check reports every failure, then the next one runs
            row["ok"], row["error"] = False, f"{type(exc).__name__}: {exc}"
            row["traceback"] = traceback.format_exc()
        row["seconds"] = round(time.perf_counter() - started, 2)
        self.rows.append(row)
        status = "ok  " if row["ok"] else "FAIL"
        print(f"{status} {name:<28} {row['seconds']:>7.2f} s  "
              f"{json.dumps(row.get('details', {}), default=str) if row['ok'] else row['error']}", flush=True)
        if not row["ok"]:
            print(row["traceback"], file=sys.stderr, flush=True)
        return row.get("details")


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def _identity(expander) -> str:
    """The precision part of an expander's sampler identity (after the model fingerprint)."""
    expander.warm_up()
    return expander._sampler.identity.split("@", 1)[1]


def _documents():
    from haystack import Document

    from expandr_haystack.evaluation.data import bundled_path, load_collection

    c = load_collection(bundled_path("cranfield"), split="test")
    ids = list(c.corpus)[:16]
    return [Document(id=i, content=c.corpus[i]["text"], meta={"title": c.corpus[i]["title"],
                                                               "group": "a" if k % 2 == 0 else "b"})
            for k, i in enumerate(ids)]


def check(device: str, llm: str | None, encoder: str | None, dtypes: list[str], max_new_tokens: int,
          json_path: str | None) -> int:
    import torch
    from haystack import Pipeline
    from haystack.utils import ComponentDevice

    from expandr_haystack import ExpandRQueryEmbedder, ExpandRRetriever, LLMQueryExpander, RewardScorer
    from expandr_haystack.evaluation.indexing import build_document_store
    from expandr_haystack.options import GenerationSettings, SamplerOptions

    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {device} but torch {torch.__version__} sees no CUDA GPU", file=sys.stderr)
        return 2
    kind = torch.device(device).type
    cdev = ComponentDevice.from_str(device)
    checks = Checks()
    work = Path(tempfile.mkdtemp(prefix="gpu-components-"))
    cache = str(work / "cache.sqlite")

    def expander(dtype: str, **kw) -> LLMQueryExpander:
        settings = {"model": llm, "n_expansions": 2,
                    "generation": GenerationSettings(max_new_tokens=max_new_tokens, batch_size=8, seed=7,
                                                     progress_bar=False),
                    "sampler": SamplerOptions(engine="transformers", dtype=dtype, device=cdev, max_retries=0)}
        return LLMQueryExpander(**(settings | kw))

    for dtype in dtypes:
        def expander_check(dtype=dtype):
            e = expander(dtype, cache=cache)
            e.warm_up()
            params = {(p.dtype, p.device.type) for p in e._sampler.model.parameters()}
            _expect(params == {(getattr(torch, dtype), kind)}, f"model loaded as {params}")
            _expect(e.engine in ("transformers", "transformers+eog"), f"engine {e.engine}")
            first = e.expand(QUERIES)
            _expect(len(first) == len(QUERIES) and all(len(x) <= 2 for x in first) and any(t for x in first for t in x),
                    f"no text: {first}")
            again = expander(dtype).expand(QUERIES)  # no cache: the same batch generates the same text
            _expect(again == first, "the same batch gave other text")
            stats = dict(e.cache_stats)
            e.expand(QUERIES)
            hits = e.cache_stats["hits"] - stats["hits"]
            alone = [expander(dtype).expand([q])[0] for q in QUERIES]
            return {"dtype": dtype, "rows": sum(len(x) for x in first), "cache_hits_on_repeat": hits,
                    "rows_equal_alone_vs_batch": sum(a == b for x, y in zip(first, alone) for a, b in zip(x, y)),
                    "queries_equal_alone_vs_batch": f"{sum(x == y for x, y in zip(first, alone))}/{len(QUERIES)}",
                    "failures": sum(e.last_failures.values()) if e.last_failures else 0}

        checks.run(f"expander[{dtype}]", expander_check)

    def cache_keys_apart():
        hits = {}
        for dtype in dtypes:
            e = expander(dtype, cache=cache)
            before = dict(e.cache_stats)
            e.expand(QUERIES[:1])
            hits[dtype] = e.cache_stats["hits"] - before["hits"]
        # each dtype's own rows were cached above; a row of another dtype must never be served (keys differ)
        keys = {d: {r.key for r in expander(d)._plan(QUERIES, None, None, None, None)} for d in dtypes}
        overlap = [(a, b) for a in dtypes for b in dtypes if a < b and keys[a] & keys[b]]
        _expect(not overlap, f"cache keys shared between dtypes {overlap}")
        return {"hits_per_dtype": hits, "identities": [_identity(expander(d)) for d in dtypes]}

    if len(dtypes) > 1:
        checks.run("cache keys per dtype", cache_keys_apart)

    def embedder_check():
        from expandr_haystack import models

        out = ExpandRQueryEmbedder(model=encoder, device=cdev).run(QUERIES[0], expansions=["a passage", "another"])
        v = out["embedding"]
        _expect(len(v) > 0 and all(math.isfinite(x) for x in v), "bad embedding")
        devices = {str(m.device) for m in getattr(models, "_ENCODERS", {}).values()}
        _expect(all(d.startswith(kind) for d in devices), f"encoder on {devices}")
        return {"dimension": len(v), "encoder_devices": sorted(devices)}

    checks.run("embedder", embedder_check)
    stores = []

    def store_check():
        stores.append(build_document_store(_documents(), model=encoder, device=cdev, progress_bar=False))
        return {"documents": stores[0].count_documents()}

    checks.run("document store", store_check)
    store = stores[0] if stores else None

    def retriever_check():
        _expect(store is not None, "no document store")
        out = {}
        for fusion in ("mean", "rrf"):
            r = ExpandRRetriever(store, model=encoder, top_k=5, fusion=fusion, device=cdev)
            docs = r.run(QUERIES[1], expansions=["heat conduction in layered slabs"])["documents"]
            _expect(len(docs) == 5, f"{fusion}: {len(docs)} documents")
            out[fusion] = [d.id for d in docs]
        r = ExpandRRetriever(store, model=encoder, top_k=5, device=cdev)
        docs = r.run(QUERIES[1], expansions=["heat"], filters={"field": "meta.group", "operator": "==",
                                                                "value": "a"})["documents"]
        _expect(docs and all(d.meta["group"] == "a" for d in docs), "the filter let other documents through")
        out["filtered"] = len(docs)
        return out

    checks.run("retriever mean/rrf/filters", retriever_check)

    def reward_check():
        docs = _documents()
        out = RewardScorer(model=encoder, threshold=0.0, device=cdev).run(
            QUERIES[1], expansions=["heat in slabs", "wing lift", "supersonic flow"], document=docs[0],
            answer="composite slab conduction")
        _expect(len(out["rewards"]) == 3 and all(math.isfinite(x) for x in out["rewards"]), f"rewards {out}")
        return {"rewards": [round(x, 3) for x in out["rewards"]], "kept": out["kept"]}

    checks.run("reward scorer", reward_check)

    def yaml_check():
        _expect(store is not None, "no document store")
        p = Pipeline()
        p.add_component("expander", expander(dtypes[0]))
        p.add_component("retriever", ExpandRRetriever(store, model=encoder, top_k=5, device=cdev))
        p.connect("expander.query", "retriever.query")
        p.connect("expander.expansions", "retriever.expansions")
        text = p.dumps()
        _expect(device.split(":")[0] in text, "the device is not in the YAML")
        loaded = Pipeline.loads(text)
        loaded_store = loaded.get_component("retriever").document_store
        if loaded_store.count_documents() == 0:  # a store that does not share the original's index: same documents
            loaded_store.write_documents(store.filter_documents())
        before = p.run({"expander": {"query": QUERIES[2]}})["retriever"]["documents"]
        after = loaded.run({"expander": {"query": QUERIES[2]}})["retriever"]["documents"]
        _expect([d.id for d in before] == [d.id for d in after], "the round trip changed the result")
        return {"documents": len(after), "yaml_bytes": len(text)}

    checks.run("yaml round trip", yaml_check)

    failed = [r["check"] for r in checks.rows if not r["ok"]]
    report = {"device": device, "dtypes": dtypes, "llm": llm, "encoder": encoder, "checks": checks.rows,
              "failed": failed}
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=1, default=str))
    print(f"{len(checks.rows) - len(failed)} of {len(checks.rows)} checks passed on {device}"
          + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


# -- validate-config ---------------------------------------------------------------------------------------------
def validate_config(path: str, overrides: list[str]) -> int:
    from expandr_haystack.training.cli import parse_overrides
    from expandr_haystack.training.config import ConfigError, JointConfig

    try:
        config = JointConfig.from_yaml(path, parse_overrides(overrides))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    c = config
    print(f"{path}: valid ({c.rounds} rounds, device {c.device}, llm {c.llm}, encoder {c.encoder}, retriever bf16 "
          f"{c.retriever.bf16}, {c.retriever.hard_negatives} hard negatives, DPO {c.dpo.per_device_train_batch_size}x"
          f"{c.dpo.gradient_accumulation_steps}, gradient checkpointing {c.dpo.gradient_checkpointing})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="versions, GPU, CPU")
    t = sub.add_parser("tiny-models", help="write DIR/llm and DIR/encoder (tiny random weights)")
    t.add_argument("dir")
    c = sub.add_parser("check", help="the component checks")
    c.add_argument("--device", default="cuda")
    c.add_argument("--llm", default=None, help="causal LM folder (default: the bundled SmolLM2)")
    c.add_argument("--encoder", default=None, help="sentence-transformers folder (default: the bundled MiniLM)")
    c.add_argument("--dtypes", default="bfloat16,float16,float32")
    c.add_argument("--max-new-tokens", type=int, default=16)
    c.add_argument("--json", default=None)
    v = sub.add_parser("validate-config", help="validate a training config with --set overrides")
    v.add_argument("config")
    v.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args(argv)
    if args.command == "env":
        return env()
    if args.command == "tiny-models":
        print(json.dumps(tiny_models(Path(args.dir))))
        return 0
    if args.command == "validate-config":
        return validate_config(args.config, args.overrides)
    return check(args.device, args.llm, args.encoder, [d.strip() for d in args.dtypes.split(",") if d.strip()],
                 args.max_new_tokens, args.json)


if __name__ == "__main__":
    sys.exit(main())
