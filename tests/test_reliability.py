"""
Reliability rows of docs/reliability.md that no other test file covers: bad input on the retrieval side, adapters
for another base model, cache faults (locked, read-only, concurrent expanders), a flaky remote chat generator
(retries, backoff, skip, cache), secrets, and SIGKILL + --resume of joint training.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import multiprocessing as mp
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import types
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from haystack import Document, component, default_to_dict
from haystack.dataclasses import ChatMessage
from haystack.utils import Secret

from expandr_haystack import ExpandRQueryEmbedder, ExpandRRetriever, LLMQueryExpander
from expandr_haystack.cache import ExpansionCache
from expandr_haystack.options import GenerationSettings, SamplerOptions

ROOT = Path(__file__).parents[1]
QUERIES = ["what is the lift of a wing in a propeller slipstream .",
           "what problems of heat conduction in composite slabs have been solved so far ."]


# -- a scriptable stand-in for a remote ChatGenerator (OpenAIChatGenerator & co.) ----------------------------------
@component
class FakeChatGenerator:
    """
    Replies from a script: each entry is "ok", "empty", "timeout" or "error" (the last entry repeats).
    Counts calls; `api_key` is a Secret like the real remote generators'.
    """

    def __init__(self, script: list[str] | None = None, api_key: Secret | None = None,
                 text: str = "Lift in a slipstream rises with the dynamic pressure behind the propeller."):
        self.script = list(script or ["ok"])
        self.api_key = api_key or Secret.from_env_var("FAKE_API_KEY")
        self.text = text
        self.calls = 0
        self.seen_messages: list[list[ChatMessage]] = []

    def to_dict(self) -> dict[str, Any]:
        return default_to_dict(self, script=self.script, api_key=self.api_key.to_dict(), text=self.text)

    def _reply(self, messages) -> dict[str, Any]:
        self.api_key.resolve_value()  # a real client would send it
        step = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        self.seen_messages.append(messages)
        if step == "timeout":
            raise TimeoutError("Request timed out.")
        if step == "error":
            raise ConnectionError("HTTP 503 from the remote model")
        if step == "empty":
            return {"replies": [ChatMessage.from_assistant("")]}
        return {"replies": [ChatMessage.from_assistant(f"Sure! Here is a passage: {self.text} ({self.calls})")]}

    @component.output_types(replies=list[ChatMessage])
    def run(self, messages: list[ChatMessage], generation_kwargs: dict[str, Any] | None = None):
        return self._reply(messages)

    @component.output_types(replies=list[ChatMessage])
    async def run_async(self, messages: list[ChatMessage], generation_kwargs: dict[str, Any] | None = None):
        return self._reply(messages)


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv("FAKE_API_KEY", "sk-test-0123456789abcdef-SECRET")
    return "sk-test-0123456789abcdef-SECRET"


@pytest.fixture
def sleeps(monkeypatch):
    """Record (and skip) every backoff wait, sync and async."""
    waits: list[float] = []

    async def fake_async_sleep(seconds, *args, **kwargs):
        waits.append(seconds)

    monkeypatch.setattr(asyncio, "sleep", fake_async_sleep)
    monkeypatch.setattr(time, "sleep", lambda seconds: waits.append(seconds))
    return waits


# -- query: None / non-string / huge, on the retrieval side (the expander side is in test_bad_input.py) -------------
@pytest.mark.parametrize("query", [None, 42, ["a list"], b"bytes", "", "   "])
def test_retriever_and_embedder_reject_bad_queries_naming_query(query):
    from haystack.document_stores.in_memory import InMemoryDocumentStore

    with pytest.raises((TypeError, ValueError), match="`query`"):
        ExpandRRetriever(InMemoryDocumentStore()).run(query=query)
    with pytest.raises((TypeError, ValueError), match="`query`"):
        ExpandRQueryEmbedder().run(query=query)


def test_retriever_bad_expansions_and_top_k_are_named():
    from haystack.document_stores.in_memory import InMemoryDocumentStore

    r = ExpandRRetriever(InMemoryDocumentStore())
    with pytest.raises(TypeError, match="`expansions` must be a list"):
        r.run(query="lift", expansions="one passage, not a list")
    with pytest.raises(TypeError, match=r"`expansions\[1\]`"):
        r.retrieve(["lift", "drag"], [["ok"], "not a list"])
    with pytest.raises(TypeError, match="`queries`"):
        r.retrieve("lift")
    with pytest.raises(ValueError, match=r"`queries\[1\]`"):
        r.retrieve(["lift", " "])
    for top_k in (0, -3, 2.5):
        with pytest.raises(ValueError, match="`top_k`"):
            r.run(query="lift", top_k=top_k)


def test_bad_expansions_are_named():
    with pytest.raises(TypeError, match=r"`expansions\[0\]`"):
        ExpandRQueryEmbedder().embed_fused(["lift"], ["not a list"])
    with pytest.raises(TypeError, match=r"`expansions\[0\]\[1\]`"):
        ExpandRQueryEmbedder().embed_fused(["lift"], [["ok", None]])


@pytest.mark.integration
def test_control_characters_and_invalid_unicode_reach_the_retriever_cleaned(small_store):
    r = ExpandRRetriever(small_store, top_k=3)
    clean = r.run(query="heat conduction in composite slabs", expansions=["layered slabs conduct heat"])
    dirty = r.run(query="heat\x00 conduction\x07 in composite slabs\x1b",
                  expansions=["layered\x00 slabs conduct heat"])
    assert [d.id for d in dirty["documents"]] == [d.id for d in clean["documents"]]
    docs = r.run(query="bad \ud800 unicode about slabs", expansions=["lone \udc80 surrogate"])["documents"]
    assert len(docs) == 3
    with pytest.raises(ValueError, match="`query` contains only control characters"):
        r.run(query="\x00\x01")


@pytest.mark.integration
def test_100k_character_query_through_embedder_and_retriever(small_store):
    """sentence-transformers cuts the text to the encoder's max_seq_length (256 tokens): no crash, normal result."""
    long_query = "aeroelastic models of heated high speed aircraft " * 2100
    assert len(long_query) >= 100_000
    emb = ExpandRQueryEmbedder()
    assert emb.encoder.max_seq_length == 256
    vec = emb.run(query=long_query, expansions=["a passage about flutter"])["embedding"]
    assert len(vec) == 384
    docs = ExpandRRetriever(small_store, top_k=3).run(query=long_query, expansions=[long_query])["documents"]
    assert len(docs) == 3


# -- models: an adapter made for another base model --------------------------------------------------------------
def _fake_adapter(path: Path, base: str, target_modules: list[str], shapes: dict[str, tuple[int, int]] | None = None):
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": 4, "lora_alpha": 8,
        "lora_dropout": 0.0, "target_modules": target_modules, "bias": "none", "inference_mode": True}))
    if shapes:
        save_file({k: torch.zeros(v) for k, v in shapes.items()}, str(path / "adapter_model.safetensors"))


@pytest.mark.integration
def test_adapter_for_another_base_model_is_a_clear_error(tmp_path):
    from expandr_haystack.models import load_llm

    # 1. target modules the base model does not have (a Falcon adapter: "query_key_value")
    foreign = tmp_path / "falcon-adapter"
    _fake_adapter(foreign, "tiiuae/falcon-7b", ["query_key_value"])
    with pytest.raises(ValueError, match=r"`adapter` .*falcon-adapter.* does not fit the base model"):
        load_llm(None, str(foreign), "cpu", "float32")
    # 2. the right module names but the shapes of a bigger model (hidden size 4096, SmolLM2-135M has 576)
    bigger = tmp_path / "llama-8b-adapter"
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    _fake_adapter(bigger, "meta-llama/Meta-Llama-3-8B-Instruct", ["q_proj"],
                  {f"{prefix}.lora_A.weight": (4, 4096), f"{prefix}.lora_B.weight": (4096, 4)})
    with pytest.raises(ValueError, match=r"`adapter` .*llama-8b-adapter.* does not fit the base model"):
        load_llm(None, str(bigger), "cpu", "float32")
    # through the component: the same message at warm_up
    with pytest.raises(ValueError, match="`adapter`"):
        LLMQueryExpander(adapter=str(bigger), generation=GenerationSettings(max_new_tokens=4)).warm_up()


# -- models: an LLM `model` that is not a model -------------------------------------------------------------------
def test_llm_model_that_is_not_a_model_is_named_at_construction(tmp_path):
    """A file that is not GGUF, or a folder without config.json, as `model` (before: transformers' JSON or tokenizer
    errors at warm_up, naming neither `model` nor what was expected); a GGUF file (magic bytes) is accepted."""
    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    with pytest.raises(ValueError, match=r"`model`: '.*notes\.txt' is a file but not a GGUF model file; expected a "
                                         r"Hugging Face model folder \(config\.json, weights, tokenizer files\), a "
                                         r"\.gguf file or a hub id"):
        LLMQueryExpander(model=str(text))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"`model`: the folder '.*empty' has no config\.json; expected"):
        LLMQueryExpander(model=str(tmp_path / "empty"))
    _fake_adapter(tmp_path / "adapter", "HuggingFaceTB/SmolLM2-135M-Instruct", ["q_proj"])
    with pytest.raises(FileNotFoundError, match=r"no config\.json.*It holds adapter_config\.json: pass it as "
                                                r"`adapter`, its base model as `model`"):
        LLMQueryExpander(model=str(tmp_path / "adapter"))
    gguf = tmp_path / "ggufs" / "small.Q4.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(FileNotFoundError, match=r"It holds small\.Q4\.gguf: pass that file as `model`"):
        LLMQueryExpander(model=str(gguf.parent))
    assert LLMQueryExpander(model=str(gguf)).model == str(gguf)


def test_gguf_model_file_loads_through_transformers_gguf_reader(tmp_path, monkeypatch):
    """A GGUF `model` is loaded as the bundled one is: `from_pretrained(<its folder>, gguf_file=<its name>)`; its
    cache identity follows its content."""
    import transformers

    from expandr_haystack import models

    monkeypatch.setattr(models, "_LLMS", {})  # the fake model is memoised apart from the session's
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    seen = {}

    class Loaded:
        def __init__(self):
            self.config = types.SimpleNamespace(quantization_config={"quant_method": "gguf"})

        def to(self, device):
            return self

        def eval(self):
            return self

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda path, **k: seen.setdefault("tok", (path, k)) and type("T", (), {"pad_token": "p"})())
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda path, **k: seen.setdefault("model", (path, k)) and Loaded())
    llm, _ = models.load_llm(str(gguf), None, "cpu", "float32")
    assert seen["tok"] == (str(tmp_path), {"token": None, "gguf_file": "m.gguf"})
    assert seen["model"][0] == str(tmp_path) and seen["model"][1]["gguf_file"] == "m.gguf"
    assert llm.hf_quantizer is None and not hasattr(llm.config, "quantization_config")  # a plain model now
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF" + bytes([1]) * 60)
    assert models.model_identity(str(gguf)) != models.model_identity(str(other))


def test_hub_model_not_cached_offline_or_unreachable_fails_fast_naming_model(monkeypatch):
    """A hub id that is not in the local Hugging Face cache: offline (HF_HUB_OFFLINE=1, as the tests run), the
    expander's warm_up fails at once naming `model` (before: transformers' OSError naming neither); with the hub
    unreachable (here a stand-in for the HTTP client's connection error), one request, no ~50 s of retries."""
    import huggingface_hub
    import transformers
    from huggingface_hub import constants

    def never(*args, **kwargs):
        raise AssertionError("transformers must not be asked")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", never)
    exp = LLMQueryExpander(model="expandr-tests/not-a-cached-llm")  # construction needs no hub
    assert constants.is_offline_mode()
    started = time.monotonic()
    with pytest.raises(FileNotFoundError, match=r"`model`: 'expandr-tests/not-a-cached-llm' is not in the local "
                                                r"Hugging Face cache .* and downloads are off \(HF_HUB_OFFLINE"):
        exp.warm_up()
    assert time.monotonic() - started < 5
    asked = []

    def unreachable(url, **kwargs):
        asked.append(url)
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", unreachable)
    with pytest.raises(OSError, match=r"`model`: cannot reach the Hugging Face hub to download "
                                      r"'expandr-tests/not-a-cached-llm' \(ConnectionError: .*\), and it is not in the "
                                      r"local Hugging Face cache"):
        exp.warm_up()
    assert len(asked) == 1 and asked[0].endswith("/expandr-tests/not-a-cached-llm/resolve/main/config.json")


# -- documents behind a wrapped retriever (`retriever=`): the FAISS path's checks, once per store change -------------
def _documents(n: int, dimension: int | None, seed: int = 0, prefix: str = "d") -> list[Document]:
    """`n` hand-made documents with random embeddings of `dimension` (None: no embedding)."""
    rng = np.random.default_rng(seed)
    return [Document(id=f"{prefix}{i}", content=f"document {i}",
                     embedding=None if dimension is None else rng.normal(size=dimension).tolist()) for i in range(n)]


def _wrapped(kind: str, documents: list[Document], embedding_dim: int = 8, **kwargs) -> tuple[ExpandRRetriever, Any]:
    """An ExpandRRetriever wrapping InMemory's or Qdrant's (local mode) embedding retriever over `documents`."""
    if kind == "memory":
        from haystack.components.retrievers.in_memory import InMemoryEmbeddingRetriever
        from haystack.document_stores.in_memory import InMemoryDocumentStore

        store = InMemoryDocumentStore(embedding_similarity_function="cosine")
        wrapped = InMemoryEmbeddingRetriever(document_store=store)
    else:
        qdrant = pytest.importorskip("haystack_integrations.document_stores.qdrant")
        from haystack_integrations.components.retrievers.qdrant import QdrantEmbeddingRetriever

        store = qdrant.QdrantDocumentStore(":memory:", embedding_dim=embedding_dim, similarity="cosine",
                                           progress_bar=False)
        wrapped = QdrantEmbeddingRetriever(document_store=store)
    if documents:
        store.write_documents(documents)
    return ExpandRRetriever(retriever=wrapped, **kwargs), store


@pytest.mark.parametrize("kind", ["memory", "qdrant"])
def test_wrapped_retriever_store_without_embeddings_is_named(kind):
    """Documents written without embeddings: the wrapped retriever skipped them and returned [] (InMemory logged a
    line, Qdrant nothing); now the FAISS path's error, naming a document and the store. Partly embedded: the
    unembedded ones were missed silently; now named too (Qdrant: its documents came back with embeddings, so the
    missing ones are known to be missing)."""
    store_name = f"the document store of the wrapped retriever \\({'InMemory' if kind == 'memory' else 'Qdrant'}"
    retriever, store = _wrapped(kind, _documents(5, None))
    query = np.ones(8, dtype=np.float32)
    with pytest.raises(ValueError, match=rf"5 document\(s\) in {store_name}EmbeddingRetriever\) have no embedding "
                                         r"\(e\.g\. id 'd\d'\); embed them first with SentenceTransformersDocumentEmb"):
        retriever.search(query)
    retriever, store = _wrapped(kind, _documents(4, 8) + [Document(id="plain", content="no embedding")])
    with pytest.raises(ValueError, match=rf"1 document\(s\) in {store_name}.*\(e\.g\. id 'plain'\)"):
        retriever.search(query)
    store.delete_documents(["plain"])
    assert len(retriever.search(query)[0]) == 4  # fixed: checked again (the store changed), and searched


@pytest.mark.parametrize("kind", ["memory", "qdrant"])
def test_wrapped_retriever_dimension_mismatch_is_named(kind, monkeypatch):
    """Documents of another encoder (768) than the retriever's (384): Qdrant failed inside qdrant_client with numpy's
    "shapes (5,768) and (384,) not aligned", InMemory with its own store error; now the FAISS path's wording. A store
    too big to read is checked against its declared `embedding_dim` (Qdrant)."""
    retriever, _ = _wrapped(kind, _documents(5, 768), embedding_dim=768)
    query = np.ones(384, dtype=np.float32)
    with pytest.raises(ValueError, match=r"Document 'd\d' has an embedding of dimension 768 but the retriever's "
                                         r"encoder produces 384: embed the documents with the same `model`"):
        retriever.search(query)
    if kind == "qdrant":
        from expandr_haystack.components.search import StoreCheck

        monkeypatch.setattr(StoreCheck, "READ_LIMIT", 2)  # 5 documents: not read
        retriever, _ = _wrapped(kind, _documents(5, 768), embedding_dim=768)
        with pytest.raises(ValueError, match=r"QdrantEmbeddingRetriever\) is set up \(`embedding_dim`\) for embeddings "
                                             r"of dimension 768 but the retriever's encoder produces 384"):
            retriever.search(query)


@pytest.mark.parametrize("kind", ["memory", "qdrant"])
def test_wrapped_retriever_store_is_checked_once_per_change(kind, monkeypatch):
    """The check reads the store when it changed (InMemory: its storage dict; Qdrant: `count_documents`, then
    `filter_documents`), not at every search."""
    from expandr_haystack.components import store_check

    checks = []
    real_check = store_check.check_embeddings
    monkeypatch.setattr(store_check, "check_embeddings", lambda docs, *a: checks.append(len(docs)) or real_check(docs, *a))
    retriever, store = _wrapped(kind, _documents(5, 8))
    reads = []
    if kind == "qdrant":
        real_filter = store.filter_documents
        monkeypatch.setattr(store, "filter_documents", lambda *a, **k: reads.append(1) or real_filter(*a, **k))
    query = np.ones((2, 8), dtype=np.float32)
    for _ in range(3):
        assert [len(hits) for hits in retriever.search(query, top_k=3)] == [3, 3]
    assert checks == [5] and len(reads) == (kind == "qdrant")
    store.write_documents(_documents(2, 8, seed=1, prefix="new"))
    retriever.search(query)
    retriever.search(query)
    assert checks == [5, 7] and len(reads) == 2 * (kind == "qdrant")


def test_wrapped_retriever_checks_run_and_run_async(tiny_bert):
    """Through `run` and `run_async` with a real (tiny, dimension 32) encoder: a store of its dimension searches; one
    of dimension 8 is named, sync and async."""
    from tests.conftest import TINY_BERT_DIM

    good, _ = _wrapped("memory", _documents(5, TINY_BERT_DIM), model=tiny_bert, top_k=3)
    assert len(good.run(query=QUERIES[0])["documents"]) == 3
    assert len(asyncio.run(good.run_async(query=QUERIES[0]))["documents"]) == 3
    bad, _ = _wrapped("memory", _documents(5, 8), model=tiny_bert)
    match = rf"Document 'd\d' has an embedding of dimension 8 but the retriever's encoder produces {TINY_BERT_DIM}"
    with pytest.raises(ValueError, match=match):
        bad.run(query=QUERIES[0])
    with pytest.raises(ValueError, match=match):
        asyncio.run(bad.run_async(query=QUERIES[0], expansions=["an expansion"]))


@component
class _StubRetriever:
    """An embedding retriever over `document_store`, returning `hits` whatever it is asked, scored as real retrievers
    score them (`unscored`: the hits without an embedding come back with score None, as pgvector's do)."""

    def __init__(self, document_store: Any = None, hits: list[Document] | None = None, unscored: bool = False):
        self.document_store = document_store
        self.hits = hits or []
        self.unscored = unscored

    @component.output_types(documents=list[Document])
    def run(self, query_embedding: list[float], filters: dict[str, Any] | None = None, top_k: int = 10):
        return {"documents": [replace(d, score=None if self.unscored and d.embedding is None else 1.0 / (1 + i))
                              for i, d in enumerate(self.hits)]}


class _HidingStore:
    """A store that holds embeddings but returns its documents without them (as some stores' filter_documents do)."""

    def __init__(self, documents: list[Document], fail: bool = False):
        self.documents, self.fail = documents, fail

    def count_documents(self) -> int:
        if self.fail:
            raise ConnectionError("store unreachable")
        return len(self.documents)

    def filter_documents(self, filters=None) -> list[Document]:
        return [Document(id=d.id, content=d.content) for d in self.documents]


def test_wrapped_retriever_store_that_cannot_be_read_is_not_guessed_about():
    """Documents that come back without embeddings prove nothing while the retriever finds them; only a search
    without filters that finds nothing in such a store is the silent empty result (named). A store with no
    `document_store`, or whose count fails, is not checked."""
    query = np.ones(8, dtype=np.float32)
    docs = _documents(3, 8)
    finds = ExpandRRetriever(retriever=_StubRetriever(_HidingStore(docs), hits=docs[:2]))
    assert [d.id for d in finds.search(query)[0]] == ["d0", "d1"]
    empty = ExpandRRetriever(retriever=_StubRetriever(_HidingStore(docs)))
    assert empty.search(query, filters={"field": "meta.x", "operator": "==", "value": 1}) == [[]]  # may be right
    with pytest.raises(ValueError, match=r"3 document\(s\) in the document store of the wrapped retriever "
                                         r"\(_StubRetriever\) have no embedding"):
        empty.search(query)
    for unreadable in (_StubRetriever(None), _StubRetriever(_HidingStore(docs, fail=True))):
        assert ExpandRRetriever(retriever=unreadable).search(query) == [[]]


def test_wrapped_retriever_hits_without_a_score_are_documents_without_an_embedding():
    """pgvector returns rows without an embedding too (their similarity NULL, ranked last) instead of skipping them:
    the hits without a score are named as unembedded documents (a large table is not read, so only the hits show
    them)."""
    query = np.ones(8, dtype=np.float32)
    docs = _documents(2, 8) + [Document(id="plain", content="no embedding")]
    retriever = ExpandRRetriever(retriever=_StubRetriever(None, hits=docs, unscored=True))
    with pytest.raises(ValueError, match=r"1 document\(s\) in the document store of the wrapped retriever "
                                         r"\(_StubRetriever\) have no embedding \(e\.g\. id 'plain'\).*without a score"):
        retriever.search(query)
    assert [d.id for d in ExpandRRetriever(retriever=_StubRetriever(None, hits=docs[:2])).search(query)[0]] == \
        ["d0", "d1"]
    # a retriever that scores nothing (Weaviate with a dot-product collection: certainty only exists for cosine)
    # returns embedded documents without scores: not judged
    unscoring = _StubRetriever(None, hits=docs[:2])
    unscoring.run = lambda query_embedding, filters=None, top_k=10: {
        "documents": [replace(d, score=None) for d in docs[:2]]}
    assert [d.id for d in ExpandRRetriever(retriever=unscoring).search(query)[0]] == ["d0", "d1"]


def test_wrapped_large_store_is_counted_once(monkeypatch):
    """A store of more than READ_LIMIT documents is never read; once its declared dimension passed, it is not
    counted again at every search (a COUNT(*) on PostgreSQL reads the whole table). A small one is, as it may change."""
    from expandr_haystack.components.search import StoreCheck

    class Counted(_HidingStore):
        counts = 0
        embedding_dimension = 8  # pgvector's name for the declared dimension

        def count_documents(self) -> int:
            Counted.counts += 1
            return super().count_documents()

    query = np.ones(8, dtype=np.float32)
    docs = _documents(5, 8)
    small = ExpandRRetriever(retriever=_StubRetriever(Counted(docs), hits=docs))
    for _ in range(3):
        small.search(query)
    assert Counted.counts == 3
    monkeypatch.setattr(StoreCheck, "READ_LIMIT", 2)
    Counted.counts = 0
    large = ExpandRRetriever(retriever=_StubRetriever(Counted(docs), hits=docs))
    for _ in range(3):
        large.search(query)
    asyncio.run(large.searcher.search_async(query[None], 3, None, False, False))  # the async check too
    assert Counted.counts == 1
    Counted.embedding_dimension = 768
    with pytest.raises(ValueError, match=r"is set up \(`embedding_dimension`\) for embeddings of dimension 768"):
        ExpandRRetriever(retriever=_StubRetriever(Counted(docs), hits=docs)).search(query)


def test_wrapped_retriever_without_scale_score_refuses_it():
    """pgvector's and Chroma's retrievers take no `scale_score`: asking for it with mean fusion was ignored silently
    (their raw scores came back); now an error naming the argument. rrf scales its own scores."""
    docs = _documents(3, 8)
    match = r"`scale_score=True`: the wrapped retriever \(_StubRetriever\) takes no `scale_score`"
    with pytest.raises(ValueError, match=match):  # at init: a YAML saying so does not load
        ExpandRRetriever(retriever=_StubRetriever(None, hits=docs), scale_score=True)
    assert ExpandRRetriever(retriever=_StubRetriever(None, hits=docs), scale_score=True, fusion="rrf")
    retriever = ExpandRRetriever(retriever=_StubRetriever(None, hits=docs))
    with pytest.raises(ValueError, match=match):  # at run time
        retriever.search(np.ones(8, dtype=np.float32), scale_score=True)
    assert retriever.search(np.ones(8, dtype=np.float32), scale_score=False)


# -- cache faults --------------------------------------------------------------------------------------------------
_HOLD_LOCK = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("ROLLBACK")
"""


def _locked_by_other_process(path: Path, seconds: float) -> subprocess.Popen:
    """Another process (plain sqlite3, nothing else imported) holding an exclusive write lock for `seconds`."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(path), str(seconds)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_cache_locked_by_another_process_waits_then_succeeds(tmp_path):
    path = tmp_path / "c.sqlite"
    cache = ExpansionCache(path)
    cache.put_many({"a": "x"})
    proc = _locked_by_other_process(path, 2.0)
    started = time.monotonic()
    cache.put_many({"b": "y"})  # waits for the lock (busy timeout), then writes
    assert time.monotonic() - started > 0.5
    assert cache.get_many(["a", "b"]) == {"a": "x", "b": "y"}
    proc.wait(30)


def test_cache_locked_longer_than_its_timeout_names_the_file(tmp_path):
    path = tmp_path / "c.sqlite"
    cache = ExpansionCache(path, timeout=0.5)
    cache.put_many({"a": "x"})
    proc = _locked_by_other_process(path, 4.0)
    try:
        with pytest.raises(OSError, match=r"`cache`: cannot write to .*c\.sqlite: it stayed locked .*0\.5 s"):
            cache.put_many({"b": "y"})
        # readers are not blocked by a writer (WAL journal): hits are still served, a new handle still opens
        assert cache.get_many(["a"]) == {"a": "x"}
        assert ExpansionCache(path, timeout=0.5).get_many(["a"]) == {"a": "x"}
    finally:
        proc.wait(30)
    cache.put_many({"b": "y"})  # usable again once the other process lets go
    assert cache.get_many(["a", "b"]) == {"a": "x", "b": "y"}


def test_cache_in_a_location_that_cannot_be_written(tmp_path):
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("x")
    with pytest.raises(OSError, match=r"`cache`: cannot create the folder for .*not-a-folder"):
        ExpansionCache(a_file / "c.sqlite")
    with pytest.raises(OSError, match=r"`cache`: cannot .*c\.sqlite"):
        ExpansionCache("/proc/expandr-no-such-dir/c.sqlite")
    with pytest.raises(OSError, match=r"`cache`: cannot open .*a-folder"):
        (tmp_path / "a-folder").mkdir()
        ExpansionCache(tmp_path / "a-folder")  # the path is a directory


def test_read_only_cache_file_names_the_file_on_write(tmp_path):
    """A read-only database (here opened through sqlite's read-only mode: tests run as root, where chmod does not
    stop writes): reads work, a write raises an OSError naming the file and the fix."""
    path = tmp_path / "ro.sqlite"
    ExpansionCache(path).put_many({"a": "x"})
    cache = ExpansionCache(path)
    real_connect = sqlite3.connect
    cache._local = threading.local()  # drop the open read-write connection

    def read_only_connect(database, *args, **kwargs):
        return real_connect(f"file:{database}?mode=ro", *args, uri=True, **kwargs)

    import expandr_haystack.cache as cache_module

    original = cache_module.sqlite3.connect
    cache_module.sqlite3.connect = read_only_connect
    try:
        assert cache.get_many(["a"]) == {"a": "x"}
        with pytest.raises(OSError, match=r"`cache`: cannot write to .*ro\.sqlite: the file or its folder is read-only"):
            cache.put_many({"b": "y"})
    finally:
        cache_module.sqlite3.connect = original


def _prefilled_cache(folder: Path, api_key_env: str) -> tuple[Path, list[str]]:
    """A cache filled by an expander (one query, FakeChatGenerator), closed: the file a container image ships."""
    import gc

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "expansions.sqlite"
    filled = LLMQueryExpander(chat_generator=FakeChatGenerator(), cache=str(path))
    texts = filled.run(query=QUERIES[0])["expansions"]
    del filled
    gc.collect()  # its connection closes: the WAL is folded into the file, -wal/-shm removed
    assert sorted(p.name for p in folder.iterdir()) == ["expansions.sqlite"]
    return path, texts


@pytest.mark.parametrize("unwritable", ["folder", "file"])
def test_pre_filled_cache_in_a_read_only_folder_serves_hits_and_stores_no_misses(api_key, tmp_path, monkeypatch,
                                                                                caplog, unwritable):
    """A pre-filled cache in a folder that cannot be written (a container image; before: "cannot open ... attempt to
    write a readonly database" at warm_up), or itself not writable. Tests run as root, where chmod does not stop
    writes, so `os.access`, by which the cache decides it is read-only, reports the folder (or the file) not
    writable; sqlite then really opens the file read-only (`mode=ro`; in the folder case immutable too: no
    -wal/-shm files), so a write would fail even as root.
    `test_pre_filled_cache_in_a_really_read_only_folder` runs the same as another user, with real permissions."""
    path, texts = _prefilled_cache(tmp_path / "image", api_key)
    before = path.read_bytes()
    real_access = os.access
    target = path.parent if unwritable == "folder" else path
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == target and mode == os.W_OK
                        else real_access(p, mode, **k))
    caplog.set_level("WARNING", logger="expandr_haystack.cache")
    gen = FakeChatGenerator()
    exp = LLMQueryExpander(chat_generator=gen, cache=str(path))
    assert exp.run(query=QUERIES[0])["expansions"] == texts and gen.calls == 0  # a hit, no remote call
    for calls in (1, 2):  # a miss is generated, not stored: asked again, it is generated again
        assert exp.run(query=QUERIES[1])["expansions"] and gen.calls == calls
    assert exp.cache_stats == {"hits": 1, "misses": 2, "entries": 1}
    warnings = [r.getMessage() for r in caplog.records if "read-only" in r.getMessage()]
    reason = f"its folder {path.parent} is not writable" if unwritable == "folder" else "the file is not writable"
    once = f"Cache {path} is read-only ({reason}): cached expansions are served, new ones are not stored."
    assert warnings == [once]
    assert path.read_bytes() == before
    assert unwritable == "file" or sorted(p.name for p in path.parent.iterdir()) == ["expansions.sqlite"]
    with pytest.raises(OSError, match=r"`cache`: cannot write to .*expansions\.sqlite: the file or its folder is "
                                      r"read-only"):
        ExpansionCache(path).put_many({"k": "v"})  # the raw cache's default: a write is an error naming the file


_OPEN_AS_ANOTHER_USER = """
import json, sqlite3, sys, types
from pathlib import Path
package = types.ModuleType("expandr_haystack")  # the cache module alone: not the package's heavy __init__
package.__path__ = [sys.argv[2]]
sys.modules["expandr_haystack"] = package
from expandr_haystack.cache import ExpansionCache
out = {}
try:
    sqlite3.connect(sys.argv[1]).execute("SELECT count(*) FROM expansions")
except sqlite3.Error as exc:
    out["plain_sqlite"] = str(exc)
cache = ExpansionCache(sys.argv[1], on_read_only="skip")
cache.put_many({"new": "not stored"})
out.update(read_only=cache.read_only, entries=len(cache), hits=len(cache.get_many(json.loads(sys.argv[3]))))
print(json.dumps(out))
"""


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX permissions")
@pytest.mark.parametrize("leftover_wal", [False, True], ids=["closed", "leftover-wal"])
def test_pre_filled_cache_in_a_really_read_only_folder(api_key, leftover_wal):
    """The same with real permissions: the cache's folder is mode 555 and the cache is opened by a process of
    another user (`setpriv` to nobody when the tests run as root, where chmod does not stop writes; the test's own
    user otherwise). Skipped as root without `setpriv`. `leftover-wal`: a writer still holds the file, so a row is
    only in its -wal file (as a killed writer leaves it): read through the existing -shm, it is a hit too."""
    import shutil
    import tempfile

    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: chmod cannot make a folder read-only here")
        prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    root = Path(tempfile.mkdtemp())  # under /tmp: pytest's tmp_path is private to its user
    try:
        root.chmod(0o755)
        path, _ = _prefilled_cache(root / "image", api_key)
        with contextlib.closing(sqlite3.connect(path)) as conn:
            keys = [k for (k,) in conn.execute("SELECT key FROM expansions")]
        assert sorted(p.name for p in path.parent.iterdir()) == ["expansions.sqlite"]
        writer = sqlite3.connect(path, isolation_level=None)
        if leftover_wal:
            writer.execute("PRAGMA wal_autocheckpoint = 0")
            writer.execute("INSERT INTO expansions VALUES ('in-wal', 'x', 0)")
            keys.append("in-wal")
        else:
            writer.close()
        path.parent.chmod(0o555)
        done = subprocess.run([*prefix, sys.executable, "-c", _OPEN_AS_ANOTHER_USER, str(path),
                               str(ROOT / "expandr_haystack"), json.dumps(keys)],
                              capture_output=True, text=True, timeout=120, check=False)
        writer.close()
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout)
        if not leftover_wal:  # the fault: sqlite cannot make the -shm file a WAL database needs
            assert "readonly" in out.pop("plain_sqlite")
        n = 1 + leftover_wal
        assert out == {"read_only": f"its folder {path.parent} is not writable", "entries": n, "hits": n}
        assert "read-only" in done.stderr
        assert leftover_wal or sorted(p.name for p in path.parent.iterdir()) == ["expansions.sqlite"]  # no -shm
    finally:
        (root / "image").chmod(0o755)
        shutil.rmtree(root)


# -- remote chat generator: retries, backoff, skip, cache ----------------------------------------------------------
@pytest.mark.parametrize("fault", ["timeout", "error", "empty"])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_remote_fault_is_retried_with_exponential_backoff(api_key, sleeps, tmp_path, fault, mode):
    gen = FakeChatGenerator([fault, fault, "ok"])
    exp = LLMQueryExpander(chat_generator=gen, sampler=SamplerOptions(max_retries=3, retry_backoff=0.25),
                           cache=str(tmp_path / "c.sqlite"))
    if mode == "sync":
        out = exp.run(query=QUERIES[0])
    else:
        out = asyncio.run(exp.run_async(query=QUERIES[0]))
    assert gen.calls == 3 and sleeps == [0.25, 0.5]
    assert out["expansions"] == ["Lift in a slipstream rises with the dynamic pressure behind the propeller. (3)"]
    assert out["failures"] == []
    assert exp.cache_stats["entries"] == 1
    # a second call is served by the cache: no remote call
    again = exp.run(query=QUERIES[0])
    assert again["expansions"] == out["expansions"] and gen.calls == 3


@pytest.mark.parametrize("fault", ["timeout", "error", "empty"])
def test_remote_failure_raises_after_the_retries(api_key, sleeps, fault):
    gen = FakeChatGenerator([fault])
    exp = LLMQueryExpander(chat_generator=gen, sampler=SamplerOptions(max_retries=2, retry_backoff=1.0),
                           on_failure="raise")
    with pytest.raises(RuntimeError, match=r"no expansion for query .*after 3 attempts"):
        exp.run(query=QUERIES[0])
    assert gen.calls == 3 and sleeps == [1.0, 2.0]


def test_remote_failure_skip_retrieves_with_the_query_alone_and_says_so(api_key, sleeps, tmp_path, caplog,
                                                                         monkeypatch):
    from haystack import Pipeline
    from haystack.document_stores.in_memory import InMemoryDocumentStore

    gen = FakeChatGenerator(["error"])
    cache = str(tmp_path / "c.sqlite")
    exp = LLMQueryExpander(chat_generator=gen, n_expansions=2, sampler=SamplerOptions(max_retries=1, retry_backoff=0.1),
                           on_failure="skip", cache=cache)
    seen = {}

    def fake_retrieve(self, plan):  # `run` checks its inputs, then retrieves them (`_retrieve`)
        seen["queries"], seen["expansions"] = list(plan.queries), [list(e) for e in plan.expansions]
        return [[] for _ in plan.queries]

    monkeypatch.setattr(ExpandRRetriever, "_retrieve", fake_retrieve)
    monkeypatch.setattr(ExpandRRetriever, "warm_up", lambda self: None)  # no encoder needed to see what it gets
    p = Pipeline()
    p.add_component("expander", exp)
    p.add_component("retriever", ExpandRRetriever(InMemoryDocumentStore()))
    p.connect("expander.query", "retriever.query")
    p.connect("expander.expansions", "retriever.expansions")
    with caplog.at_level(logging.WARNING):
        res = p.run({"expander": {"query": QUERIES[0]}})
    assert seen == {"queries": [QUERIES[0]], "expansions": [[]]}  # the query alone
    assert gen.calls == 4 and sleeps == [0.1, 0.1]  # 2 samples x (1 try + 1 retry)
    assert len(res["expander"]["failures"]) == 1 and "query alone" in res["expander"]["failures"][0]
    assert "skipped (on_failure='skip')" in caplog.text and "HTTP 503" in caplog.text
    assert ExpansionCache(cache).stats()["entries"] == 0  # failures are never cached
    # once the remote side recovers, the same call generates (not a cached failure) and caches
    gen.script = ["ok"]
    out = exp.run(query=QUERIES[0])
    assert len(out["expansions"]) == 2 and out["failures"] == [] and exp.cache_stats["entries"] == 2


def test_partial_failure_keeps_the_successful_samples(api_key, sleeps, tmp_path):
    gen = FakeChatGenerator(["ok", "error"])  # sample 0 succeeds, sample 1 always fails
    exp = LLMQueryExpander(chat_generator=gen, n_expansions=2, on_failure="skip", cache=str(tmp_path / "c.sqlite"),
                           sampler=SamplerOptions(max_retries=1, retry_backoff=0.0, max_concurrency=1))
    out = exp.run(query=QUERIES[0])
    assert len(out["expansions"]) == 1 and "1 of 2" in out["failures"][0]
    assert exp.cache_stats["entries"] == 1


def test_backoff_settings_are_checked():
    with pytest.raises(ValueError, match="max_retries"):
        LLMQueryExpander(chat_generator=FakeChatGenerator(), sampler={"max_retries": -1})
    with pytest.raises(ValueError, match="retry_backoff"):
        LLMQueryExpander(chat_generator=FakeChatGenerator(), sampler={"retry_backoff": -1})


# -- security: keys only through Secret ----------------------------------------------------------------------------
def test_api_key_never_reaches_to_dict_yaml_logs_or_cache(api_key, tmp_path, caplog, capsys):
    from haystack import Pipeline

    cache = tmp_path / "c.sqlite"
    with caplog.at_level(logging.DEBUG):
        exp = LLMQueryExpander(chat_generator=FakeChatGenerator(["error", "ok"]),
                               sampler=SamplerOptions(retry_backoff=0.0), cache=str(cache))
        out = exp.run(query=QUERIES[0])
        assert out["expansions"]
        p = Pipeline()
        p.add_component("expander", exp)
        yaml_text = p.dumps()
    assert "FAKE_API_KEY" in yaml_text and api_key not in yaml_text  # the env var's name, never its value
    assert api_key not in json.dumps(exp.to_dict())
    assert api_key not in caplog.text
    captured = capsys.readouterr()
    assert api_key not in captured.out + captured.err
    for f in tmp_path.iterdir():  # the sqlite file and its WAL/SHM side files
        assert api_key.encode() not in f.read_bytes(), f
    # a key given as a token (not an env var) refuses to be serialized at all
    token_exp = LLMQueryExpander(chat_generator=FakeChatGenerator(api_key=Secret.from_token(api_key)))
    with pytest.raises(ValueError, match="token-based secret"):
        token_exp.to_dict()


# -- concurrent expanders sharing one cache (real bundled LLM, tiny generations) -----------------------------------
def _expand_in_process(cache: str, queries: list[str]) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    LLMQueryExpander(generation=GenerationSettings(max_new_tokens=3), n_expansions=2, cache=cache).expand(queries)


def _entries(cache: str) -> tuple[int, int]:
    return sqlite3.connect(cache).execute("SELECT count(*), count(DISTINCT key) FROM expansions").fetchone()


@pytest.mark.integration
def test_concurrent_expanders_from_threads_and_processes_share_one_cache(tmp_path):
    queries = [f"{q} (variant {i})" for i in range(3) for q in QUERIES]  # 6 queries x 2 samples = 12 rows
    cache = str(tmp_path / "c.sqlite")
    # threads: two expanders (one shared model) on overlapping halves
    a = LLMQueryExpander(generation=GenerationSettings(max_new_tokens=3), n_expansions=2, cache=cache)
    b = LLMQueryExpander(generation=GenerationSettings(max_new_tokens=3), n_expansions=2, cache=cache)
    a.warm_up()
    b.warm_up()
    results: dict[str, Any] = {}
    threads = [threading.Thread(target=lambda: results.setdefault("a", a.expand(queries[:4]))),
               threading.Thread(target=lambda: results.setdefault("b", b.expand(queries[2:])))]
    [t.start() for t in threads]
    [t.join(300) for t in threads]
    assert set(results) == {"a", "b"}
    assert _entries(cache) == (12, 12)
    assert results["a"][2:] == results["b"][:2]  # the overlap agrees (per-row seeds)
    # processes: two more on a second cache, overlapping
    cache2 = str(tmp_path / "c2.sqlite")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_expand_in_process, args=(cache2, part)) for part in (queries[:4], queries[2:])]
    [p.start() for p in procs]
    [p.join(600) for p in procs]
    assert [p.exitcode for p in procs] == [0, 0]
    assert _entries(cache2) == (12, 12)
    # the same rows whichever way they were made
    rows = dict(sqlite3.connect(cache).execute("SELECT key, text FROM expansions").fetchall())
    rows2 = dict(sqlite3.connect(cache2).execute("SELECT key, text FROM expansions").fetchall())
    assert rows == rows2


# -- training: SIGKILL at every step, then --resume ----------------------------------------------------------------
def _state(run: Path) -> dict[str, Any]:
    try:
        return json.loads((run / "state.json").read_text()).get("done", {})
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _train(run: Path, log: Path, resume: bool) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1",
           "HAYSTACK_TELEMETRY_ENABLED": "False", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(ROOT / "training" / "joint.py"), "--config", str(ROOT / "training/configs/micro.yaml"),
           "--output", str(run), "--no-progress"] + (["--resume"] if resume else [])
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("a"), stderr=subprocess.STDOUT)


def _check_run_folder(run: Path) -> None:
    """Every JSON/JSONL file parses, the cache passes sqlite's integrity check, the adapter loads."""
    from safetensors import safe_open

    for f in run.rglob("*.json"):
        json.loads(f.read_text())
    for f in run.rglob("*.jsonl"):
        for line in f.read_text().splitlines():
            json.loads(line)
    assert sqlite3.connect(run / "cache.sqlite").execute("PRAGMA integrity_check").fetchone() == ("ok",)
    for f in run.rglob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            assert list(st.keys())


def _pair_counts(run: Path) -> tuple[int, int, int]:
    r1 = run / "round_1"
    pairs = [json.loads(x) for x in (r1 / "pairs.jsonl").read_text().splitlines()]
    seen = [json.loads(x) for x in (r1 / "pairs.jsonl.seen.jsonl").read_text().splitlines()]
    assert len({p["query_id"] for p in pairs}) == len(pairs), "a query has two pairs"
    assert len({s["query_id"] for s in seen}) == len(seen), "a query was recorded twice"
    return len(pairs), len(seen), len(json.loads((run / "metrics.json").read_text()))


@pytest.mark.integration
def test_sigkill_at_every_training_step_then_resume_gives_the_same_pairs(tmp_path):
    # the uninterrupted reference run goes on in parallel with the killed one
    ref, killed = tmp_path / "uninterrupted", tmp_path / "killed"
    ref_proc = _train(ref, tmp_path / "ref.log", resume=False)
    log = tmp_path / "killed.log"
    # kill as soon as `after` is recorded in state.json, i.e. while `during` runs
    plan = [("baselines.eval", "round1.expand"), ("round1.expand", "round1.retriever"),
            ("round1.retriever", "round1.pairs"), ("round1.pairs", "round1.dpo")]
    interrupted = []
    for i, (after, during) in enumerate(plan):
        proc = _train(killed, log, resume=i > 0)
        deadline = time.monotonic() + 1500
        while after not in _state(killed):
            assert proc.poll() is None, f"the run ended before {after} ({log.read_text()[-3000:]})"
            assert time.monotonic() < deadline, f"timed out waiting for {after}"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(60) == -signal.SIGKILL
        done = _state(killed)
        assert during not in done, f"{during} finished before the kill landed"
        interrupted.append(during)
        _check_run_folder(killed)  # nothing is corrupt, even right after a kill
    assert interrupted == [d for _, d in plan]
    final = _train(killed, log, resume=True)
    assert final.wait(1800) == 0, log.read_text()[-3000:]
    assert ref_proc.wait(1800) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    for run in (ref, killed):
        _check_run_folder(run)
        assert all(s in _state(run) for s in ("round1.dpo", "round1.eval", "round1.save"))
    assert _pair_counts(killed) == _pair_counts(ref)
    # the resumed run generated each text once: same cache rows as the uninterrupted run
    count = "SELECT count(*) FROM expansions"
    assert sqlite3.connect(killed / "cache.sqlite").execute(count).fetchone() == \
        sqlite3.connect(ref / "cache.sqlite").execute(count).fetchone()
