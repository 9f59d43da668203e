"""FusedInfoNCELoss: InfoNCE on ExpandR fused queries (one shared encoder for queries, expansions, documents)."""

from __future__ import annotations

from typing import Any

import torch
from sentence_transformers.base.losses.merged_forward import embed_columns
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
from torch import Tensor

from expandr_haystack.checks import check_int, check_number
from expandr_haystack.core.fusion import fuse


class FusedInfoNCELoss(MultipleNegativesRankingLoss):
    """
    InfoNCE over fused queries, with the positive, hard negatives and in-batch negatives.

    Input columns: (query, expansion_1, ..., expansion_n, document, negative_1, ..., negative_k), the document being
    the positive and n = `n_expansions`. With E the shared encoder and x^ = x / ||x||:

        q~_i = w * E(q_i)^ + (1 - w) * 1/n * sum_m E(e_im)^           (the ExpandR fused query, `fuse`)
        s_ij = cos(q~_i, E(d_j)) / tau                                 d_j over every positive and negative in the batch
        L    = - 1/B * sum_i log( exp(s_i,pos(i)) / sum_j exp(s_ij) )

    The expansion embeddings are stacked on dim -2 and averaged by `expandr_haystack.core.fusion.fuse`, the function
    inference uses, so training and retrieval fuse alike. Every row has exactly n expansion columns (a query with
    fewer expansions repeats the ones it has: `training.retriever.training_examples`).

    Only the fusion is ours; the contrastive part is sentence-transformers' `MultipleNegativesRankingLoss` with
    scale = 1 / tau (paper: tau = 0.02). Use the `NO_DUPLICATES` batch sampler so a query's positive never appears
    as another query's in-batch negative. With `query_weight=1` it is plain InfoNCE on the query alone (the
    supervised fine-tuning baseline without expansion).

    Usage:
    ```python
    loss = FusedInfoNCELoss(model, temperature=0.02, query_weight=0.5, n_expansions=4)
    trainer = SentenceTransformerTrainer(model=model, train_dataset=ds, loss=loss, args=args)
    ```

    :param model: The shared `SentenceTransformer`.
    :param temperature: tau (> 0).
    :param query_weight: w in [0, 1].
    :param n_expansions: n, the expansion columns after the query (>= 1).
    """

    def __init__(self, model, temperature: float = 0.02, query_weight: float = 0.5, n_expansions: int = 1,
                 **kwargs: Any):
        check_number(temperature, "temperature", 0.0, low_open=True)
        check_number(query_weight, "query_weight", 0.0, 1.0)
        check_int(n_expansions, "n_expansions")
        super().__init__(model, scale=1.0 / temperature, **kwargs)  # its `temperature` property is 1 / scale
        self.query_weight = query_weight
        self.n_expansions = n_expansions

    def forward(self, sentence_features, labels: Tensor) -> Tensor:
        n = self.n_expansions
        if len(sentence_features) < n + 2:
            raise ValueError(f"FusedInfoNCELoss(n_expansions={n}) needs the columns (query, {n} expansion(s), "
                             f"document, negatives...); got {len(sentence_features)} column(s).")
        query, *rest = embed_columns(self.model, sentence_features)
        expansions, documents = torch.stack(rest[:n], dim=-2), rest[n:]  # (batch, n, d)
        fused_query = fuse(query, expansions, self.query_weight)
        return self.compute_loss_from_embeddings([fused_query, *documents], labels)

    def get_config_dict(self) -> dict[str, Any]:
        return {**super().get_config_dict(), "query_weight": self.query_weight, "n_expansions": self.n_expansions}
