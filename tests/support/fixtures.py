"""Fixtures shared by every test folder, registered once in ``tests/conftest.py``
(``pytest_plugins``): a test names the fixture and pytest finds it, nothing is imported.

- ``tiny_checkpoint``: the one tiny trained knee model of the run (:mod:`tests.support.tiny_model`),
  built once per run and shared by the xdist workers;
- ``knee_phantoms``: three phantom knee studies, read-only;
- node configuration: ``port``, ``make_config`` (a parsed NodeConfig), ``node_yaml`` (a written
  node.yaml), ``node_db`` (a migrated SQLite database), ``sqlite_url``;
- servers: ``orthanc`` (a real Orthanc on loopback), ``serve_process`` (``orthonode serve``
  subprocesses), ``postgres_server_url`` / ``postgres_url`` (a throw-away PostgreSQL, or
  ``ORTHONODE_TEST_POSTGRES_URL``);
- ``tls_files``: a test CA, a server certificate for 127.0.0.1 and a client certificate.

PostgreSQL: ``ORTHONODE_TEST_POSTGRES_URL`` (a URL to a server where the tests may create
databases) is used when set; otherwise a throw-away server is started from
``/usr/lib/postgresql/15/bin`` on 127.0.0.1 (:mod:`dicom_node.local_postgres`; as the ``postgres``
user when the tests run as root, since PostgreSQL refuses to run as root).  Tests that need
it are skipped when neither is available.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dicom_node import local_postgres
from dicom_node.config import NodeConfig, parse_config
from tests.support.node import MATRIX, ServeProcess, free_port, make_node_config, write_node_yaml
from tests.support.shared import built_once
from tests.support.tiny_model import build_tiny_checkpoint



@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run's tiny trained knee bundle (see :mod:`tests.support.tiny_model`), built once per
    run; ``ORTHONODE_TEST_CHECKPOINT`` names an existing one instead."""
    given = os.environ.get("ORTHONODE_TEST_CHECKPOINT")
    if given:
        return Path(given)
    return built_once(tmp_path_factory, "tiny_model", build_tiny_checkpoint)


def _generate_knees(folder: Path) -> Path:
    from training.phantoms.generate import generate_dataset

    generate_dataset(folder / "knee", "knee", 3, seed=31, matrix=MATRIX)
    return folder / "knee"


@pytest.fixture(scope="session")
def knee_phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three phantom knee studies ``ROOT/knee_000N/dicom/<series>/*.dcm`` and ``ROOT/cases.csv``
    (read-only: tests copy what they change)."""
    return built_once(tmp_path_factory, "knees", _generate_knees)


@pytest.fixture()
def node_db(tmp_path: Path) -> Iterator[Any]:
    """A migrated SQLite database in ``tmp_path``; yields its session factory."""
    from dicom_node.db import make_engine, make_session_factory, upgrade_database

    url = f"sqlite:///{tmp_path / 'node.sqlite'}"
    upgrade_database(url)
    engine = make_engine(url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture()
def node_yaml(tmp_path: Path, tiny_checkpoint: Path) -> Callable[..., Path]:
    """Factory: ``node_yaml(**make_node_config options) -> path of a written node.yaml``."""

    def make(**options: Any) -> Path:
        return write_node_yaml(tmp_path, make_node_config(tmp_path, tiny_checkpoint, **options))

    return make


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real Orthanc on loopback (skipped when the package is not installed); no forwarding."""
    from dicom_node.orthanc import OrthancServer, orthanc_available

    if not orthanc_available():
        pytest.skip("Orthanc is not installed (/usr/sbin/Orthanc)")
    server = OrthancServer(tmp_path_factory.mktemp("orthanc"), dicom_port=free_port(), stable_age_seconds=2)
    with server:
        yield server


@pytest.fixture()
def serve_process(tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    """Factory for ``orthonode serve`` subprocesses (``make(config_path, *options)``); every one
    started is killed at the end."""
    started: list[ServeProcess] = []

    def make(config_path: Path, *args: str) -> ServeProcess:
        proc = ServeProcess(config_path, tmp_path / f"serve-{len(started)}.log", args).start()
        started.append(proc)
        return proc

    yield make
    for proc in started:
        proc.kill()


# --------------------------------------------------------------------------- TLS


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A test CA, a server certificate for 127.0.0.1 and a client certificate (EC P-256)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("tls")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=orthonode test CA", cwd=d)
    for name in ("server", "client"):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        (d / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1\n")
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d,
        )  # fmt: skip
    return {name: d / name for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


# --------------------------------------------------------------------------- node configuration


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


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    """URL of a PostgreSQL server (maintenance database) the tests may create databases on."""
    given = os.environ.get("ORTHONODE_TEST_POSTGRES_URL")
    if given:
        yield given
        return
    why_not = local_postgres.available()
    if why_not:
        pytest.skip(f"no PostgreSQL: set ORTHONODE_TEST_POSTGRES_URL, or: {why_not}")
    server = local_postgres.LocalPostgres()
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
