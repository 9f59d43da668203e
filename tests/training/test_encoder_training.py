"""
Encoder training (`train_encoder`) with activation checkpointing: the memory lever of the small CPU configs must not
change what is learned.
"""

import numpy as np
import pytest

from expandr_haystack.training.config import ConfigError, RetrieverSettings
from expandr_haystack.training.retriever import train_encoder

ROWS = [
    {"query": f"query {i} about {topic}", "expansion_1": f"a passage on {topic} number {i}",
     "document": f"the document on {topic} with details {i}", "negative_1": f"an unrelated text {i} on {other}"}
    for i, (topic, other) in enumerate([("flutter of wings", "heat in slabs"), ("shell buckling", "rocket nozzles"),
                                        ("boundary layers", "landing gear"), ("heat conduction", "wing flutter")])
]


def _trained_weights(tiny_bert, tmp_path, checkpointing: bool, spy: list) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer

    settings = RetrieverSettings(batch_size=2, epochs=1, learning_rate=1e-3, max_length=32,
                                 gradient_checkpointing=checkpointing, warmup_ratio=0.0)
    out = tmp_path / f"enc-{checkpointing}"
    record = train_encoder(tiny_bert, ROWS, out, settings, fused=True, seed=3, device="cpu", progress_bar=False)
    assert record == {"examples": len(ROWS)}  # one process: no ranks to compare
    spy.append(checkpointing)
    model = SentenceTransformer(str(out), device="cpu")
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.dtype == torch.float32}


def test_checkpointing_is_used_and_learns_the_same_weights(tiny_bert, tmp_path, monkeypatch):
    import torch.utils.checkpoint as torch_checkpoint
    from transformers import modeling_utils

    calls = []
    real = torch_checkpoint.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch_checkpoint, "checkpoint", counting_checkpoint)
    monkeypatch.setattr(modeling_utils, "checkpoint", counting_checkpoint)  # bound there when checkpointing is enabled
    done = []
    plain = _trained_weights(tiny_bert, tmp_path, False, done)
    assert calls == []
    checkpointed = _trained_weights(tiny_bert, tmp_path, True, done)
    assert calls, "gradient_checkpointing=True did not checkpoint any layer"
    from sentence_transformers import SentenceTransformer

    base = SentenceTransformer(tiny_bert, device="cpu").state_dict()
    moved = [k for k in plain if not np.allclose(plain[k].numpy(), base[k].numpy())]
    assert moved, "training changed no weight: the comparison below would be vacuous"
    for key in plain:
        np.testing.assert_allclose(checkpointed[key].numpy(), plain[key].numpy(), atol=1e-5, err_msg=key)


def test_retriever_settings_take_gradient_checkpointing():
    from expandr_haystack.training.config import JointConfig

    cfg = JointConfig.from_dict({"retriever": {"gradient_checkpointing": True}})
    assert cfg.retriever.gradient_checkpointing is True
    assert RetrieverSettings().gradient_checkpointing is False
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        JointConfig.from_dict({"retriever": {"gradient_checkpointing": "sometimes"}})
