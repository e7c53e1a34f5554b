"""Fixtures of the node tests: free loopback ports, node configurations, a SQLite database and
a real PostgreSQL server.

PostgreSQL: ``ORTHONODE_TEST_POSTGRES_URL`` (a URL to a server where the tests may create
databases) is used when set; otherwise a throw-away server is started from
``/usr/lib/postgresql/15/bin`` on 127.0.0.1 in a temporary folder (as the ``postgres``
user when the tests run as root, since PostgreSQL refuses to run as root).  Tests that need
it are skipped when neither is available.
"""
from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dicom_node.config import NodeConfig, parse_config

PG_BIN = Path(os.environ.get("ORTHONODE_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def port() -> int:
    return free_port()


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., NodeConfig]:
    """``make_config(listener={...}, storage={...})``: a NodeConfig on a free loopback port,
    data in ``tmp_path``, SQLite database; sections given are merged into the defaults."""

    def make(**sections: Any) -> NodeConfig:
        base = {
            "node": {"data_dir": str(tmp_path / "data")},
            "listener": {
                "ae_titles": ["ORTHONODE"],
                "bind_address": "127.0.0.1",
                "port": free_port(),
                "allowed_callers": [
                    {"ae_title": "STORESCU", "hosts": ["127.0.0.1"]},
                    {"ae_title": "ECHOSCU", "hosts": ["127.0.0.1"]},
                    {"ae_title": "TESTSCU"},
                ],
            },
            "storage": {"min_free_mb": 0},
        }
        return parse_config(_merge(base, sections), source="test", base_dir=tmp_path)

    return make


# --------------------------------------------------------------------------- PostgreSQL


def _as_postgres(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


class _PostgresServer:
    """A PostgreSQL cluster in a temporary folder, trust authentication on 127.0.0.1 only."""

    def __init__(self) -> None:
        self.port = free_port()
        # not under pytest's tmp_path: that tree is private to root and the server runs as postgres
        self.dir = Path(tempfile.mkdtemp(prefix="orthonode-pg-"))
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"

    def _run(self, *cmd: str) -> None:
        proc = subprocess.run(_as_postgres(list(cmd)), capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            log_text = self.log.read_text(errors="replace") if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}\n{log_text}")

    def start(self) -> str:
        self._run(
            str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "orthonode", "--auth=trust", "-E", "UTF8", "--no-sync"
        )
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.log), "-w", "start")
        return f"postgresql+psycopg2://orthonode@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        try:
            self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    """URL of a PostgreSQL server (maintenance database) the tests may create databases on."""
    given = os.environ.get("ORTHONODE_TEST_POSTGRES_URL")
    if given:
        yield given
        return
    if not (PG_BIN / "initdb").exists():
        pytest.skip(f"no PostgreSQL: set ORTHONODE_TEST_POSTGRES_URL or install PostgreSQL 15 ({PG_BIN})")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
    server = _PostgresServer()
    try:
        url = server.start()
    except BaseException:
        server.stop()
        raise
    try:
        yield url
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server_url: str) -> Iterator[str]:
    """A fresh, empty database on the test server for one test; dropped afterwards."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"orthonode_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(postgres_server_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield make_url(postgres_server_url).set(database=name).render_as_string(hide_password=False)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'db' / 'orthonode.sqlite'}"
