import os

os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from haystack import Document

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
