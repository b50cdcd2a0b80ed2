"""A real PostgreSQL for the suite: initdb into a temp dir, pg_ctl on a free port.

``GATEWAY_TEST_PG_DSN`` (a ``postgresql://`` URL of a role that may create databases)
skips the start and uses that server instead. Otherwise the binaries are looked up in
``GATEWAY_PG_BIN``, then ``/usr/lib/postgresql/<newest>/bin``, then ``PATH``.

initdb refuses to run as root, and CI runs as root: then the cluster belongs to the
``postgres`` OS user (created when missing) and every server command runs through
``runuser -u postgres``. The temp dir is made outside pytest's 0700 tree so that user can
enter it; the server listens on 127.0.0.1 and on a socket in that dir, with fsync off.

Every test that asks for ``pg_url`` gets a database of its own, dropped afterwards.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from gateway.serve.ports import free_port

__all__ = ["PG_USER", "PostgresServer", "find_binaries", "unavailable_reason"]

PG_USER = "postgres"  # the OS user that owns the cluster when we run as root
_ROOT = os.name == "posix" and os.geteuid() == 0


def find_binaries() -> Path | None:
    """The directory holding initdb and pg_ctl, or None."""
    configured = os.environ.get("GATEWAY_PG_BIN")
    candidates = [Path(configured)] if configured else []
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    candidates += versions
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).parent)
    for directory in candidates:
        if (directory / "initdb").exists() and (directory / "pg_ctl").exists():
            return directory
    return None


def unavailable_reason() -> str | None:
    """Why no PostgreSQL can be started here (None: one can, or a DSN is given)."""
    if os.environ.get("GATEWAY_TEST_PG_DSN"):
        return None
    if find_binaries() is None:
        return (
            "PostgreSQL is not installed (no initdb): run `python3 dev.py test` as root to "
            "install it, or `apt-get install postgresql`, or set GATEWAY_TEST_PG_DSN"
        )
    return None


def _ensure_user() -> None:
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        subprocess.run(
            ["/usr/sbin/useradd", "--system", "--user-group", "--no-create-home", PG_USER],
            check=True,
            capture_output=True,
        )


def _as_owner(args: list[str]) -> list[str]:
    return ["runuser", "-u", PG_USER, "--", *args] if _ROOT else args


@dataclass
class PostgresServer:
    """One throwaway cluster; ``url`` is a superuser DSN to its ``postgres`` database."""

    url: str
    _directory: Path | None = None
    _pg_ctl: Path | None = None

    @classmethod
    def start(cls) -> PostgresServer:
        given = os.environ.get("GATEWAY_TEST_PG_DSN")
        if given:
            return cls(url=given)
        binaries = find_binaries()
        if binaries is None:
            raise RuntimeError(unavailable_reason())
        directory = Path(tempfile.mkdtemp(prefix="gateway-pg-"))
        if _ROOT:
            _ensure_user()
            user = pwd.getpwnam(PG_USER)
            os.chown(directory, user.pw_uid, user.pw_gid)
        data = directory / "data"
        port = free_port()
        run = {"check": True, "capture_output": True, "text": True, "cwd": directory}
        try:
            subprocess.run(
                _as_owner(
                    [
                        str(binaries / "initdb"),
                        "-D",
                        str(data),
                        "-U",
                        "postgres",
                        "--auth=trust",
                        "--no-sync",
                        "--encoding=UTF8",
                        "--locale=C",
                    ]
                ),
                **run,  # type: ignore[call-overload]
            )
            options = (
                f"-p {port} -k {directory} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
            )
            if (binaries.parent / "lib" / "pg_stat_statements.so").exists():
                # bench/lean.py counts the statements per exchange (docs/decisions.md).
                options += " -c shared_preload_libraries=pg_stat_statements"
            subprocess.run(
                _as_owner(
                    [
                        str(binaries / "pg_ctl"),
                        "-D",
                        str(data),
                        "-o",
                        options,
                        "-l",
                        str(directory / "server.log"),
                        "-w",
                        "-t",
                        "30",
                        "start",
                    ]
                ),
                **run,  # type: ignore[call-overload]
            )
        except subprocess.CalledProcessError as exc:
            log = directory / "server.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            shutil.rmtree(directory, ignore_errors=True)
            raise RuntimeError(
                f"cannot start PostgreSQL: {exc.cmd[-1]}: {exc.stderr or exc.stdout}\n{tail}"
            ) from exc
        return cls(
            url=f"postgresql://postgres@127.0.0.1:{port}/postgres",
            _directory=directory,
            _pg_ctl=binaries / "pg_ctl",
        )

    def stop(self) -> None:
        if self._directory is None or self._pg_ctl is None:
            return
        data = self._directory / "data"
        with contextlib.suppress(subprocess.CalledProcessError):
            subprocess.run(
                _as_owner([str(self._pg_ctl), "-D", str(data), "-m", "immediate", "-w", "stop"]),
                check=True,
                capture_output=True,
            )
        shutil.rmtree(self._directory, ignore_errors=True)
        self._directory = None

    def server_pid(self) -> int | None:
        """The postmaster's pid (its backends are its children), None for a given DSN."""
        if self._directory is None:
            return None
        pid_file = self._directory / "data" / "postmaster.pid"
        return int(pid_file.read_text().split()[0]) if pid_file.exists() else None

    def database_url(self, name: str) -> str:
        parts = urlsplit(self.url)
        return urlunsplit(parts._replace(path=f"/{name}"))

    @contextlib.contextmanager
    def database(self) -> Iterator[str]:
        """A fresh, empty database for one test; dropped afterwards."""
        name = f"test_{uuid.uuid4().hex[:12]}"
        self._admin(f'CREATE DATABASE "{name}"')
        try:
            yield self.database_url(name)
        finally:
            self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def _admin(self, sql: str) -> None:
        """Run one statement on the server, from a thread of its own (a test's event
        loop may be running in this one)."""

        async def run() -> None:
            for attempt in range(50):
                try:
                    conn = await asyncpg.connect(self.url)
                    break
                except (OSError, asyncpg.CannotConnectNowError):
                    if attempt == 49:
                        raise
                    await asyncio.sleep(0.1)
            try:
                await conn.execute(sql)
            finally:
                await conn.close()

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, run()).result()
