"""
The "ctranslate2" encoder backend (issue 26): the transformer converted once by CTranslate2 and run by its `Encoder`
inside the same sentence-transformers pipeline. Its vectors must match torch's (float32: to rounding; int8: close), the
conversion must be cached, bad options must be named, and the embedder / retriever must work with it end to end.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
from haystack import Document
from haystack.document_stores.in_memory import InMemoryDocumentStore
from haystack.utils import ComponentDevice

from expandr_haystack import ExpandRQueryEmbedder, ExpandRRetriever, models
from expandr_haystack.encoders import ctranslate2 as backend
from expandr_haystack.options import EncoderOptions

pytest.importorskip("ctranslate2", reason="backend='ctranslate2' needs the ctranslate2 package")

CPU = ComponentDevice.from_str("cpu")
TEXTS = ["what similarity laws must be obeyed by aeroelastic models ?",
         "buckling of thin cylindrical shells under axial compression",
         "flow separation in overexpanded rocket nozzles at high altitude and low chamber pressure"]
#: float32 CTranslate2 vs torch on the same weights: different kernels, so equal to rounding only.
ATOL = 1e-4


@pytest.fixture(autouse=True)
def fresh(monkeypatch, tmp_path):
    """Conversions into this test's folder; no encoder memoised by an earlier test."""
    monkeypatch.setenv("EXPANDR_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(models, "_ENCODERS", {})


def _options(**kwargs):
    return EncoderOptions(backend="ctranslate2", model_kwargs={"intra_threads": 1, **kwargs})


def test_vectors_match_torch(tiny_bert):
    torch_embedder = ExpandRQueryEmbedder(model=tiny_bert, device=CPU)
    fp32 = ExpandRQueryEmbedder(model=tiny_bert, device=CPU, encoder=_options(compute_type="float32"))
    int8 = ExpandRQueryEmbedder(model=tiny_bert, device=CPU, encoder=_options())
    reference = torch_embedder.encode(TEXTS)
    assert isinstance(fp32.encoder[0].model, backend.CTranslate2Transformer)
    assert not any(p.numel() for p in fp32.encoder[0].parameters())  # the torch weights are gone
    np.testing.assert_allclose(fp32.encode(TEXTS), reference, atol=ATOL)
    assert int8.encoder[0].model.compute_type == "int8"  # the backend's default
    cosine = (int8.encode(TEXTS) * reference).sum(1)
    assert cosine.min() > 0.95 and not np.allclose(int8.encode(TEXTS), reference, atol=1e-6)  # close, not identical
    assert int8.dimension == torch_embedder.dimension and int8.encode(TEXTS).dtype == np.float32
    np.testing.assert_allclose(torch_embedder.encode(TEXTS), reference)  # the torch encoder was not modified


def test_grouping_and_padding_do_not_change_vectors(tiny_bert):
    """One call per text, or all texts padded in one batch: the same vectors (padding never reaches CTranslate2)."""
    one = models.load_encoder(tiny_bert, "cpu", backend="ctranslate2",
                              model_kwargs={"compute_type": "float32", "max_batch_tokens": 1, "intra_threads": 1})
    assert one[0].model.groups([5, 5, 3]) == [[0], [1], [2]]
    models._ENCODERS.clear()
    whole = models.load_encoder(tiny_bert, "cpu", backend="ctranslate2",
                                model_kwargs={"compute_type": "float32", "max_batch_tokens": 10**6,
                                              "intra_threads": 1})
    assert whole[0].model.groups([5, 5, 3]) == [[0, 1, 2]]
    texts = TEXTS + ["a", "a much longer text " * 20]
    np.testing.assert_allclose(one.encode(texts, batch_size=8), whole.encode(texts, batch_size=8), atol=ATOL)
    assert backend.CTranslate2Transformer(None, None, Path("x"), "int8", 12).groups([4, 4, 4, 3, 2]) == \
        [[0, 1, 2], [3, 4]]


def test_conversion_is_cached(tiny_bert, monkeypatch, tmp_path):
    calls = []
    convert = backend._convert
    monkeypatch.setattr(backend, "_convert", lambda *a: (calls.append(a[1]), convert(*a))[1])
    first = models.load_encoder(tiny_bert, "cpu", backend="ctranslate2", model_kwargs={"intra_threads": 1})
    folder = first[0].model.path
    assert calls == [folder] and folder.parent == tmp_path / "home" / "encoders" / "ctranslate2"
    assert folder.name.endswith("-int8") and (folder / "model.bin").exists()
    models._ENCODERS.clear()  # a new process, as far as the memo knows
    second = models.load_encoder(tiny_bert, "cpu", backend="ctranslate2", model_kwargs={"intra_threads": 1})
    assert second is not first and second[0].model.path == folder and len(calls) == 1  # not converted again
    np.testing.assert_allclose(second.encode(TEXTS), first.encode(TEXTS), atol=1e-6)
    models.load_encoder(tiny_bert, "cpu", backend="ctranslate2",
                        model_kwargs={"compute_type": "float32", "intra_threads": 1})
    assert len(calls) == 2 and calls[1].name.endswith("-float32")  # another precision: its own conversion
    assert sorted(p.name for p in folder.parent.iterdir()) == sorted([folder.name, calls[1].name])  # no leftovers


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"compute_type": "int4"}, r"`model_kwargs\['compute_type'\]` must be one of .*'int4'"),
    ({"max_batch_tokens": 0}, r"`model_kwargs\['max_batch_tokens'\]` must be an int >= 1"),
    ({"intra_threads": -1}, r"`model_kwargs\['intra_threads'\]` must be an int >= 0"),
    ({"intra_threads": "2"}, r"`model_kwargs\['intra_threads'\]`"),
])
def test_bad_options_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EncoderOptions(backend="ctranslate2", model_kwargs=kwargs)
    with pytest.raises(ValueError, match=message):
        models.load_encoder(None, "cpu", backend="ctranslate2", model_kwargs=kwargs)


def test_options_of_this_backend_are_refused_elsewhere():
    with pytest.raises(ValueError, match=r"\['compute_type'\] are options of backend='ctranslate2'"):
        EncoderOptions(model_kwargs={"compute_type": "int8"})
    with pytest.raises(ValueError, match="`backend` must be one of"):
        EncoderOptions(backend="ct2")


def test_missing_package_says_how_to_install(tiny_bert, monkeypatch):
    monkeypatch.setitem(sys.modules, "ctranslate2", None)  # `import ctranslate2` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install ctranslate2"):
        ExpandRQueryEmbedder(model=tiny_bert, device=CPU, encoder=_options()).warm_up()
    assert not models._ENCODERS  # nothing half-loaded is kept


def test_unconvertible_model_and_device_are_refused(tiny_bert, monkeypatch):
    encoder = models.load_encoder(tiny_bert, "cpu")
    from transformers import GPT2Config

    monkeypatch.setattr(encoder[0].model, "config", GPT2Config(n_layer=1))
    with pytest.raises(ValueError, match=r"converts BERT-family encoders .* 'gpt2' \(GPT2Config\)"):
        backend.to_ctranslate2(encoder, "identity")
    monkeypatch.undo()

    class Meta:
        type = "cuda"

    monkeypatch.setattr(type(encoder), "device", property(lambda self: Meta()))
    with pytest.raises(ValueError, match="runs on the CPU only"):
        backend.to_ctranslate2(encoder, "identity")


def test_bad_conversion_is_caught_by_the_check(tiny_bert, monkeypatch, tmp_path):
    """A converted model that does not reproduce torch is refused at load, and the torch model is put back."""
    forward = backend.CTranslate2Transformer.forward

    def wrong(self, *args, **kwargs):
        return {"last_hidden_state": forward(self, *args, **kwargs)["last_hidden_state"].flip(-1)}

    monkeypatch.setattr(backend.CTranslate2Transformer, "forward", wrong)
    monkeypatch.setattr(backend.CTranslate2Transformer, "__call__", wrong)
    with pytest.raises(ValueError, match="does not reproduce the torch encoder"):
        models.load_encoder(tiny_bert, "cpu", backend="ctranslate2", model_kwargs={"intra_threads": 1})
    assert not models._ENCODERS  # nothing half-loaded is kept
    encoder = models.load_encoder(tiny_bert, "cpu")
    reference = encoder.encode(TEXTS)
    with pytest.raises(ValueError, match="does not reproduce the torch encoder"):
        backend.to_ctranslate2(encoder, "identity", intra_threads=1, root=tmp_path)
    assert any(p.numel() for p in encoder[0].parameters()) and encoder[0].model is encoder[0]._modules["model"]
    np.testing.assert_allclose(encoder.encode(TEXTS), reference)


def test_serialisation_and_retrieval_end_to_end(tiny_bert):
    embedder = ExpandRQueryEmbedder(model=tiny_bert, device=CPU, encoder=_options(compute_type="int8"),
                                    query_weight=0.6)
    back = ExpandRQueryEmbedder.from_dict(embedder.to_dict())
    assert back.encoder_options.backend == "ctranslate2"
    assert back.encoder_options.model_kwargs == {"intra_threads": 1, "compute_type": "int8"}
    torch_embedder = ExpandRQueryEmbedder(model=tiny_bert, device=CPU)
    store = InMemoryDocumentStore(embedding_similarity_function="cosine")
    vectors = torch_embedder.encode(TEXTS)  # documents indexed with torch, queries with CTranslate2
    store.write_documents([Document(id=str(i), content=t, embedding=v.tolist())
                           for i, (t, v) in enumerate(zip(TEXTS, vectors))])
    retriever = ExpandRRetriever(document_store=store, query_embedder=back, top_k=3)
    restored = ExpandRRetriever.from_dict(retriever.to_dict())
    assert restored.embedder.encoder_options.backend == "ctranslate2"
    restored.warm_up()
    assert restored.run(query=TEXTS[2])["documents"][0].id == "2"
    fused = back.run(query=TEXTS[0], expansions=TEXTS[1:])["embedding"]
    reference = torch_embedder.run(query=TEXTS[0], expansions=TEXTS[1:])["embedding"]
    assert float(np.dot(fused, reference) / np.linalg.norm(fused) / np.linalg.norm(reference)) > 0.95


@pytest.mark.integration
def test_bundled_minilm_int8_is_close_to_torch():
    torch_encoder = models.load_encoder(None, "cpu")
    ct2 = models.load_encoder(None, "cpu", backend="ctranslate2", model_kwargs={"intra_threads": 1})
    cosine = (ct2.encode(TEXTS, normalize_embeddings=True) * torch_encoder.encode(TEXTS, normalize_embeddings=True)
              ).sum(1)
    assert cosine.min() > 0.99


def _bench():
    from tests.conftest import load_benchmark

    return load_benchmark("bench_encoder_backends")


def test_benchmark_has_the_ctranslate2_variant():
    source = (Path(__file__).resolve().parents[2] / "benchmarks" / "bench_encoder_backends.py").read_text()
    assert 'backend="ctranslate2"' in source and "--ct2" in source
    assert _bench().GOAL == 2.0
