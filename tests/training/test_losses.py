"""FusedInfoNCELoss with n expansions (bundled MiniLM, a few sentences) and the rows the retriever step trains on."""

import pytest
import torch

from expandr_haystack.evaluation.data import bundled_path, load_collection
from expandr_haystack.training.config import RetrieverSettings
from expandr_haystack.training.retriever import expansion_columns, training_examples

QUERIES = ["lift of a thin wing", "heat transfer in slabs"]
EXPANSIONS = [["a wing produces lift", "thin airfoil theory", "lift coefficient"],
              ["conduction through layers", "slab temperature", "heat flux in composites"]]
DOCUMENTS = ["Thin airfoil theory gives the lift of a wing.", "Heat conduction in composite slabs."]
NEGATIVES = ["Buckling of cylindrical shells.", "Flow separation in rocket nozzles."]


@pytest.fixture(scope="module")
def model():
    from sentence_transformers import SentenceTransformer

    from expandr_haystack.models import resolve_encoder_path

    m = SentenceTransformer(resolve_encoder_path(None), device="cpu")
    m.eval()  # no dropout: the loss and the manual computation see the same embeddings
    return m


def _features(model, columns):
    return [model.tokenize(column) for column in columns]


def _manual_loss(model, n, w, tau):
    """w * q^ + (1 - w) * mean_m e^_m, cosine against every positive and negative, / tau, cross-entropy (tau = 1
    keeps the loss far from 0, so a wrong fusion shows)."""
    def embed(texts):
        with torch.no_grad():
            return model.encode(texts, convert_to_tensor=True, normalize_embeddings=False)

    unit = torch.nn.functional.normalize
    q = unit(embed(QUERIES), dim=-1)
    e = torch.stack([unit(embed([x[m] for x in EXPANSIONS]), dim=-1) for m in range(n)], dim=1)  # (B, n, d)
    fused = w * q + (1 - w) * e.mean(dim=1)
    docs = torch.cat([embed(DOCUMENTS), embed(NEGATIVES)])
    scores = unit(fused, dim=-1) @ unit(docs, dim=-1).T / tau
    return torch.nn.functional.cross_entropy(scores, torch.arange(len(QUERIES))).item()


@pytest.mark.parametrize("n,w", [(1, 0.5), (3, 0.5), (3, 0.7)])
def test_loss_with_n_expansions_equals_the_manual_fusion(model, n, w):
    from expandr_haystack.training.losses import FusedInfoNCELoss

    loss = FusedInfoNCELoss(model, temperature=1.0, query_weight=w, n_expansions=n)
    columns = [QUERIES, *([x[m] for x in EXPANSIONS] for m in range(n)), DOCUMENTS, NEGATIVES]
    with torch.no_grad():
        value = loss(_features(model, columns), None).item()
    assert value == pytest.approx(_manual_loss(model, n, w, 1.0), rel=1e-5)
    if n > 1:  # the other expansions count: the first one alone gives another loss
        assert abs(value - _manual_loss(model, 1, w, 1.0)) > 1e-3
    assert loss.get_config_dict()["n_expansions"] == n


def test_loss_needs_its_expansion_columns(model):
    from expandr_haystack.training.losses import FusedInfoNCELoss

    loss = FusedInfoNCELoss(model, n_expansions=3)
    with pytest.raises(ValueError, match=r"n_expansions=3"):
        loss(_features(model, [QUERIES, DOCUMENTS, NEGATIVES]), None)
    with pytest.raises(ValueError, match="n_expansions"):
        FusedInfoNCELoss(model, n_expansions=0)


def test_expansion_columns_repeat_what_a_query_has():
    assert expansion_columns("q", ["a", "b", "c"], 4) == ["a", "b", "c", "a"]
    assert expansion_columns("q", ["a", " ", "b"], 2) == ["a", "b"]
    assert expansion_columns("q", ["a", "b", "c"], 2) == ["a", "b"]
    assert expansion_columns("q", [], 3) == ["q", "q", "q"]  # none: the fused query is the query alone
    assert expansion_columns("q", [""], 1) == ["q"]


def test_training_rows_have_n_expansion_columns_before_the_document():
    train = load_collection(bundled_path("cranfield"), "train", max_queries=3)
    ids = list(train.queries)
    settings = RetrieverSettings(hard_negatives=2, max_positives_per_query=2)
    negatives = {q: list(train.corpus)[:5] for q in ids}
    rows = training_examples(train, ids, [["x"], [], ["y", "z"]], negatives, settings, seed=1, n_expansions=3)
    assert all(list(r) == ["query", "expansion_1", "expansion_2", "expansion_3", "document", "negative_1",
                           "negative_2"] for r in rows)
    first = next(r for r in rows if r["query"] == train.queries[ids[0]])
    assert [first[f"expansion_{m}"] for m in (1, 2, 3)] == ["x", "x", "x"]
    second = next(r for r in rows if r["query"] == train.queries[ids[1]])
    assert second["expansion_1"] == second["query"]
    plain = training_examples(train, ids, None, negatives, settings, seed=1)
    assert [list(r) for r in plain] == [["query", "document", "negative_1", "negative_2"]] * len(plain)
    # the same seed picks the same positives and negatives with and without expansions (the baseline's budget)
    assert [(r["document"], r["negative_1"]) for r in plain] == [(r["document"], r["negative_1"]) for r in rows]
