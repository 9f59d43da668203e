import multiprocessing as mp
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from expandr_haystack.cache import ExpansionCache, cache_key


def test_put_get_and_counts(tmp_path):
    c = ExpansionCache(tmp_path / "c.sqlite")
    c.put_many({"a": "x", "b": "y"})
    assert c.get_many(["a", "b", "z"]) == {"a": "x", "b": "y"}
    assert c.stats() == {"hits": 2, "misses": 1, "entries": 2}


def test_first_write_wins(tmp_path):
    c = ExpansionCache(tmp_path / "c.sqlite")
    c.put_many({"a": "first"})
    c.put_many({"a": "second"})
    assert c.get_many(["a"]) == {"a": "first"}


def test_key_depends_on_every_part():
    base = {"model": "m", "prompt": "p", "query": "q", "index": 0, "temperature": 1.0}
    assert cache_key(**base) == cache_key(**dict(reversed(list(base.items()))))
    for k, v in [("model", "m2"), ("query", "q2"), ("index", 1), ("temperature", 0.9)]:
        assert cache_key(**{**base, k: v}) != cache_key(**base)


def test_corrupt_file_is_moved_aside_not_deleted(tmp_path):
    path = tmp_path / "c.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    c = ExpansionCache(path)
    c.put_many({"a": "x"})
    assert c.get_many(["a"]) == {"a": "x"}
    aside = list(tmp_path.glob("c.sqlite.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"this is not")


def _table_leaf(path, middle: bool) -> tuple[int, int]:
    """The page size, and the 1-based number of a leaf page of the `expansions` table: the middle one (rows a full
    read meets) or the right-most (where the next insert goes), from the child pointers of its interior root page
    (sqlite's b-tree page format)."""
    with sqlite3.connect(path) as conn:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'expansions'").fetchone()[0]
    page = path.read_bytes()[(root - 1) * page_size:root * page_size]
    header = 100 if root == 1 else 0
    assert page[header] == 0x05, "the table should span several pages (an interior root)"
    if not middle:
        return page_size, int.from_bytes(page[header + 8:header + 12], "big")
    cells = int.from_bytes(page[header + 3:header + 5], "big")
    cell = int.from_bytes(page[header + 12 + 2 * (cells // 2):header + 14 + 2 * (cells // 2)], "big")
    return page_size, int.from_bytes(page[cell:cell + 4], "big")


@pytest.mark.parametrize("first_use", ["read", "write"])
def test_file_corrupted_past_its_header_is_kept_aside_not_deleted(tmp_path, caplog, first_use):
    """A valid cache whose page 1 is intact (it opens) but one of its table pages is overwritten (read: a page in the
    middle of the file; write: the last leaf, where the insert goes): the first read or write that meets the damage
    (sqlite: "database disk image is malformed") keeps the file aside (a copy: the file itself is emptied in place,
    so connections of other threads and processes see the fresh cache too), with a warning naming both paths, and
    goes on with a fresh cache (before: that raw sqlite3.DatabaseError on every query, naming no file)."""
    path = tmp_path / "c.sqlite"
    keys = [cache_key(query=f"q{i}") for i in range(400)]
    ExpansionCache(path).put_many({k: f"an expansion of {k} " * 4 for k in keys})
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # every row in the main file
    cache = ExpansionCache(path)  # opens: the header and the index are sound
    worker = ThreadPoolExecutor(max_workers=1)  # one more thread, with its own connection, opened before the damage
    assert len(worker.submit(cache.get_many, keys[:3]).result()) == 3
    page_size, leaf = _table_leaf(path, middle=first_use == "read")
    assert 1 < leaf and (first_use == "write" or leaf < path.stat().st_size // page_size)
    with path.open("r+b") as f:
        f.seek((leaf - 1) * page_size)
        f.write(b"\xff" * page_size)
    damaged = path.read_bytes()
    caplog.set_level("WARNING", logger="expandr_haystack.cache")
    if first_use == "read":
        assert cache.get_many(keys) == {}  # the damaged file's rows are gone with it: all misses
    else:
        cache.put_many({"new": "x"})  # lands on the damaged page: done again on the fresh cache
        assert cache.get_many(["new", keys[0]]) == {"new": "x"}
    kept, = [a for a in tmp_path.glob("c.sqlite.corrupt-*") if not a.name.endswith(("-wal", "-shm"))]
    assert kept.read_bytes() == damaged  # kept as it was, never deleted
    warning, = [r.getMessage() for r in caplog.records if "aside" in r.getMessage()]
    assert warning == (f"Cache file {path} is not a valid sqlite database (database disk image is malformed); copied "
                       f"aside to {kept} and emptied in place, starting fresh.")
    worker.submit(cache.put_many, {"after": "y"}).result()  # its connection sees the fresh cache
    worker.shutdown()
    assert cache.get_many(["after"]) == {"after": "y"} and ExpansionCache(path).get_many(["after"]) == {"after": "y"}
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_bad_path_argument():
    with pytest.raises(ValueError, match="`cache`"):
        ExpansionCache("")


def test_threads_share_one_cache(tmp_path):
    c = ExpansionCache(tmp_path / "c.sqlite")

    def work(t):
        for i in range(50):
            c.put_many({f"k{i}": f"t{t}"})

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(c) == 50


def _proc(path, start):
    c = ExpansionCache(path)
    for i in range(start, start + 100):
        c.put_many({f"k{i}": "x"})


def test_processes_share_one_cache(tmp_path):
    path = str(tmp_path / "c.sqlite")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_proc, args=(path, s)) for s in (0, 50, 100)]
    [p.start() for p in procs]
    [p.join(300) for p in procs]  # spawned interpreters import haystack: slow on a loaded machine
    assert all(p.exitcode == 0 for p in procs)
    rows = sqlite3.connect(path).execute("SELECT count(*), count(DISTINCT key) FROM expansions").fetchone()
    assert rows == (200, 200)


def test_model_identity_follows_content_not_location(tmp_path):
    import shutil

    from expandr_haystack.models import model_identity

    a = tmp_path / "a" / "adapter"
    a.mkdir(parents=True)
    (a / "adapter_config.json").write_text('{"r": 8}')
    (a / "adapter_model.safetensors").write_bytes(b"\x00" * 1000)
    b = tmp_path / "moved" / "adapter"
    shutil.copytree(a, b)
    assert model_identity("org/model", str(a)) == model_identity("org/model", str(b))
    (b / "adapter_model.safetensors").write_bytes(b"\x01" * 1000)
    assert model_identity("org/model", str(a)) != model_identity("org/model", str(b))


def test_release_models_hands_freed_memory_back(monkeypatch):
    """`release_models` forgets the memoised models and trims the C heap (glibc keeps freed tensors otherwise)."""
    import sys as _sys

    from expandr_haystack import models

    calls = []
    monkeypatch.setattr(models, "return_freed_memory", lambda: calls.append(1) or True)
    models._LLMS[("x",)] = object()
    models.release_models()
    assert calls == [1] and not models._LLMS
    monkeypatch.undo()
    assert models.return_freed_memory() is _sys.platform.startswith("linux")


def test_a_model_card_does_not_change_the_identity(tmp_path):
    """The save step writes README.md model cards into adapter folders: cached expansions must stay valid."""
    from expandr_haystack.models import model_identity

    a = tmp_path / "adapter"
    a.mkdir()
    (a / "adapter_config.json").write_text('{"r": 8}')
    (a / "adapter_model.safetensors").write_bytes(b"\x00" * 1000)
    before = model_identity("org/model", str(a))
    (a / "README.md").write_text("# model card\n")
    assert model_identity("org/model", str(a)) == before
    (a / "adapter_config.json").write_text('{"r": 16}')
    assert model_identity("org/model", str(a)) != before
