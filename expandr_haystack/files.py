"""
Writing files so that a kill never leaves half of one: atomic replace for whole files, fsynced lines for logs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

logger = logging.getLogger(__name__)

_UMASK = os.umask(0)  # read once, at import (reading it means setting it)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_writer(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """
    A file object whose content replaces `path` when the block ends (written to a temporary file in the same folder,
    fsynced, then renamed over it; nothing changes at `path` if the block raises). The file gets the permissions a
    plain ``open`` would give (0666 less the umask), not `mkstemp`'s 0600.

    :param mode: "w" (text, UTF-8) or "wb".
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to a temporary file in the same folder, fsync, then rename it over `path`."""
    with atomic_writer(path) as f:
        f.write(text)
    return Path(path)


def atomic_write_json(path: str | Path, data: Any) -> Path:
    """`atomic_write_text` of `data` as indented JSON (non-JSON values written with `str`)."""
    return atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def atomic_save_figure(figure, path: str | Path, dpi: int = 120) -> Path:
    """Save a matplotlib figure through a temporary file in the same folder (format from `path`'s suffix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    figure.savefig(tmp, dpi=dpi)
    os.replace(tmp, path)
    return path


def append_jsonl(f, row: dict[str, Any]) -> None:
    """Append one JSON line to an open text file and fsync it (a kill loses at most the line being written)."""
    f.write(json.dumps(row, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


def cut_partial_last_line(path: Path) -> str:
    """The text of a JSONL file, after cutting off a partial last line (left by a kill mid-write) from the file."""
    if not path.exists():
        return ""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        logger.warning("%s: removing a partial last line (%d bytes) left by an interrupted run.", path,
                       len(data) - keep)
        with path.open("r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
        data = data[:keep]
    return data.decode("utf-8")


__all__ = ["append_jsonl", "atomic_save_figure", "atomic_write_json", "atomic_write_text", "atomic_writer",
           "cut_partial_last_line"]
