"""
Hand back the memory of model weights that were read once from a memory-mapped file and are no longer needed.

``transformers`` loads a ``.safetensors`` checkpoint as a private memory map: a weight costs resident memory only once
it is read. `PackedLlamaDecoder` reads every weight once to build its own (prepacked or int8) copy of the projections
and the vocabulary head and from then on decodes with that copy (only the embedding rows of the tokens it meets and
the norm vectors are read from the model's tensors again), so after packing the model's weights sit in RSS twice
(~540 MB for SmolLM2-135M in float32: a quarter of `make run`'s footprint). Those pages are *clean* file
pages: the kernel can drop them and read them back from the file when they are used again, with the same bytes.

`release_clean_file_pages(tensors)` does exactly that and nothing more: for each mapping the tensors lie in, it asks
``madvise(MADV_DONTNEED)`` to drop the pages, and **only for a private mapping of a regular file with no
copied-on-write page** (``Anonymous: 0`` and ``Swap: 0`` in ``/proc/self/smaps``, every field present, no special
``VmFlags``): a weight changed in place (a merged LoRA adapter, training) lives in an anonymous page (in memory or
swapped out) that ``MADV_DONTNEED`` would revert to the file's bytes, so such a mapping is left alone, as is any
tensor in ordinary (anonymous) memory. (A file page still dirty in the page cache, a file just written, is safe: the
page cache keeps it.) Linux only; elsewhere, or where ``/proc`` or ``madvise`` is missing, it does nothing and
returns 0.

```python
from expandr_haystack.generation.pages import release_clean_file_pages

freed = release_clean_file_pages(model.parameters())  # bytes handed back (0 where nothing was safe to drop)
```
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import stat
from collections.abc import Iterable
from pathlib import Path

import torch

from expandr_haystack.models import libc_function

logger = logging.getLogger(__name__)

MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)
#: smaps fields read (kB); a mapping missing any of them is never dropped
FIELDS = {"Rss:": "rss", "Anonymous:": "anonymous", "Swap:": "swap", "Private_Hugetlb:": "hugetlb"}
#: VmFlags of mappings that are not ordinary file pages (I/O, pure PFN, mixed map, hugetlb)
SPECIAL_FLAGS = {"io", "pf", "mm", "ht"}


class Mapping:
    """One entry of ``/proc/self/smaps``: an address range, its permissions, the file behind it, its sizes (bytes,
    None where smaps did not say) and flags."""

    def __init__(self, start: int, end: int, perms: str, path: str):
        self.start, self.end, self.perms, self.path = start, end, perms, path
        self.rss = self.anonymous = self.swap = self.hugetlb = None
        self.flags: set[str] = set()

    @property
    def clean_file_mapping(self) -> bool:
        """A private mapping of a regular file whose pages all still come from the file: none copied on write (in
        memory or swapped out), no special memory, every size known."""
        sizes = (self.rss, self.anonymous, self.swap, self.hugetlb)
        if any(size is None for size in sizes) or self.anonymous or self.swap or self.hugetlb:
            return False
        if not self.perms.endswith("p") or self.flags & SPECIAL_FLAGS or self.path.endswith(" (deleted)"):
            return False
        try:
            return self.path.startswith("/") and stat.S_ISREG(os.stat(self.path).st_mode)
        except OSError:
            return False


def read_mappings(smaps: str = "/proc/self/smaps") -> list[Mapping]:
    """The process's memory mappings (`Mapping`) as ``/proc/self/smaps`` lists them."""
    mappings: list[Mapping] = []
    with open(smaps) as lines:
        for line in lines:
            parts = line.split(maxsplit=5)  # the path (6th column) may contain spaces
            if not parts:
                continue
            if parts[0] in FIELDS and mappings:
                setattr(mappings[-1], FIELDS[parts[0]], int(parts[1]) * 1024)
            elif parts[0] == "VmFlags:" and mappings:
                mappings[-1].flags = set(line.split()[1:])
            elif "-" in parts[0] and not parts[0].endswith(":"):
                start, end = (int(x, 16) for x in parts[0].split("-"))
                path = parts[5].rstrip("\n") if len(parts) > 5 else ""
                mappings.append(Mapping(start, end, parts[1], path))
    return mappings


def release_clean_file_pages(tensors: Iterable[torch.Tensor]) -> int:
    """
    Drop the resident pages of the clean file mappings that `tensors` lie in (see the module docstring); returns
    the bytes of resident memory handed back (0 off Linux or when nothing was safe to drop). The tensors stay valid:
    a later read faults the same bytes back in from the file.

    Precondition: nothing writes these tensors while this runs (smaps is read first, the pages dropped after; a write
    in between would be lost). The packed decoder calls it right after reading the weights, under its lock.
    """
    madvise = libc_function("madvise")
    if madvise is None or not Path("/proc/self/smaps").exists():
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    mappings = read_mappings()
    hit: dict[int, Mapping] = {}
    for tensor in tensors:
        if tensor.device.type != "cpu" or tensor.numel() == 0:
            continue
        storage = tensor.untyped_storage()
        low, high = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
        for mapping in mappings:  # every mapping the storage overlaps (the kernel may have split one)
            if mapping.start < high and low < mapping.end:
                hit[mapping.start] = mapping
    freed = 0
    for mapping in hit.values():
        if not mapping.clean_file_mapping:
            logger.debug("Left %s resident: not a clean private file mapping.", mapping.path or "memory")
            continue
        if madvise(mapping.start, mapping.end - mapping.start, MADV_DONTNEED) == 0:
            freed += mapping.rss
    return freed
