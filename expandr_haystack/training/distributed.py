"""
What a joint-training process needs to know and do when several run together under `torchrun` or
`accelerate launch` (DDP): its rank, its device, and a few small collective steps.

The launchers set ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; a plain ``python training/joint.py`` run is rank 0 of
1 and every function here is then free (no process group is made). The trainers (sentence-transformers', TRL's)
shard the training rows themselves through Accelerate; everything else a round does (corpus embedding, mining,
generation, pairs, evaluation) runs on rank 0 while the other ranks wait (`RunFolder.run_on_main`), so every rank
trains on the same rows. The collective steps here (`barrier`, `broadcast`, `gather`) go over a CPU (gloo) group of
their own with a long timeout, so a rank that waits while rank 0 generates for hours does not time out, on GPUs too.

Usage:
```python
from expandr_haystack.training.distributed import barrier, broadcast, is_main_process, rank_device

device = rank_device("cuda")        # "cuda:<LOCAL_RANK>" under torchrun, "cuda" in a plain run
outcome = broadcast(do_it() if is_main_process() else None)   # rank 0's value on every rank
barrier()                           # every rank reached this line
```
"""

from __future__ import annotations

import datetime
import hashlib
import os
from typing import Any

#: How long a collective step of ours waits for the other ranks (rank 0 may generate for hours meanwhile).
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=48)

_group: Any = None  # the gloo group of `_coordination_group`, made once per process


def rank() -> int:
    """This process's rank: 0 in a plain run; ``$RANK`` under `accelerate launch` / `torchrun`."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's rank on its machine (``$LOCAL_RANK``; 0 in a plain run): the GPU it trains on."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    """The number of processes of the run: 1 in a plain run; ``$WORLD_SIZE`` under `accelerate launch` / `torchrun`."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True on the single process of a plain run, and on rank 0 under `accelerate launch` / `torchrun`."""
    return rank() == 0


def rank_device(device: str | None) -> str | None:
    """
    The device this rank works on: a bare "cuda" (or None on a CUDA machine) becomes "cuda:<LOCAL_RANK>" in a
    launch of several processes, so the ranks of one machine do not all start on GPU 0; "cpu" and an explicit
    "cuda:N" are kept (one process per GPU is the launcher's job then).
    """
    if world_size() == 1:
        return device
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else None
    # one GPU per process (CUDA_VISIBLE_DEVICES set per rank) shows each rank a single device
    return f"cuda:{local_rank() % max(torch.cuda.device_count(), 1)}" if device == "cuda" else device


def _coordination_group():
    """The gloo group of our collective steps (the default process group is made first if no trainer made it:
    NCCL where this rank has a GPU, else gloo, as Accelerate would)."""
    global _group
    import torch
    import torch.distributed as dist

    if _group is None:
        if not dist.is_initialized():  # as Accelerate would: gloo for CPU tensors, NCCL for CUDA ones
            backend = "gloo"
            if torch.cuda.is_available():
                torch.cuda.set_device(local_rank() % torch.cuda.device_count())
                backend = "cpu:gloo,cuda:nccl"
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=1800))
        _group = dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)
    return _group


def barrier() -> None:
    """Wait until every rank reaches this call (nothing in a plain run)."""
    if world_size() > 1:
        import torch.distributed as dist

        dist.barrier(group=_coordination_group())


def broadcast(value: Any) -> Any:
    """Rank 0's `value` (any picklable object) on every rank; the others' `value` is ignored."""
    if world_size() == 1:
        return value
    import torch.distributed as dist

    box = [value if is_main_process() else None]
    dist.broadcast_object_list(box, src=0, group=_coordination_group())
    return box[0]


def gather(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank (``[value]`` in a plain run)."""
    if world_size() == 1:
        return [value]
    import torch.distributed as dist

    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, value, group=_coordination_group())
    return out


def weights_digest(tensors: dict[str, Any]) -> str:
    """A SHA-256 of named tensors (names, shapes, dtypes, bytes): equal on two ranks iff their weights are."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(data.shape)}:{data.dtype}".encode())
        digest.update(data.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def compare_ranks(module) -> tuple[dict[str, Any], list[int]]:
    """
    Compare `module`'s trainable weights on every rank after a training step (DDP keeps them equal; a difference
    means the ranks trained on different rows or settings). Returns ``({"weights_sha256": ..., "ranks": N}, the
    ranks whose weights differ from rank 0's)``; ``({}, [])`` in a plain run (nothing to compare). Callers save rank
    0's model first, then raise (`ranks_differ_error`), so a mismatch never costs the trained model.
    """
    if world_size() == 1:
        return {}, []
    # the trainable parameters: a LoRA adapter's, not the frozen base under it
    mine = weights_digest({n: p for n, p in module.named_parameters() if p.requires_grad})
    digests = gather(mine)
    return {"weights_sha256": mine, "ranks": len(digests)}, [r for r, d in enumerate(digests) if d != digests[0]]


def ranks_differ_error(what: str, differ: list[int]) -> RuntimeError:
    return RuntimeError(f"{what}: the weights of rank(s) {differ} differ from rank 0's after training (rank 0's were "
                        f"saved); the ranks did not train the same model (same rows, same settings?).")


__all__ = ["COLLECTIVE_TIMEOUT", "barrier", "broadcast", "compare_ranks", "gather", "is_main_process", "local_rank",
           "rank", "rank_device", "ranks_differ_error", "weights_digest", "world_size"]
