import numpy as np
import pytest
import torch

from expandr_haystack import fuse
from expandr_haystack.core.text import clean_generation


def test_fuse_is_mean_of_unit_vectors_for_one_expansion():
    q = np.array([3.0, 4.0])
    e = np.array([[0.0, 2.0]])
    np.testing.assert_allclose(fuse(q, e), 0.5 * np.array([0.6, 0.8]) + 0.5 * np.array([0.0, 1.0]))


def test_fuse_keeps_query_weight_with_many_expansions_and_works_on_torch():
    q = torch.tensor([[1.0, 0.0]])
    e = torch.tensor([[[0.0, 5.0], [0.0, -1.0], [0.0, 2.0]]])
    out = fuse(q, e, query_weight=0.7)
    torch.testing.assert_close(out, torch.tensor([[0.7, 0.3 * (1 - 1 + 1) / 3]]))


def test_fuse_without_expansions_is_the_unit_query():
    q = np.array([0.0, 2.0])
    np.testing.assert_allclose(fuse(q, np.zeros((0, 2))), [0.0, 1.0])


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("Sure! Here is a passage:\n\nWings lift.", "Wings lift."),
        ("Here's a passage that answers the question: Heat flows.", "Heat flows."),
        ("Passage: Heat flows in slabs.", "Heat flows in slabs."),
        ('  "Quoted answer."  ', "Quoted answer."),
        ("Question: what is lift?\nLift is a force.", "Lift is a force."),
        ("   \n  ", ""),
        ("Certainly. Here is the passage.\nBoundary layers thicken.", "Boundary layers thicken."),
        ("I'd be happy to help with that. Heat flows in slabs.", "Heat flows in slabs."),
        ("Sure! I'd be glad to help! Here's a passage: Wings lift.", "Wings lift."),
    ],
)
def test_clean_generation(raw, expected):
    assert clean_generation(raw) == expected


def test_clean_generation_drops_echoed_query():
    assert clean_generation("what is lift? Lift is a force.", "what is lift?") == "Lift is a force."


def test_clean_generation_keeps_normal_text():
    text = "The boundary layer on a heated plate thickens downstream."
    assert clean_generation(text) == text


def test_scored_hits_equal_dataclasses_replace_and_leave_the_stored_document_alone():
    from dataclasses import replace

    from haystack import Document

    from expandr_haystack.components.retriever import _with_score

    stored = Document(content="lift of a wing", meta={"title": "t"}, embedding=[0.1, 0.2])
    scored = _with_score(stored, 0.75)
    assert scored == replace(stored, score=0.75) and scored.id == stored.id
    assert stored.score is None and scored.score == 0.75
    scored.score = 0.5  # a caller mutating its hit does not touch the store's document
    assert stored.score is None


def test_a_claim_restated_verbatim_is_kept_not_emptied():
    """SmolLM2 often answers a SciFact claim by restating it: that was cleaned to "" and failed the row."""
    claim = "A deficiency of folate increases blood levels of homocysteine."
    assert clean_generation(claim, claim) == claim
    assert clean_generation(f"Sure! Here is a passage: {claim}", claim) == claim
    assert clean_generation(f"{claim} Folate is a B vitamin.", claim) == "Folate is a B vitamin."


def test_reciprocal_rank_fusion_and_rocchio_are_plain_math():
    from expandr_haystack.core.fusion import reciprocal_rank_fusion, rocchio

    ranked = reciprocal_rank_fusion([["a", "b", "c"], ["b", "a"], ["c"]], k=1)
    assert ranked == [("a", 1 / 2 + 1 / 3), ("b", 1 / 3 + 1 / 2), ("c", 1 / 4 + 1 / 2)]  # ties by id
    assert reciprocal_rank_fusion([["a", "b"], ["b"]], k=60, limit=1, scale=True) == [("b", (1 / 62 + 1 / 61) * 61 / 2)]
    vectors = np.array([[3.0, 4.0], [1.0, 0.0]])
    moved = rocchio(vectors, [np.array([[0.0, 2.0]]), np.zeros((0, 2))], 0.25)
    np.testing.assert_allclose(moved, [fuse(vectors[0], np.array([[0.0, 2.0]]), 0.25), [1.0, 0.0]])
