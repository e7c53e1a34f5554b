"""Roles and the start-up refusals of several processes (dicom_node.cluster), and the purge
guard and run lock across processes on PostgreSQL."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from dicom_node.cluster import ClusterError, ProcessRegistry, process_id
from dicom_node.db import ProcessRecord, make_engine, make_session_factory, session_scope, upgrade_database, utcnow
from dicom_node.node import Node
from dicom_node.services.retention import DatabaseStudyGuard, Purger, StudyBusyError
from dicom_node.roles import ROLES, parse_roles

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("text, roles", [
    ("all", ROLES),
    ("listener", ("listener",)),
    ("worker, exporter", ("exporter", "worker")),
    (["listener", "worker"], ("worker", "listener")),
])
def test_roles_are_parsed(text, roles) -> None:
    assert parse_roles(text) == roles


@pytest.mark.parametrize("text, message", [
    ("listner", "unknown role 'listner'"),
    ("worker,worker", "role 'worker' is given twice"),
    ("all,worker", "already includes worker"),
    ("", "name one or more"),
    ("listener,", "name one or more"),
])
def test_bad_roles_are_refused(text, message) -> None:
    with pytest.raises(ValueError, match=message):
        parse_roles(text)


def _serve(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=120, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))


def test_serve_refuses_bad_roles_and_roles_on_sqlite(tmp_path: Path) -> None:
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump({"node": {"data_dir": str(tmp_path / "data")}, "http": {"enabled": False}}))
    for args, message in ((("--role", "worker,worker"), "role 'worker' is given twice"),
                          (("--role", "archiver"), "unknown role 'archiver'"),
                          (("--role", "exporter", "--device", "gpu"), "device 'gpu'")):
        result = _serve(config, *args)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr
    result = _serve(config, "--role", "exporter")
    assert result.returncode == 2
    assert "needs PostgreSQL: SQLite is for one process" in result.stderr
    assert not (tmp_path / "data" / "instances").exists(), "a refused process wrote to the data folder"


def test_a_second_process_on_sqlite_is_refused(make_config) -> None:
    config = make_config(http={"enabled": False}, jobs={"preload_model": False})
    upgrade_database(config.database_url)
    engine = make_engine(config.database_url)
    try:
        factory = make_session_factory(engine)
        with session_scope(factory) as session:  # our parent process, registered and alive
            session.add(ProcessRecord(process_id=f"{process_id().split(':')[0]}:{os.getppid()}", host=process_id()
                                      .split(":")[0], pid=os.getppid(), roles="exporter,worker,listener",
                                      started_at=utcnow(), heartbeat_at=utcnow()))
        node = Node(config)
        with pytest.raises(ClusterError, match="another process is serving this SQLite database"):
            node.start()
    finally:
        engine.dispose()


def test_a_data_folder_the_database_does_not_know_is_refused(make_config, tmp_path: Path) -> None:
    database = f"sqlite:///{tmp_path / 'shared.sqlite'}"
    first = make_config(http={"enabled": False}, jobs={"preload_model": False}, database={"url": database})
    with Node(first):
        pass
    assert (first.data_dir / "orthonode-folder-id").is_file()
    other = make_config(http={"enabled": False}, jobs={"preload_model": False}, database={"url": database},
                        node={"data_dir": str(tmp_path / "not-mounted")})
    node = Node(other)
    with pytest.raises(ClusterError, match="is not the one this database's processes share: it has no"):
        node.start()
    (tmp_path / "not-mounted" / "orthonode-folder-id").write_text("6f1c3c9e-59f4-4d56-9d9b-0d7e0c1f2a3b\n")
    node = Node(other)
    with pytest.raises(ClusterError, match="its id is 6f1c3c9e"):
        node.start()
    with Node(first):  # the right folder still starts
        pass


def test_the_registry_says_who_runs(make_config) -> None:
    config = make_config()
    upgrade_database(config.database_url)
    engine = make_engine(config.database_url)
    factory = make_session_factory(engine)
    registry = ProcessRegistry(factory, ("worker",), device="cpu")
    try:
        registry.start()
        from dicom_node.commands import collect_processes

        (me,) = collect_processes(factory)["processes"]
        assert (me["process"], me["roles"], me["device"], me["alive"]) == (process_id(), "worker", "cpu", True)
        registry.stop()
        assert collect_processes(factory)["processes"] == []
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- PostgreSQL


def test_purge_guard_across_connections(postgres_url: str) -> None:
    engine = make_engine(postgres_url)
    try:
        guard, other = DatabaseStudyGuard(engine), DatabaseStudyGuard(engine)  # as two processes
        with guard.receiving("1.2.3"):
            with other.receiving("1.2.3"):  # receives share
                pass
            with pytest.raises(StudyBusyError, match="still being received"):
                with other.purging("1.2.3", timeout=0.3):
                    pass
            with other.purging("1.2.4", timeout=1):  # another study is free
                pass
        order: list[str] = []
        with other.purging("1.2.3", timeout=1):
            def receive() -> None:
                with guard.receiving("1.2.3"):
                    order.append("received")

            thread = threading.Thread(target=receive)
            thread.start()
            time.sleep(0.5)
            order.append("purged")
        thread.join(10)
        assert order == ["purged", "received"], "a receive ran while the study was being purged"
    finally:
        engine.dispose()


def test_one_purge_run_at_a_time(postgres_url: str, make_config) -> None:
    from dicom_node.cluster import RETENTION_RUN_LOCK, try_exclusive

    config = make_config(database={"url": postgres_url}, retention={"enabled": True})
    upgrade_database(postgres_url)
    engine = make_engine(postgres_url)
    try:
        purger = Purger(config, make_session_factory(engine))
        with try_exclusive(engine, RETENTION_RUN_LOCK) as ours:  # another process is purging
            assert ours
            report = purger.purge()
            assert report.skipped == [("*", "another process is purging")] and not report.purged
        assert purger.purge().skipped == []
    finally:
        engine.dispose()
