"""The hostile corpus (:mod:`tests.hostile.corpus`) sent over the network to a running listener.

For every case: each file gets one of the statuses the case allows (or is refused at
negotiation), the node logs why, what must be stored is on disk byte for byte and in the
database, what must not be stored is in neither, no temporary file is left visible, and the node
still answers C-ECHO.  One listener serves the whole module, as a real node serves many senders.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from dicom_node import db
from tests.hostile.corpus import (
    KNOWN_GAPS,
    OK,
    VALID_STATUSES,
    HostileCase,
    body_of,
    build_cases,
    echo,
    send_files,
)
from tests.support.hostile import RunningListener, hostile_config, start_listener

CASES = build_cases()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningListener]:
    node = start_listener(hostile_config(tmp_path_factory.mktemp("hostile_listener")))
    try:
        yield node
    finally:
        node.stop()


def test_the_corpus_is_large_and_names_are_unique() -> None:
    assert len(CASES) >= 40
    assert len({c.name for c in CASES}) == len(CASES)


def _param(case: HostileCase) -> Any:
    gap = KNOWN_GAPS.get(case.name)
    marks = [pytest.mark.xfail(reason=gap, strict=True)] if gap else []
    return pytest.param(case, id=case.name, marks=marks)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_hostile_case(case: HostileCase, node: RunningListener, tmp_path: Path, caplog: Any) -> None:
    paths = []
    for i, item in enumerate(case.items):
        path = tmp_path / f"{case.name}_{i}.dcm"
        path.write_bytes(item.data)
        paths.append(path)

    with caplog.at_level(logging.INFO, logger="dicom_node"):
        result = send_files(node.port, paths)

    assert not result.aborted, f"{case.name}: the association ended early ({result.statuses})"
    for item, status in zip(case.items, result.statuses, strict=True):
        if item.expect is None:
            assert status is None, f"{case.name}: expected refusal at negotiation, got status {status!r}"
            continue
        assert status is not None, f"{case.name}: refused at negotiation, expected one of {sorted(item.expect)}"
        assert status in VALID_STATUSES, f"{case.name}: 0x{status:04X} is not a documented status"
        assert status in item.expect, (
            f"{case.name}: got 0x{status:04X}, expected one of {[f'0x{s:04X}' for s in sorted(item.expect)]}\n{caplog.text}"
        )
    if case.log:
        assert case.log in caplog.text, f"{case.name}: the log does not say {case.log!r}:\n{caplog.text}"

    for study, series, sop in case.stored:
        row = node.row(sop)
        assert row is not None, f"{case.name}: {sop} is not in the database"
        assert (row.path.split("/")[:2]) == [study, series]
        on_disk = node.storage.resolve(row.path).read_bytes()
        assert hashlib.sha256(on_disk).hexdigest() == row.sha256
        # the stored copy is the data set of the first file accepted for that UID, byte for byte
        source = next(i for i in case.items if i.expect == OK and str(i.meta.MediaStorageSOPInstanceUID) == sop)
        assert body_of(on_disk) == body_of(source.data), f"{case.name}: stored bytes differ from those sent"
    for sop in case.absent:
        assert node.row(sop) is None, f"{case.name}: {sop} was recorded"
        assert node.files_named(sop) == [], f"{case.name}: {sop} is on disk"
    assert node.temporaries() == []
    assert echo(node.port), f"{case.name}: no C-ECHO answer afterwards"


def test_every_success_is_stored_with_its_row(node: RunningListener) -> None:
    """After the corpus (whatever order it ran in): every file under the storage root has its row
    with the same checksum, and every row its file."""
    with db.session_scope(node.factory) as s:
        rows = {r.path: r.sha256 for r in s.execute(select(db.Instance)).scalars()}
    files = {p.relative_to(node.storage.root).as_posix(): p for p in node.storage.root.rglob("*.dcm")}
    assert set(files) == set(rows)
    for rel, path in files.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == rows[rel]


# --------------------------------------------------------------------------- conditions that clear


def _write(tmp_path: Path, name: str) -> tuple[Path, str]:
    from tests.hostile.corpus import encode, mr_dataset

    ds = mr_dataset()
    path = tmp_path / f"{name}.dcm"
    path.write_bytes(encode(ds))
    return path, str(ds.SOPInstanceUID)


def test_disk_full_refuses_with_a700_and_recovers_by_itself(tmp_path: Path, caplog: Any) -> None:
    node = start_listener(hostile_config(tmp_path))
    try:
        node.storage.min_free_mb = 10**9  # the disk is "full": no space above the reserve
        path, sop = _write(tmp_path, "while_full")
        with caplog.at_level(logging.ERROR, logger="dicom_node.ingest"):
            assert send_files(node.port, [path]).statuses == [0xA700]
        assert "out of space" in caplog.text and "storage.min_free_mb" in caplog.text
        assert node.row(sop) is None and node.files_named(sop) == [] and node.temporaries() == []
        assert echo(node.port)

        node.storage.min_free_mb = 0  # space was freed: the next C-STORE works, no restart
        assert send_files(node.port, [path]).statuses == [0x0000]
        assert node.row(sop) is not None and len(node.files_named(sop)) == 1
    finally:
        node.stop()


def test_database_unavailable_refuses_with_a702_and_recovers_by_itself(
    tmp_path: Path, postgres_url: str, caplog: Any
) -> None:
    """PostgreSQL stops accepting connections (and drops the open ones) mid-run, then comes back."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    config = hostile_config(tmp_path)
    config = config.model_copy(update={"database": config.database.model_copy(update={"url": postgres_url})})
    node = start_listener(config)
    name = make_url(postgres_url).database
    admin = create_engine(make_url(postgres_url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        before, before_sop = _write(tmp_path, "before")
        assert send_files(node.port, [before]).statuses == [0x0000]
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"), {"n": name})

        during, during_sop = _write(tmp_path, "during")
        with caplog.at_level(logging.ERROR, logger="dicom_node.ingest"):
            assert send_files(node.port, [during]).statuses == [0xA702]
        assert "the database is unavailable" in caplog.text
        assert node.files_named(during_sop) == [] and node.temporaries() == []
        assert echo(node.port)

        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        assert send_files(node.port, [during]).statuses == [0x0000]  # the sender's retry succeeds
        assert node.row(during_sop) is not None and node.row(before_sop) is not None
        assert len(node.files_named(during_sop)) == 1
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        admin.dispose()
        node.stop()


# --------------------------------------------------------------------------- SIGKILL while storing


def test_sigkill_while_storing_keeps_every_acknowledged_instance(
    tmp_path: Path, tiny_checkpoint: Path  # noqa: F811
) -> None:
    """Two senders store while ``orthonode serve`` is SIGKILLed three times at random moments
    (seeded); after each kill every acknowledged instance is on disk, byte for byte, with its row,
    and every visible file is complete.  The long version is benchmarks/crash_consistency.py."""
    import random
    import sqlite3
    import threading
    import time

    from tests.support.node import ServeProcess, make_node_config, write_node_yaml
    from tests.hostile.corpus import body_of, encode, mr_dataset

    options = make_node_config(tmp_path, tiny_checkpoint, quiet=600, forced=1200)
    config_path = write_node_yaml(tmp_path, options)
    port, http_port = options["listener"]["port"], options["http"]["port"]
    bodies: dict[str, bytes] = {}
    queues: list[list[Path]] = []
    for k in range(2):
        study = mr_dataset()
        queue = []
        for i in range(150):
            ds = mr_dataset(study=str(study.StudyInstanceUID), series=str(study.SeriesInstanceUID), seed=i, rows=64, cols=64)
            path = tmp_path / "send" / f"{k}_{i:03d}.dcm"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(encode(ds))
            bodies[str(ds.SOPInstanceUID)] = body_of(path.read_bytes())
            queue.append(path)
        queues.append(queue)
    acknowledged: set[str] = set()
    stop = threading.Event()

    def sender(queue: list[Path]) -> None:
        from pydicom.filereader import read_file_meta_info

        i = 0
        while i < len(queue) and not stop.is_set():
            try:
                result = send_files(port, queue[i : i + 25], calling="STORESCU", timeout=10)
            except ConnectionError:
                time.sleep(0.2)
                continue
            for path, status in zip(queue[i:], result.statuses):
                if status != 0:
                    break
                acknowledged.add(str(read_file_meta_info(path).MediaStorageSOPInstanceUID))
                i += 1

    proc = ServeProcess(config_path, tmp_path / "serve.log").start()
    proc.wait_healthy(http_port)
    threads = [threading.Thread(target=sender, args=(q,), daemon=True) for q in queues]
    for t in threads:
        t.start()
    rng = random.Random(3)
    storage = tmp_path / "data" / "instances"
    try:
        for kill in range(3):
            time.sleep(rng.uniform(0.5, 2.0))
            proc.kill()
            seen = set(acknowledged)
            with sqlite3.connect(f"file:{tmp_path / 'data' / 'orthonode.sqlite'}?mode=ro", uri=True) as conn:
                rows = dict(conn.execute("SELECT sop_instance_uid, sha256 FROM instances").fetchall())
            for sop in seen:
                assert sop in rows, f"kill {kill}: acknowledged {sop} has no row"
            for path in storage.rglob("*.dcm"):
                if path.name.startswith("."):
                    continue
                data = path.read_bytes()
                assert body_of(data) == bodies[path.stem], f"kill {kill}: {path} is not complete"
                if path.stem in rows:
                    assert hashlib.sha256(data).hexdigest() == rows[path.stem]
            assert seen <= {p.stem for p in storage.rglob("*.dcm")}
            proc.start()
            proc.wait_healthy(http_port)
        for t in threads:
            t.join(timeout=120)
        assert len(acknowledged) == len(bodies), f"{len(acknowledged)} of {len(bodies)} acknowledged"
    finally:
        stop.set()
        proc.kill()
