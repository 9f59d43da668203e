"""examples/servers/postgres.py: a real PostgreSQL + pgvector server started, stopped and restarted on its data."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import psycopg
import pytest

pytestmark = pytest.mark.integration


def test_server_keeps_its_data_across_restarts(postgres_launcher):
    parent = Path(tempfile.mkdtemp(prefix="expandr-pg-restart-"))
    parent.chmod(0o711)
    data = parent / "data"
    try:
        server = postgres_launcher.start(data)
        assert postgres_launcher.start(data) == server  # already running: the same server, no second one
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            assert conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
            conn.execute("CREATE TABLE kept (v vector(3))")
            conn.execute("INSERT INTO kept VALUES ('[1,2,3]')")
        assert postgres_launcher.stop(data) is True
        assert postgres_launcher.running(data) is None
        assert postgres_launcher.stop(data) is False

        server = postgres_launcher.start(data)  # the same folder: no initdb, the table is still there
        with psycopg.connect(server.dsn) as conn:
            assert conn.execute("SELECT v <=> '[1,2,3]' FROM kept").fetchone()[0] == pytest.approx(0.0)
    finally:
        postgres_launcher.stop(data)
        shutil.rmtree(parent, ignore_errors=True)


def test_a_folder_that_is_not_a_data_folder_is_refused(postgres_launcher, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty and not a PostgreSQL data folder"):
        postgres_launcher.start(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_session_server_answers(postgres):
    with psycopg.connect(postgres.dsn) as conn:
        assert conn.execute("SELECT '[3,4]'::vector <-> '[0,0]'::vector").fetchone()[0] == pytest.approx(5.0)
