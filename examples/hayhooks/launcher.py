"""
`hayhooks run` as a child process, for the tests and benchmarks (a user runs the command itself: README.md here).

    server = start(pipelines_dir, cwd=folder, log=log_file, env={"PG_CONN_STR": dsn})   # once /status answers
    server.wait_for("expandr_search")    # fails, with the server's log, unless that pipeline deployed
    httpx.post(f"{server.url}/expandr_search/run", json={"query": "..."})
    server.stop()                         # SIGINT (graceful), SIGKILL after `grace` seconds

The server listens on 127.0.0.1 only; its stdout and stderr go to `log` (a file: a pipe nobody reads would block it).
A server that exits or does not answer in time raises `ServerError` with the end of that log.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

#: What every server gets unless `env` says otherwise: no network, no telemetry.
QUIET_ENV = {"HF_HUB_OFFLINE": "1", "HAYSTACK_TELEMETRY_ENABLED": "False", "TOKENIZERS_PARALLELISM": "false"}


class ServerError(RuntimeError):
    """The server did not start, did not deploy a pipeline, or died."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hayhooks_command() -> list[str]:
    """The `hayhooks` command of this interpreter's environment (its console script, else the CLI through python)."""
    script = Path(sys.executable).with_name("hayhooks")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from hayhooks.cli import hayhooks_cli; hayhooks_cli()"]


@dataclass
class HayhooksServer:
    process: subprocess.Popen
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the server's output, without the access lines of /status polls."""
        try:
            lines = self.log.read_text(errors="replace").splitlines(keepends=True)
        except OSError as error:
            return f"(no log: {error})"
        return "".join(line for line in lines if '"GET /status ' not in line)[-chars:]

    def fail(self, why: str) -> ServerError:
        return ServerError(f"hayhooks server on port {self.port}: {why}\n--- end of its log ({self.log}) ---\n"
                           f"{self.log_tail()}")

    def status(self) -> dict:
        response = httpx.get(f"{self.url}/status", timeout=10)
        response.raise_for_status()
        return response.json()

    def wait_ready(self, timeout: float) -> dict:
        """Poll /status until it answers (startup deployment is over by then); its JSON."""
        deadline = time.perf_counter() + timeout
        while True:
            if self.process.poll() is not None:
                raise self.fail(f"exited with code {self.process.returncode} before answering /status")
            try:
                return self.status()
            except httpx.HTTPError:
                if time.perf_counter() > deadline:
                    raise self.fail(f"/status did not answer within {timeout:.0f} s") from None
                time.sleep(0.25)

    def wait_for(self, *pipelines: str, timeout: float = 120.0) -> None:
        """Fail unless every pipeline named is deployed. Hayhooks deploys its folder's pipelines before /status first
        answers (and `deploy-yaml` / `deploy_files` answer once deployed), so one look decides: a missing one failed
        to deploy, and the log says why."""
        missing = sorted(set(pipelines) - set(self.wait_ready(timeout).get("pipelines", [])))
        if missing:
            raise self.fail(f"pipeline(s) {missing} not deployed (the reason is in the log)")

    def stop(self, grace: float = 15.0) -> int:
        """SIGINT (uvicorn's graceful shutdown), then SIGKILL to the process group after `grace` s; the exit code."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # already gone
                os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):  # already gone
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        return self.process.returncode


def die_with_parent() -> list[str]:
    """A command prefix that sends the server SIGTERM when the process that started it dies (util-linux `setpriv`,
    kept across exec), so that a test run or benchmark killed before its cleanup leaves no server behind; none where
    `setpriv` is missing."""
    return ["setpriv", "--pdeathsig", "TERM", "--"] if shutil.which("setpriv") else []


def spawn(pipelines_dir: str | Path, cwd: str | Path, log: str | Path, env: dict[str, str] | None = None,
          port: int | None = None, drop_env: tuple[str, ...] = ()) -> HayhooksServer:
    """
    Launch `hayhooks run --host 127.0.0.1 --port PORT --pipelines-dir DIR` in `cwd` (where Hayhooks looks for a
    .env) with this process's environment plus `QUIET_ENV` and `env`, less the variables named in `drop_env`, its
    output written to the file `log`; return at once (`wait_ready` waits for it to answer).
    """
    port = port or free_port()
    child_env = {**os.environ, **QUIET_ENV, **(env or {})}
    for name in drop_env:
        child_env.pop(name, None)
    command = [*die_with_parent(), *hayhooks_command(), "run", "--host", "127.0.0.1", "--port", str(port),
               "--pipelines-dir", str(pipelines_dir)]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=cwd, env=child_env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    return HayhooksServer(process, port, Path(log))


def start(pipelines_dir: str | Path, cwd: str | Path, log: str | Path, env: dict[str, str] | None = None,
          port: int | None = None, drop_env: tuple[str, ...] = (), timeout: float = 120.0) -> HayhooksServer:
    """`spawn`, then wait until /status answers (the pipelines in DIR are deployed or skipped by then: check with
    `wait_for`). A server that exits or does not answer within `timeout` seconds is stopped: `ServerError`."""
    server = spawn(pipelines_dir, cwd, log, env, port, drop_env)
    try:
        server.wait_ready(timeout)
    except BaseException:
        server.stop(grace=5)
        raise
    return server
