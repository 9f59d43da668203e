"""
Optimised encoder backends (issue 15): sentence-transformers' ``backend="onnx"`` / ``"openvino"`` through the
embedder and retriever options. The backend must survive serialisation; where its Optimum modules cannot be imported
(missing, or a release that does not support the installed transformers) loading fails with an ImportError that says
why; where they import, the ONNX embeddings must match torch's. The ONNX Runtime stand-in of
benchmarks/bench_encoder_backends.py is checked against torch too, so that its numbers measure the same encoder.
"""

import sys

import numpy as np
import pytest
from haystack import Document
from haystack.document_stores.in_memory import InMemoryDocumentStore
from haystack.utils import ComponentDevice

from expandr_haystack import ExpandRQueryEmbedder, ExpandRRetriever, RewardScorer, models
from expandr_haystack.models import encoder_backend_problem
from expandr_haystack.options import EncoderOptions

CPU = ComponentDevice.from_str("cpu")
TEXTS = ["what similarity laws must be obeyed by aeroelastic models ?",
         "buckling of thin cylindrical shells under axial compression",
         "flow separation in overexpanded rocket nozzles at high altitude and low chamber pressure"]
#: float32 ONNX Runtime vs torch on the same weights: different kernels, so equal to rounding only.
ATOL = 1e-4


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_backend_survives_serialisation(backend):
    embedder = ExpandRQueryEmbedder(encoder=EncoderOptions(backend=backend), query_weight=0.6)
    assert ExpandRQueryEmbedder.from_dict(embedder.to_dict()).encoder_options.backend == backend
    retriever = ExpandRRetriever(document_store=InMemoryDocumentStore(), query_embedder=embedder)
    back = ExpandRRetriever.from_dict(retriever.to_dict())
    assert back.query_embedder.encoder_options.backend == backend and back.embedder.encoder_options.backend == backend
    scorer = RewardScorer(encoder=EncoderOptions(backend=backend))
    assert RewardScorer.from_dict(scorer.to_dict())._embedder.encoder_options.backend == backend


@pytest.mark.parametrize(("backend", "module"), [("onnx", "optimum.onnxruntime"),
                                                 ("openvino", "optimum.intel.openvino")])
def test_unusable_backend_fails_with_the_reason(tiny_bert, monkeypatch, backend, module):
    monkeypatch.setattr(models, "_ENCODERS", {})
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError, installed or not
    assert encoder_backend_problem(backend) is not None
    assert encoder_backend_problem("torch") is None
    with pytest.raises(ImportError, match=rf"`backend`='{backend}' cannot load: `import "):
        ExpandRQueryEmbedder(model=tiny_bert, device=CPU, encoder=EncoderOptions(backend=backend)).warm_up()
    assert not models._ENCODERS  # nothing half-loaded is kept


def test_onnx_backend_matches_torch(tiny_bert):
    problem = encoder_backend_problem("onnx")
    if problem is not None:
        pytest.skip(f"sentence-transformers' ONNX backend cannot load here: {problem}")
    torch_embedder = ExpandRQueryEmbedder(model=tiny_bert, device=CPU)
    onnx_embedder = ExpandRQueryEmbedder(model=tiny_bert, device=CPU, encoder=EncoderOptions(backend="onnx"))
    torch_embedder.warm_up()
    onnx_embedder.warm_up()
    assert onnx_embedder._encoder is not torch_embedder._encoder
    np.testing.assert_allclose(onnx_embedder.encode(TEXTS), torch_embedder.encode(TEXTS), atol=ATOL)
    fused = onnx_embedder.run(query=TEXTS[0], expansions=TEXTS[1:])["embedding"]
    np.testing.assert_allclose(fused, torch_embedder.run(query=TEXTS[0], expansions=TEXTS[1:])["embedding"],
                               atol=ATOL)
    store = InMemoryDocumentStore(embedding_similarity_function="cosine")
    vectors = torch_embedder.encode(TEXTS)
    store.write_documents([Document(id=str(i), content=t, embedding=v.tolist())
                           for i, (t, v) in enumerate(zip(TEXTS, vectors))])
    hits = {}
    for name, embedder in (("torch", torch_embedder), ("onnx", onnx_embedder)):
        retriever = ExpandRRetriever(document_store=store, query_embedder=embedder, top_k=3)
        retriever.warm_up()
        hits[name] = [d.id for d in retriever.run(query=TEXTS[2])["documents"]]
    assert hits["onnx"] == hits["torch"] and hits["onnx"][0] == "2"


def _bench():
    from tests.conftest import load_benchmark

    return load_benchmark("bench_encoder_backends")


def test_benchmark_onnx_runtime_stand_in_matches_torch(tiny_bert, tmp_path):
    pytest.importorskip("onnxruntime", reason="the benchmark's ONNX Runtime variants need onnxruntime")
    pytest.importorskip("onnx", reason="exporting and quantising need the onnx package")
    bench = _bench()
    base = models.load_encoder(tiny_bert, "cpu")
    reference = bench.encode(base, TEXTS, 2)
    onnx_file = bench.export_onnx(base, tmp_path / "model.onnx")
    assert bench.export_onnx(base, onnx_file) == onnx_file  # exported once, reused
    fp32 = bench.ort_encoder(base, onnx_file, threads=1)
    assert not any(p.numel() for p in fp32[0].parameters())  # the torch weights are gone: ORT computes it
    np.testing.assert_allclose(bench.encode(fp32, TEXTS, 2), reference, atol=ATOL)
    int8 = bench.ort_encoder(base, bench.quantize_onnx(onnx_file, tmp_path / "int8.onnx", False), threads=1)
    cosine = (bench.encode(int8, TEXTS, 2) * reference).sum(1)
    assert cosine.min() > 0.9 and not np.allclose(cosine, 1.0, atol=1e-6)  # quantised: close, not identical
    assert np.allclose(bench.encode(base, TEXTS, 2), reference)  # the baseline encoder was not modified


def test_quantization_config_follows_the_cpu_flags():
    bench = _bench()
    assert bench.quantization_config({"avx2", "avx512f", "avx512_vnni"}) == ("avx512_vnni", False)
    assert bench.quantization_config({"avx2", "avx_vnni"}) == ("avx_vnni", False)
    assert bench.quantization_config({"avx2", "avx512f"}) == ("avx512", True)
    assert bench.quantization_config({"avx2"}) == ("avx2", True)
    assert bench.quantization_config({"neon"}) is None
