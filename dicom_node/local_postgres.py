"""A throw-away PostgreSQL server on loopback, in a temporary folder: for the tests, the
benchmarks and trying the node's roles on one machine (never for patient data: it runs with
``fsync=off`` and trust authentication on 127.0.0.1).

Needs PostgreSQL's server binaries (Debian ``postgresql``, ``/usr/lib/postgresql/15/bin``, or
``ORTHONODE_PG_BIN``); when run as root the server runs as the ``postgres`` user.
"""
from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

PG_BIN = Path(os.environ.get("ORTHONODE_PG_BIN", os.environ.get("ORTHONODE_TEST_PG_BIN",
                                                                   "/usr/lib/postgresql/15/bin")))


def available() -> str | None:
    """None when a local server can be started here, else why not."""
    if not (PG_BIN / "initdb").exists():
        return f"no PostgreSQL server binaries in {PG_BIN} (install PostgreSQL 15 or set ORTHONODE_PG_BIN)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run the server as"
    return None


def _as_postgres(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalPostgres:
    """``start()`` gives the URL of the maintenance database; :meth:`create_database` a fresh one."""

    def __init__(self) -> None:
        self.port = _free_port()
        # a folder of its own: the server runs as postgres and must own it
        self.dir = Path(tempfile.mkdtemp(prefix="orthonode-pg-"))
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self.url = f"postgresql+psycopg2://orthonode@127.0.0.1:{self.port}/postgres"

    def _run(self, *cmd: str) -> None:
        proc = subprocess.run(_as_postgres(list(cmd)), capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            log_text = self.log.read_text(errors="replace") if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}\n{log_text}")

    def start(self) -> str:
        self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "orthonode", "--auth=trust", "-E", "UTF8",
                  "--no-sync")
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.log), "-w", "start")
        return self.url

    def create_database(self, prefix: str = "orthonode") -> str:
        """A new, empty database; its URL."""
        from sqlalchemy import create_engine, text
        from sqlalchemy.engine import make_url

        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        admin = create_engine(self.url, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        finally:
            admin.dispose()
        return make_url(self.url).set(database=name).render_as_string(hide_password=False)

    def stop(self) -> None:
        try:
            self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalPostgres:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
