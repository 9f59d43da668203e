"""expandr_haystack.files: whole-file writes are atomic and get the permissions a plain open() gives."""

import stat

import pytest

from expandr_haystack.files import atomic_write_text, atomic_writer


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    path = tmp_path / "out.jsonl"
    atomic_write_text(path, "old\n")
    with pytest.raises(RuntimeError), atomic_writer(path, "wb") as f:
        f.write(b"half of the new")
        raise RuntimeError("killed")
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_written_files_get_the_umask_permissions_not_0600(tmp_path):
    atomic_write_text(tmp_path / "a.json", "{}")
    plain = tmp_path / "b.json"
    plain.write_text("{}")  # under the process's umask, as the atomic write
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
