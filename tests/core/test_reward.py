"""RewardScorer and the ExpandR reward: hand-computed cases (no model), bad input, and one real-encoder check."""

import math

import numpy as np
import pytest
from haystack import Document, Pipeline
from haystack.utils import ComponentDevice

import expandr_haystack
from expandr_haystack import RewardScorer
from expandr_haystack.core.reward import competition_ranks, expandr_reward, select_pair
from expandr_haystack.core.text import document_text
from expandr_haystack.options import EncoderOptions


class StubEmbedder:
    """Fixed unit vectors per text: stands in for ExpandRQueryEmbedder.encode (same interface)."""

    def __init__(self, table):
        self.table = {t: np.asarray(v, dtype=np.float32) / np.linalg.norm(v) for t, v in table.items()}
        self.calls = []

    def warm_up(self):
        pass

    def encode(self, texts, progress_bar=None, *, prefix=None, suffix=None):
        self.calls.append(list(texts))
        return np.stack([self.table[t] for t in texts])


def _vec(cos_doc, cos_ans):
    """A unit vector with the given cosines to e1 (the document) and e2 (the answer)."""
    return [cos_doc, cos_ans, math.sqrt(1 - cos_doc**2 - cos_ans**2)]


def _scorer(table, threshold=0.6):
    s = RewardScorer(threshold=threshold)
    s._embedder = StubEmbedder(table)
    return s


# -- the formula -----------------------------------------------------------------------------------------------
def test_competition_ranks():
    assert competition_ranks([0.9, 0.5, 0.7]) == [1, 3, 2]
    assert competition_ranks([0.9, 0.5, 0.9]) == [1, 3, 1]
    assert competition_ranks([0.2, 0.2, 0.2]) == [1, 1, 1]
    assert competition_ranks([]) == []


def test_reward_by_hand_three_candidates():
    # doc ranks [1, 3, 2], answer ranks [1, 3, 2] -> rewards [1 + 1, 1/3 + 1/3, 1/2 + 1/2]
    rewards = expandr_reward([0.6, 0.2, 0.4], [0.5, 0.1, 0.3])
    assert rewards == pytest.approx([2.0, 2 / 3, 1.0])
    choice = select_pair(rewards, [0.6, 0.2, 0.4], [0.5, 0.1, 0.3], ["a", "b", "c"], threshold=0.6)
    assert (choice.chosen, choice.rejected, choice.kept, choice.reason) == (0, 1, True, "kept")
    assert choice.best_score == pytest.approx(1.1)


def test_reward_rankings_disagree():
    # doc ranks [1, 3, 2], answer ranks [3, 1, 2] -> rewards [4/3, 4/3, 1]; tie on reward, broken by summed cosine
    doc, ans = [0.9, 0.5, 0.7], [0.2, 0.8, 0.6]
    rewards = expandr_reward(doc, ans)
    assert rewards == pytest.approx([4 / 3, 4 / 3, 1.0])
    choice = select_pair(rewards, doc, ans, ["a", "b", "c"], threshold=0.6)
    assert (choice.chosen, choice.rejected) == (1, 2)  # sums 1.1 vs 1.3: candidate 1 wins the tie


def test_full_tie_goes_to_the_earlier_candidate_and_rejected_to_the_later():
    # binary-exact numbers: doc ranks [1, 4, 2, 2], answer ranks [4, 1, 2, 2], summed cosines all 1.0
    doc, ans = [0.75, 0.25, 0.5, 0.5], [0.25, 0.75, 0.5, 0.5]
    rewards = expandr_reward(doc, ans)
    assert rewards == [1.25, 1.25, 1.0, 1.0]
    choice = select_pair(rewards, doc, ans, ["a", "b", "c", "d"], threshold=0.0)
    assert (choice.chosen, choice.rejected) == (0, 3)


def test_document_only_reward_is_the_ablation():
    rewards = expandr_reward([0.75, 0.5, 0.5])
    assert rewards == [1.0, 0.5, 0.5]
    choice = select_pair(rewards, [0.75, 0.5, 0.5], None, ["a", "b", "c"], threshold=0.7)
    assert (choice.chosen, choice.rejected, choice.kept) == (0, 2, True)
    # the threshold compares with max cos_doc alone
    assert not select_pair(rewards, [0.75, 0.5, 0.5], None, ["a", "b", "c"], threshold=0.8).kept


def test_threshold_drop_and_boundary():
    doc, ans = [0.25, 0.125], [0.25, 0.125]
    rewards = expandr_reward(doc, ans)
    dropped = select_pair(rewards, doc, ans, ["a", "b"], threshold=0.6)
    assert (dropped.chosen, dropped.rejected, dropped.kept, dropped.reason) == (None, None, False, "below_threshold")
    assert select_pair(rewards, doc, ans, ["a", "b"], threshold=0.5).kept  # max sum == threshold is kept


def test_fewer_than_two_distinct_expansions():
    choice = select_pair([1.0, 1.0], [0.9, 0.9], [0.9, 0.9], ["same text", "  same text\n"], threshold=0.0)
    assert (choice.kept, choice.reason, choice.chosen) == (False, "fewer_than_two_distinct", None)
    assert select_pair([1.0], [0.9], [0.9], ["one"], threshold=0.0).reason == "fewer_than_two_distinct"
    assert select_pair([], [], [], [], threshold=0.0).reason == "fewer_than_two_distinct"


def test_rejected_never_repeats_the_chosen_text():
    doc = [0.9, 0.5, 0.1]  # candidate 2 has the lowest reward but is the same text as the chosen one
    choice = select_pair(expandr_reward(doc), doc, None, ["a", "b", "a"], threshold=0.0)
    assert (choice.chosen, choice.rejected) == (0, 1)


def test_mismatched_lengths():
    with pytest.raises(ValueError, match="answer_similarities"):
        expandr_reward([0.1, 0.2], [0.3])
    with pytest.raises(ValueError, match="expansions"):
        select_pair([1.0, 0.5], [0.1, 0.2], None, ["a"], threshold=0.0)


# -- the component with a stub encoder ---------------------------------------------------------------------------
def _table():
    return {"DOC": [1, 0, 0], "ANS": [0, 1, 0], "e0": _vec(0.6, 0.5), "e1": _vec(0.2, 0.1), "e2": _vec(0.4, 0.3)}


def test_run_by_hand():
    s = _scorer(_table())
    out = s.run(query="q", expansions=["e0", "e1", "e2"], document="DOC", answer="ANS")
    assert out["rewards"] == pytest.approx([2.0, 2 / 3, 1.0])
    assert out["document_similarities"] == pytest.approx([0.6, 0.2, 0.4], abs=1e-6)
    assert out["answer_similarities"] == pytest.approx([0.5, 0.1, 0.3], abs=1e-6)
    assert (out["chosen"], out["rejected"], out["kept"]) == ("e0", "e1", True)
    assert set(out) == {"rewards", "chosen", "rejected", "kept", "document_similarities", "answer_similarities"}


def test_run_threshold_and_no_answer():
    s = _scorer(_table(), threshold=1.2)
    out = s.run(query="q", expansions=["e0", "e1", "e2"], document="DOC", answer="ANS")
    assert (out["kept"], out["chosen"], out["rejected"]) == (False, None, None)
    assert out["rewards"] == pytest.approx([2.0, 2 / 3, 1.0])  # rewards are reported even when dropped
    s.threshold = 0.55
    out = s.run(query="q", expansions=["e0", "e1", "e2"], document="DOC")
    assert out["answer_similarities"] == [] and out["rewards"] == pytest.approx([1.0, 1 / 3, 0.5])
    assert out["kept"]  # max cos_doc 0.6 >= 0.55
    s.threshold = 0.65
    assert not s.run(query="q", expansions=["e0", "e1", "e2"], document="DOC")["kept"]


def test_run_uses_title_and_content_like_the_indexer():
    table = _table()
    table["Title\nBody text"] = table.pop("DOC")
    s = _scorer(table)
    doc = Document(id="d1", content="Body text", meta={"title": "Title"})
    assert document_text(doc) == "Title\nBody text"
    assert document_text(Document(content="Body text")) == "Body text"
    out = s.run(query="q", expansions=["e0", "e1"], document=doc, answer="ANS")
    assert out["chosen"] == "e0" and out["kept"]


def test_duplicates_are_encoded_once_and_share_ranks():
    s = _scorer(_table())
    out = s.run(query="q", expansions=["e0", "e1", "e0"], document="DOC", answer="ANS")
    assert out["rewards"][0] == out["rewards"][2] == 2.0
    assert out["rewards"][1] == pytest.approx(2 / 3)  # competition ranks: 3rd by both measures
    assert sorted(s._embedder.calls[0]) == sorted(["DOC", "ANS", "e0", "e1"])
    out = s.run(query="q", expansions=["e0", "e0"], document="DOC", answer="ANS")
    assert (out["kept"], out["chosen"]) == (False, None)


def test_score_many_batches_and_tolerates_empty_items():
    s = _scorer(_table())
    res = s.score_many([["e0", "e1"], [], ["e2", "e1"]], ["DOC", "DOC", "DOC"], ["ANS", None, "ANS"])
    assert len(s._embedder.calls) == 1
    assert [r["kept"] for r in res] == [True, False, True]
    assert res[1]["reason"] == "fewer_than_two_distinct" and res[1]["answer_similarities"] == []
    assert (res[2]["chosen"], res[2]["rejected"], res[2]["chosen_index"]) == ("e2", "e1", 0)


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"expansions": []}, ValueError, "`expansions` is empty"),
    ({"expansions": ["e0", 3]}, TypeError, r"`expansions\[1\]` must be a string"),
    ({"expansions": ["e0", None]}, TypeError, r"`expansions\[1\]`"),
    ({"expansions": ["e0", "  "]}, ValueError, r"`expansions\[1\]` is empty"),
    ({"expansions": "e0"}, TypeError, "list of strings"),
    ({"document": None}, ValueError, "`document` is missing"),
    ({"document": 42}, TypeError, "`document` must be"),
    ({"document": Document(content="")}, ValueError, "no text content"),
    ({"document": ""}, ValueError, "`document`"),
    ({"answer": ""}, ValueError, "`answer` is empty"),
    ({"answer": ["ANS"]}, TypeError, "`answer`"),
    ({"query": ""}, ValueError, "`query`"),
])
def test_bad_input(kwargs, exc, match):
    s = _scorer(_table())
    args = {"query": "q", "expansions": ["e0", "e1"], "document": "DOC", "answer": "ANS", **kwargs}
    with pytest.raises(exc, match=match):
        s.run(**args)


def test_bad_settings():
    with pytest.raises(ValueError, match="threshold"):
        RewardScorer(threshold="high")
    with pytest.raises(ValueError, match="threshold"):
        RewardScorer(threshold=float("nan"))
    with pytest.raises(ValueError, match="batch_size"):
        RewardScorer(encoder={"batch_size": 0})
    with pytest.raises(TypeError, match="device"):
        RewardScorer(device="cpu")
    with pytest.raises(FileNotFoundError, match="`model`"):
        RewardScorer(model="/no/such/encoder")
    with pytest.raises(ValueError, match="documents"):
        _scorer(_table()).score_many([["e0"]], ["DOC", "DOC"])


def test_serialization_round_trip():
    s = RewardScorer(threshold=0.4, device=ComponentDevice.from_str("cpu"), encoder=EncoderOptions(batch_size=8))
    d = s.to_dict()
    assert d["type"] == "expandr_haystack.components.reward.RewardScorer"
    back = RewardScorer.from_dict(d)
    assert (back.threshold, back.encoder_options.batch_size, back.device) == (0.4, 8, ComponentDevice.from_str("cpu"))
    assert RewardScorer.from_dict(RewardScorer().to_dict()).device is None
    p = Pipeline()
    p.add_component("scorer", s)
    assert Pipeline.loads(p.dumps()).get_component("scorer").threshold == 0.4
    assert expandr_haystack.RewardScorer is RewardScorer


# -- the real encoder ----------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_real_encoder_matches_the_indexer_and_ranks_sensibly():
    from haystack_integrations.components.embedders.sentence_transformers import SentenceTransformersDocumentEmbedder

    from expandr_haystack.models import resolve_encoder_path

    doc = Document(id="184", content="an experimental study of the thermal buckling of heated wing panels at high "
                                     "speed, with scale models obeying aeroelastic similarity laws .",
                   meta={"title": "scale models for thermo-aeroelastic research"})
    expansions = [
        ("Aeroelastic scale models of heated high speed aircraft must obey similarity laws for heat transfer and "
         "thermal stresses in wing panels."),
        "The recipe calls for two cups of flour and a pinch of salt.",
        "Wind tunnels are used to test aircraft.",
        "The recipe calls for two cups of flour and a pinch of salt.",
    ]
    answer = "The models must obey aeroelastic and thermal similarity laws."
    scorer = RewardScorer(threshold=0.6)
    scorer.warm_up()
    encoder = scorer._embedder.encoder
    scorer.warm_up()
    assert scorer._embedder.encoder is encoder  # idempotent, and the package's shared encoder
    out = scorer.run(query="what similarity laws must aeroelastic models obey ?", expansions=expansions,
                     document=doc, answer=answer)
    assert out["kept"] and out["chosen"] == expansions[0] and out["rejected"] == expansions[1]
    assert out["rewards"][0] == 2.0 and out["rewards"][1] == out["rewards"][3]
    # the document vector is the one the indexing pipeline stores (title + "\n" + content, same encoder)
    indexer = SentenceTransformersDocumentEmbedder(model=resolve_encoder_path(None), meta_fields_to_embed=["title"],
                                                   normalize_embeddings=True, local_files_only=True,
                                                   progress_bar=False)
    indexer.warm_up()
    stored = np.asarray(indexer.run(documents=[doc])["documents"][0].embedding, dtype=np.float32)
    expected = scorer._embedder.encode(expansions) @ stored
    assert out["document_similarities"] == pytest.approx(expected.tolist(), abs=1e-4)
