"""The database checks of ``test_db.py`` on a real PostgreSQL server on loopback.

The server comes from ``ORTHONODE_TEST_POSTGRES_URL`` or is started by the
``postgres_server_url`` fixture (see ``conftest.py``); each test gets a fresh database.
"""
from __future__ import annotations

from sqlalchemy import inspect

from dicom_node import db
from tests.support.db_checks import (
    check_concurrent_receivers,
    check_constraints,
    check_migrations_match_models,
    check_record_instance,
    check_timestamps,
)


def test_migrations_match_models_postgres(postgres_url: str) -> None:
    check_migrations_match_models(postgres_url)


def test_record_instance_postgres(postgres_url: str) -> None:
    check_record_instance(postgres_url)


def test_constraints_postgres(postgres_url: str) -> None:
    check_constraints(postgres_url)


def test_timestamps_postgres(postgres_url: str) -> None:
    check_timestamps(postgres_url)


def test_concurrent_receivers_postgres(postgres_url: str) -> None:
    # READ COMMITTED with several connections: the ON CONFLICT upserts must hold the race
    check_concurrent_receivers(postgres_url, threads=6, per_thread=5)


def test_postgres_column_types(postgres_url: str) -> None:
    """Timestamps are TIMESTAMP WITH TIME ZONE and states plain VARCHAR (no native enum type)."""
    db.upgrade_database(postgres_url)
    engine = db.make_engine(postgres_url)
    try:
        columns = {c["name"]: c for c in inspect(engine).get_columns("jobs")}
        assert columns["created_at"]["type"].timezone is True
        assert type(columns["state"]["type"]).__name__ == "VARCHAR"
        assert inspect(engine).get_enums() == []
        checks = {c["name"] for c in inspect(engine).get_check_constraints("jobs")}
        assert "ck_jobs_job_state" in checks
    finally:
        engine.dispose()


def test_receiver_on_postgres(postgres_url: str, tmp_path) -> None:
    """The C-STORE path (file, rows, duplicate refusal) with PostgreSQL as the database."""
    from sqlalchemy import func, select

    from dicom_node.ingest import StoreReceiver, StoreStatus
    from dicom_node.storage import Storage
    from tests.support.node import receive_file
    from tests.inference.dicom_factory import Geometry, pattern_volume, write_classic_series

    db.upgrade_database(postgres_url)
    engine = db.make_engine(postgres_url)
    factory = db.make_session_factory(engine)
    receiver = StoreReceiver(
        Storage(tmp_path / "incoming", 0),
        factory,
        duplicate_policy="reject_if_different",
        accept_sop_classes=["MRImageStorage"],
    )
    files = write_classic_series(tmp_path / "in", pattern_volume(2, 32, 32), Geometry())
    try:
        for path in files:
            assert receive_file(receiver, path) == StoreStatus.SUCCESS
        changed = bytearray(files[0].read_bytes())
        changed[-1] ^= 0xFF  # last pixel byte: same UIDs, other content
        status = receive_file(receiver, files[0], bytes(changed))
        assert status == StoreStatus.DUPLICATE_SOP_INSTANCE
        with db.session_scope(factory) as s:
            assert s.execute(select(db.Series.instance_count)).scalar_one() == 2
            kinds = s.execute(select(db.EventRecord.kind, func.count()).group_by(db.EventRecord.kind)).all()
            assert dict(kinds) == {"instance_stored": 2, "duplicate_refused": 1}
    finally:
        engine.dispose()
