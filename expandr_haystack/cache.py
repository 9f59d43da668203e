"""
Persistent expansion cache (sqlite).

One row per generated text, keyed by a hash of everything that determines it: model identity (weights and
adapter fingerprints), prompt template, generation settings, query and sample index. A hit costs no model call.
Safe for several threads and processes at once (WAL journal, busy timeout, ``INSERT OR IGNORE``); a corrupt file is
moved aside (never deleted) and a fresh cache is started.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path

logger = logging.getLogger(__name__)

_SCHEMA = "CREATE TABLE IF NOT EXISTS expansions (key TEXT PRIMARY KEY, text TEXT NOT NULL, created REAL NOT NULL)"


def cache_key(**parts) -> str:
    """A stable sha256 over the JSON of ``parts`` (sorted keys)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


class ExpansionCache:
    """
    A sqlite key -> text store with hit/miss counters.

    Usage:
    ```python
    cache = ExpansionCache("expansions.sqlite")
    cache.put_many({"k1": "a passage"})
    cache.get_many(["k1", "k2"])   # {"k1": "a passage"}
    cache.hits, cache.misses        # 1, 1
    ```
    """

    def __init__(self, path: str | Path, timeout: float = 60.0):
        if not isinstance(path, (str, Path)) or not str(path).strip():
            raise ValueError(f"`cache` must be a file path (str or Path); got {path!r}.")
        self.path = Path(path).expanduser()
        self.timeout = timeout
        self.hits = 0
        self.misses = 0
        self._local = threading.local()
        self._counter_lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OSError(f"`cache`: cannot create the folder for {self.path}: {exc}") from exc
        self._open_checked()

    # -- connection handling -------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(str(self.path), timeout=self.timeout, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
        try:
            conn.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError:
            pass  # read-only location or locked: keep the default journal
        conn.execute(_SCHEMA)
        return conn

    def _open_checked(self) -> None:
        try:
            conn = self._connect()
            conn.execute("SELECT count(*) FROM expansions").fetchone()
            conn.close()
        except sqlite3.DatabaseError as exc:
            if "locked" in str(exc) or "readonly" in str(exc) or "unable to open" in str(exc):
                raise OSError(f"`cache`: cannot open {self.path}: {exc}") from exc
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            logger.warning("Cache file %s is not a valid sqlite database (%s); moved aside to %s, starting fresh.",
                           self.path, exc, aside)
            self.path.rename(aside)
            conn = self._connect()
            conn.close()

    @property
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
        return conn

    def _error(self, exc: sqlite3.OperationalError, action: str) -> OSError:
        """An OSError naming the cache file, what failed and what to do (locked, read-only, ...)."""
        text = str(exc)
        if "locked" in text or "busy" in text:
            hint = (f"it stayed locked by another process for longer than the timeout ({self.timeout:g} s); "
                    f"retry later or give each job its own `cache` file")
        elif "readonly" in text or "read-only" in text:
            hint = "the file or its folder is read-only: pass a writable `cache` path (or cache=None)"
        else:
            hint = text
        return OSError(f"`cache`: cannot {action} {self.path}: {hint} (sqlite: {text}).")

    # -- API -----------------------------------------------------------------------------------------------
    def get_many(self, keys: Iterable[str]) -> dict[str, str]:
        """The cached texts for the keys that are present; counts hits and misses."""
        keys = list(keys)
        found: dict[str, str] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            try:
                rows = self._conn.execute(f"SELECT key, text FROM expansions WHERE key IN ({marks})",
                                          chunk).fetchall()
            except sqlite3.OperationalError as exc:
                raise self._error(exc, "read from") from exc
            found.update(rows)
        with self._counter_lock:
            self.hits += sum(1 for k in keys if k in found)
            self.misses += sum(1 for k in keys if k not in found)
        return found

    def put_many(self, items: dict[str, str]) -> None:
        """Store texts; an existing key keeps its first text (so concurrent writers never duplicate)."""
        if not items:
            return
        now = time.time()
        try:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise self._error(exc, "write to") from exc
        try:
            conn.executemany("INSERT OR IGNORE INTO expansions (key, text, created) VALUES (?, ?, ?)",
                             [(k, v, now) for k, v in items.items()])
            conn.execute("COMMIT")
        except BaseException as exc:
            conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError):
                raise self._error(exc, "write to") from exc
            raise

    def __len__(self) -> int:
        try:
            return self._conn.execute("SELECT count(*) FROM expansions").fetchone()[0]
        except sqlite3.OperationalError as exc:
            raise self._error(exc, "read from") from exc

    def stats(self) -> dict[str, int]:
        """``{"hits", "misses", "entries"}``."""
        return {"hits": self.hits, "misses": self.misses, "entries": len(self)}
