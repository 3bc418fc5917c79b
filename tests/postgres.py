"""A real PostgreSQL server for the tests: Debian's ``postgresql`` package,
in a temporary directory, listening on 127.0.0.1 (and a socket in that
directory) only, run as an unprivileged user, with password authentication
over TCP so the tests see that the password never leaks. One per session
(:func:`tests.conftest.postgres`); each test takes a database of its own."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import itertools
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import free_port

USER = "postgres"
"""The system user the server runs as (Debian's package creates it); also the
database superuser."""


def find_bindir() -> Path | None:
    """The newest installed PostgreSQL's bin directory (Debian's layout)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parent.parent.name),
    )
    return Path(found[-1]).parent if found else None


class PostgresServer:
    """One server; :meth:`database` gives a test a fresh database's URL."""

    def __init__(self, bindir: Path, primary: PostgresServer | None = None) -> None:
        """A new server, or (with ``primary``) a streaming standby of it:
        a base backup of the primary's data, with its password."""
        self.bindir = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="ise-postgres-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.password: str = primary.password if primary else secrets.token_urlsafe(18)
        self._names = itertools.count(1)
        self._as_user: list[str] = []
        if os.geteuid() == 0:  # initdb refuses root: the server runs as postgres
            pwd.getpwnam(USER)  # KeyError: no such user (the fixture skips)
            os.chown(self.dir, pwd.getpwnam(USER).pw_uid, pwd.getpwnam(USER).pw_gid)
            os.chmod(self.dir, 0o700)
            self._as_user = ["runuser", "-u", USER, "--"]
        if primary is None:
            self._initdb()
        else:
            # Over the primary's socket (initdb's pg_hba trusts local
            # replication); -R makes it a standby that follows the primary.
            self._run(
                "pg_basebackup", "-D", str(self.data), "-h", str(primary.dir),
                "-p", str(primary.port), "-U", USER, "-X", "stream", "-R", "--no-sync",
            )  # fmt: skip
        with (self.data / "postgresql.conf").open("a") as conf:  # the last setting wins
            conf.write(
                f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.dir}'\n"
                "fsync = off\nshared_buffers = 16MB\nmax_connections = 40\n"
            )
        self.start()

    def _initdb(self) -> None:
        pwfile = self.dir / "pw"
        pwfile.write_text(self.password)
        if self._as_user:
            os.chown(pwfile, pwd.getpwnam(USER).pw_uid, -1)
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            USER,
            f"--pwfile={pwfile}",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--no-sync",
        )
        pwfile.unlink()

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run(
            [*self._as_user, str(self.bindir / tool), *args],
            check=True,
            capture_output=True,
            timeout=120,
        )

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "log"), "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def restart(self) -> None:
        # -l: the server's output must not hold pg_ctl's pipe open.
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.dir / "log"), "-m", "fast", "-w",
            "restart",
        )  # fmt: skip

    def standby(self) -> PostgresServer:
        """A streaming standby of this server, replicated synchronously: a
        commit on this server returns once the standby has it, so a failover
        to it loses no acknowledged write."""
        import psycopg

        standby = PostgresServer(self.bindir, primary=self)
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
            conn.execute("SELECT pg_reload_conf()")
            deadline = time.monotonic() + 30
            while (
                conn.execute(
                    "SELECT 1 FROM pg_stat_replication WHERE sync_state = 'sync'"
                ).fetchone()
                is None
            ):
                if time.monotonic() > deadline:
                    raise TimeoutError("the standby did not become synchronous in 30 s")
                time.sleep(0.05)
        return standby

    def promote(self) -> None:
        """Make this standby the primary (as a failover manager would)."""
        self._run("pg_ctl", "-D", str(self.data), "-w", "promote")

    def crash(self) -> None:
        """Stop at once, as a lost machine would (no shutdown checkpoint)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def database(self) -> str:
        """A new, empty database; its URL (with the password)."""
        import psycopg

        name = f"test_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"'.encode())
        return self.url(name)

    def close(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def running_server() -> Iterator[PostgresServer | str]:
    """A server, or why there is none (the caller skips with it)."""
    bindir = find_bindir()
    if bindir is None:
        yield "PostgreSQL is not installed (scripts/setup --test installs it)"
        return
    try:
        import psycopg  # noqa: F401
    except ImportError:
        yield "psycopg is not installed (pip install -e '.[test]')"
        return
    try:
        server = PostgresServer(bindir)
    except KeyError:
        yield f"no {USER} system user to run PostgreSQL as"
        return
    try:
        yield server
    finally:
        server.close()


class FreezableProxy:
    """A TCP proxy on loopback in front of a server. Frozen, it still accepts
    connections but passes nothing on, either way: a server that hangs
    without closing anything (a lost host, a stuck network)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._thawed = asyncio.Event()
        self._thawed.set()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    def freeze(self) -> None:
        self._thawed.clear()

    def thaw(self) -> None:
        self._thawed.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._thawed.wait()
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [writer, up_writer]
        await asyncio.gather(
            self._pump(reader, up_writer), self._pump(up_reader, writer), return_exceptions=True
        )

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self._thawed.wait()
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def close(self) -> None:
        self.thaw()
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()
