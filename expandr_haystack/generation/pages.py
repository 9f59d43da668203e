"""
Hand back the memory of model weights that were read once from a memory-mapped file and are no longer needed.

``transformers`` loads a ``.safetensors`` checkpoint as a private memory map: a weight costs resident memory only once
it is read. `PackedLlamaDecoder` reads every weight once to build its own (prepacked or int8) copy and from then on
uses only that copy, so after packing the model's weights sit in RSS twice (~540 MB for SmolLM2-135M in float32: a
third of `make run`'s footprint, issue 15). Those pages are *clean* file pages: the kernel can drop them and read
them back from the file if the model's own forward ever runs again, with the same bytes.

`release_clean_file_pages(tensors)` does exactly that and nothing more: for each mapping of a regular file that the
tensors lie in, it asks ``madvise(MADV_DONTNEED)`` to drop the pages, and **only when the mapping holds no anonymous
pages** (``Anonymous: 0`` in ``/proc/self/smaps``): a weight changed in place (a merged LoRA adapter, training) lives
in a copied-on-write, anonymous page that ``MADV_DONTNEED`` would revert to the file's bytes, so such a mapping is
left alone, as is any tensor in ordinary (anonymous) memory. (A file page still dirty in the page cache, a file just
written, is safe: the page cache keeps it.) Linux only; elsewhere, or where ``/proc`` or ``madvise`` is missing, it
does nothing and returns 0.

```python
from expandr_haystack.generation.pages import release_clean_file_pages

freed = release_clean_file_pages(model.parameters())  # bytes handed back (0 where nothing was safe to drop)
```
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

MADV_DONTNEED = 4
_PAGE = mmap.PAGESIZE


class Mapping:
    """One entry of ``/proc/self/smaps``: an address range, the file behind it, its resident and anonymous sizes."""

    def __init__(self, start: int, end: int, path: str):
        self.start, self.end, self.path = start, end, path
        self.rss = self.anonymous = 0

    @property
    def clean_file_mapping(self) -> bool:
        """A regular file's mapping whose pages all still come from the file (none copied on write)."""
        return self.path.startswith("/") and self.anonymous == 0


def read_mappings(smaps: str = "/proc/self/smaps") -> list[Mapping]:
    """The process's memory mappings with their ``Rss`` and ``Anonymous`` sizes (bytes)."""
    mappings: list[Mapping] = []
    fields = {"Rss:": "rss", "Anonymous:": "anonymous"}
    with open(smaps) as lines:
        for line in lines:
            parts = line.split()
            if not parts:
                continue
            if parts[0] in fields and mappings:
                setattr(mappings[-1], fields[parts[0]], int(parts[1]) * 1024)
            elif "-" in parts[0] and not parts[0].endswith(":"):
                start, end = (int(x, 16) for x in parts[0].split("-"))
                mappings.append(Mapping(start, end, parts[5] if len(parts) > 5 else ""))
    return mappings


def release_clean_file_pages(tensors: Iterable[torch.Tensor]) -> int:
    """
    Drop the resident pages of the clean file mappings that `tensors` lie in (see the module docstring); returns
    the bytes of resident memory handed back (0 off Linux or when nothing was safe to drop). The tensors stay valid:
    a later read faults the same bytes back in from the file.
    """
    if not sys.platform.startswith("linux") or not Path("/proc/self/smaps").exists():
        return 0
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    mappings = read_mappings()
    hit: dict[int, Mapping] = {}
    for tensor in tensors:
        if tensor.device.type != "cpu" or tensor.numel() == 0:
            continue
        address = tensor.untyped_storage().data_ptr()
        for mapping in mappings:
            if mapping.start <= address < mapping.end:
                hit[mapping.start] = mapping
                break
    freed = 0
    for mapping in hit.values():
        if not mapping.clean_file_mapping:
            logger.debug("Left %s resident: pages of it were written (copied on write).", mapping.path)
            continue
        if madvise(mapping.start, mapping.end - mapping.start, MADV_DONTNEED) == 0:
            freed += mapping.rss
    return freed
