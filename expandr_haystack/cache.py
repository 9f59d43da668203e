"""
Persistent expansion cache (sqlite).

One row per generated text, keyed by a hash of everything that determines it: model identity (weights and
adapter fingerprints), prompt template, generation settings, query and sample index. A hit costs no model call.
Safe for several threads and processes at once (WAL journal, busy timeout, ``INSERT OR IGNORE``). A corrupt file (a
bad header at open, or a page sqlite finds malformed at any later read or write) is kept aside (never deleted) and a
fresh cache is started (`ExpansionCache._recover`). A pre-filled file that cannot be written (its folder or itself
read-only, e.g. in a container image) is opened read-only and serves hits; see `on_read_only` for misses.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from expandr_haystack.checks import check_choice

logger = logging.getLogger(__name__)

_SCHEMA = "CREATE TABLE IF NOT EXISTS expansions (key TEXT PRIMARY KEY, text TEXT NOT NULL, created REAL NOT NULL)"
#: sqlite's primary result codes of a damaged file: SQLITE_CORRUPT ("malformed"), SQLITE_NOTADB ("not a database").
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26
#: `ExpansionCache(on_read_only=...)`: what a write to a read-only cache does.
ON_READ_ONLY = ("raise", "skip")


def cache_key(**parts) -> str:
    """A stable sha256 over the JSON of ``parts`` (sorted keys)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def check_cache_path(path: Any, optional: bool = True) -> str | Path | None:
    """`path` if it is a file path (str or Path, not blank), or None when `optional`; else a ValueError naming
    `cache`. Components check it at construction, so a bad value in a pipeline YAML fails when it loads."""
    if (path is None and not optional) or (path is not None and (not isinstance(path, (str, Path))
                                                                  or not str(path).strip())):
        raise ValueError(f"`cache` must be a file path (str or Path){' or None' if optional else ''}; got {path!r}.")
    return path


def _is_corrupt(exc: sqlite3.DatabaseError, *codes: int) -> bool:
    """Whether sqlite says the file is damaged (`codes`: only these of SQLITE_CORRUPT, SQLITE_NOTADB)."""
    return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in (codes or (_SQLITE_CORRUPT, _SQLITE_NOTADB))


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

    def __init__(self, path: str | Path, timeout: float = 60.0, on_read_only: str = "raise"):
        """
        :param path: The sqlite file (created with its folder when missing).
        :param timeout: Seconds a write waits for another process's lock.
        :param on_read_only: When the file exists but it or its folder is not writable, it is opened read-only and
            serves hits; a write then raises an OSError naming the file ("raise") or is skipped, with one warning
            that misses are not stored ("skip", the expander's setting).
        """
        check_cache_path(path, optional=False)
        check_choice(on_read_only, "on_read_only", ON_READ_ONLY)
        self.path = Path(path).expanduser()
        self.timeout = timeout
        self.on_read_only = on_read_only
        self.hits = 0
        self.misses = 0
        self._local = threading.local()
        self._counter_lock = threading.Lock()
        self._recover_lock = threading.Lock()
        self._generation = 0  # +1 each time a corrupt file is renamed aside: threads reopen the path
        self._warned_read_only = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OSError(f"`cache`: cannot create the folder for {self.path}: {exc}") from exc
        #: Why the cache is read-only ("its folder ... is not writable" / "the file is not writable"), else None.
        self.read_only = self._read_only_reason()
        self._open_checked()

    # -- connection handling -------------------------------------------------------------------------------
    def _read_only_reason(self) -> str | None:
        """Why an existing cache file cannot be written, from the permissions (None: it can, or does not exist)."""
        if not self.path.is_file():
            return None
        if not os.access(self.path.parent, os.W_OK):
            return f"its folder {self.path.parent} is not writable"
        if not os.access(self.path, os.W_OK):
            return "the file is not writable"
        return None

    def _connect(self) -> sqlite3.Connection:
        if self.read_only:
            # a WAL database needs its -shm file, which nobody can create in a read-only folder: there sqlite reads
            # the file as immutable (no locks, no -shm), unless a -wal file was left (a writer killed), whose rows
            # only a read through the existing -shm sees
            wal = self.path.with_name(self.path.name + "-wal").exists()
            flags = "mode=ro" if wal or os.access(self.path.parent, os.W_OK) else "mode=ro&immutable=1"
            conn = sqlite3.connect(f"file:{quote(str(self.path.absolute()))}?{flags}", uri=True,
                                   timeout=self.timeout, isolation_level=None)
        else:
            conn = sqlite3.connect(str(self.path), timeout=self.timeout, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
        if self.read_only:
            return conn
        try:
            conn.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError:
            pass  # read-only location or locked: keep the default journal
        conn.execute(_SCHEMA)
        return conn

    def _open_checked(self) -> None:
        conn = None
        try:
            conn = self._connect()
            conn.execute("SELECT count(*) FROM expansions").fetchone()
        except sqlite3.DatabaseError as exc:
            if "locked" in str(exc) or "readonly" in str(exc) or "unable to open" in str(exc):
                raise OSError(f"`cache`: cannot open {self.path}: {exc}") from exc
            self._recover(conn, exc)
            self._connect().close()  # the fresh cache
        finally:
            if conn is not None:
                conn.close()

    def _recover(self, conn: sqlite3.Connection | None, exc: sqlite3.DatabaseError) -> None:
        """
        Keep the corrupt file as ``<name>.corrupt-<time>`` and go on with a fresh cache, with a warning naming both
        paths. A file sqlite can still write (page 1 sound, the damage further in) is copied aside and emptied in
        place, by sqlite's backup of an empty cache into it: under its own locks, so every open connection, of any
        thread or process, sees the fresh cache and nothing is renamed under them. Otherwise (a bad header) the
        file is renamed aside with its -wal/-shm files (which would be replayed into a fresh file), and this
        instance's connections reopen the path.
        """
        stamp = int(time.time())
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        for n in range(1, 1000):
            if not aside.exists():
                break
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
        if conn is not None and not self.read_only and _is_corrupt(exc, _SQLITE_CORRUPT):
            try:
                for suffix in ("", "-wal"):
                    if self.path.with_name(self.path.name + suffix).exists():
                        shutil.copyfile(self.path.with_name(self.path.name + suffix), f"{aside}{suffix}")
                with contextlib.closing(sqlite3.connect(":memory:")) as fresh:
                    fresh.execute(f"PRAGMA page_size = {conn.execute('PRAGMA page_size').fetchone()[0]}")
                    fresh.execute(_SCHEMA)
                    fresh.backup(conn)
                logger.warning("Cache file %s is not a valid sqlite database (%s); copied aside to %s and emptied in "
                               "place, starting fresh.", self.path, exc, aside)
                return
            except (OSError, sqlite3.Error) as err:
                logger.debug("Cache file %s cannot be emptied in place (%s); renaming it.", self.path, err)
        with self._counter_lock:
            self._generation += 1  # this instance's connections to the renamed file reopen the path
        if conn is not None:
            conn.close()
        try:
            for suffix in ("", "-wal", "-shm"):
                if self.path.with_name(self.path.name + suffix).exists() or not suffix:
                    os.replace(self.path.with_name(self.path.name + suffix), f"{aside}{suffix}")
        except OSError as err:
            raise OSError(f"`cache`: {self.path} is not a valid sqlite database ({exc}) and cannot be moved aside to "
                          f"{aside} ({err}): pass another `cache` path (or cache=None).") from exc
        logger.warning("Cache file %s is not a valid sqlite database (%s); moved aside to %s, starting fresh.",
                       self.path, exc, aside)
        self.read_only = None  # the fresh file is ours

    @property
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.generation != self._generation:
            conn = self._local.conn = None  # its file was renamed aside (`_recover`, closed there or left to GC)
        if conn is None:
            conn = self._connect()
            self._local.conn, self._local.generation = conn, self._generation
        return conn

    def _run(self, action: str, work: Callable[[sqlite3.Connection], Any]) -> Any:
        """`work` on this thread's connection; sqlite's errors become OSErrors naming the file (`_error`). A corrupt
        file is recovered (`_recover`) by the first thread that meets it, once `work` fails again under the lock (so
        a cache another thread or process has already recovered is only read again), and `work` runs on the fresh
        cache."""
        try:
            return work(self._conn)
        except sqlite3.DatabaseError as exc:
            self._unless_corrupt(exc, action)
        with self._recover_lock:
            try:
                return work(self._conn)
            except sqlite3.DatabaseError as exc:
                self._unless_corrupt(exc, action)
                self._recover(getattr(self._local, "conn", None), exc)
        try:
            return work(self._conn)
        except sqlite3.DatabaseError as exc:
            raise self._error(exc, action) from exc

    def _unless_corrupt(self, exc: sqlite3.DatabaseError, action: str) -> None:
        """Raise `exc` (an OperationalError as `_error`'s OSError naming the file) unless it says the file is
        damaged."""
        if _is_corrupt(exc):
            return
        if isinstance(exc, sqlite3.OperationalError):
            raise self._error(exc, action) from exc
        raise exc

    def _error(self, exc: sqlite3.DatabaseError, action: str) -> OSError:
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
            sql = f"SELECT key, text FROM expansions WHERE key IN ({marks})"
            found.update(self._run("read from", lambda conn, sql=sql, chunk=chunk: conn.execute(sql, chunk).fetchall()))
        with self._counter_lock:
            self.hits += sum(1 for k in keys if k in found)
            self.misses += sum(1 for k in keys if k not in found)
        return found

    def put_many(self, items: dict[str, str]) -> None:
        """Store texts; an existing key keeps its first text (so concurrent writers never duplicate). A read-only
        cache with ``on_read_only="skip"`` stores nothing (one warning)."""
        if not items:
            return
        if self.read_only and self.on_read_only == "skip":
            if not self._warned_read_only:
                self._warned_read_only = True
                logger.warning("Cache %s is read-only (%s): cached expansions are served, new ones are not stored.",
                               self.path, self.read_only)
            return
        now = time.time()
        rows = [(k, v, now) for k, v in items.items()]

        def write(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany("INSERT OR IGNORE INTO expansions (key, text, created) VALUES (?, ?, ?)", rows)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

        self._run("write to", write)

    def __len__(self) -> int:
        return self._run("read from", lambda conn: conn.execute("SELECT count(*) FROM expansions").fetchone()[0])

    def stats(self) -> dict[str, int]:
        """``{"hits", "misses", "entries"}``."""
        return {"hits": self.hits, "misses": self.misses, "entries": len(self)}
