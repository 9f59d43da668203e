"""
Run by `tests/training/test_distributed.py` under ``torchrun --nproc_per_node 2`` (gloo, CPU): each rank computes
`FusedInfoNCELoss(gather_across_devices=True)` on its half of a global batch, back-propagates, averages the
gradients over the ranks as DDP does, and rank 0 saves them (and the loss) for the test to compare with one process
on the whole batch. Usage: ``torchrun --nproc_per_node 2 gather_check.py MODEL_DIR OUT_FILE [no-gather]`` (the last
word turns the gathering off: each rank then contrasts only with its own half, the weaker objective).
"""

import sys

import torch
import torch.distributed as dist
from sentence_transformers import SentenceTransformer

from expandr_haystack.training.losses import FusedInfoNCELoss

#: (query, expansion, document, negative) rows of the global batch (4 rows: 2 per rank).
ROWS = [(f"query {i} about {t}", f"an expansion on {t}", f"a document on {t}", f"a document on {o}")
        for i, (t, o) in enumerate([("wings", "slabs"), ("shells", "nozzles"), ("layers", "gears"), ("heat", "flutter")])]


def loss_and_gradients(model_dir: str, rows, gather: bool):
    torch.manual_seed(0)
    model = SentenceTransformer(model_dir, device="cpu")
    model.eval()  # no dropout: the two runs must see the same function
    model.double()  # float64: the comparison is of the objective, not of float32 rounding
    loss_fn = FusedInfoNCELoss(model, temperature=0.05, query_weight=0.5, n_expansions=1, gather_across_devices=gather)
    columns = [[row[c] for row in rows] for c in range(4)]
    features = [model.tokenize(texts) for texts in columns]
    loss = loss_fn(features, torch.zeros(len(rows)))
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def main(model_dir: str, out: str, gather: bool = True) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    share = len(ROWS) // world
    loss, grads = loss_and_gradients(model_dir, ROWS[rank * share:(rank + 1) * share], gather=gather)
    for g in grads.values():  # DDP's all-reduce: the mean of the ranks' gradients
        dist.all_reduce(g)
        g /= world
    dist.all_reduce(loss)
    if rank == 0:
        torch.save({"loss": loss / world, "grads": grads}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], gather=sys.argv[3:] != ["no-gather"])
