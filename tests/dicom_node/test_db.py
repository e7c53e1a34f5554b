"""Database models, engine settings and Alembic migrations on SQLite.

The behaviour that must be the same on every backend is in :mod:`tests.support.db_checks`;
``test_postgres.py`` runs the same checks on a real PostgreSQL server.
"""
from __future__ import annotations

import pytest
from sqlalchemy import select

from dicom_node import db
from tests.support.db_checks import (
    received,
    check_concurrent_receivers,
    check_constraints,
    check_migrations_match_models,
    check_record_instance,
    check_timestamps,
)


# --------------------------------------------------------------------------- SQLite


def test_migrations_match_models_sqlite(sqlite_url: str) -> None:
    check_migrations_match_models(sqlite_url)


def test_record_instance_sqlite(sqlite_url: str) -> None:
    check_record_instance(sqlite_url)


def test_constraints_sqlite(sqlite_url: str) -> None:
    check_constraints(sqlite_url)


def test_timestamps_sqlite(sqlite_url: str) -> None:
    check_timestamps(sqlite_url)


def test_concurrent_receivers_sqlite(sqlite_url: str) -> None:
    check_concurrent_receivers(sqlite_url)


def test_sqlite_engine_settings(sqlite_url: str) -> None:
    engine = db.make_engine(sqlite_url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == db.SQLITE_BUSY_TIMEOUT_MS
    finally:
        engine.dispose()


def test_input_fingerprint_ignores_order_and_repeats() -> None:
    a = db.input_fingerprint(["1.2.3", "1.2.4"])
    assert a == db.input_fingerprint(["1.2.4", "1.2.3", "1.2.3"])
    assert a != db.input_fingerprint(["1.2.3"])
    assert a != db.input_fingerprint(["1.2.3", "1.2.4", "1.2.5"])
    assert len(a) == 64


def test_enum_values_are_stored_not_names(sqlite_url: str) -> None:
    db.upgrade_database(sqlite_url)
    engine = db.make_engine(sqlite_url)
    factory = db.make_session_factory(engine)
    try:
        with db.session_scope(factory) as s:
            db.record_instance(s, received("1.5", "1.5.1", "1.5.1.1"))
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT state FROM studies").scalar() == "receiving"
    finally:
        engine.dispose()


def test_newest_instances_and_forget_instances(sqlite_url: str) -> None:
    """The start-up check's database side: the newest rows first; forgetting a row fixes its
    series' count, deletes a series left empty and a study left empty unless it has a job."""
    db.upgrade_database(sqlite_url)
    engine = db.make_engine(sqlite_url)
    factory = db.make_session_factory(engine)
    try:
        with db.session_scope(factory) as s:
            for info in (received("1.6", "1.6.1", "1.6.1.1"), received("1.6", "1.6.1", "1.6.1.2"),
                         received("1.7", "1.7.1", "1.7.1.1"), received("1.8", "1.8.1", "1.8.1.1")):
                db.record_instance(s, info)
            study_with_job = s.execute(select(db.Study).where(db.Study.study_instance_uid == "1.7")).scalar_one()
            s.add(db.Job(study_id=study_with_job.id, input_fingerprint=db.input_fingerprint(["1.7.1.1"])))
        with db.session_scope(factory) as s:
            newest = db.newest_instances(s.connection(), 3)
            assert [r.sop_instance_uid for r in newest] == ["1.8.1.1", "1.7.1.1", "1.6.1.2"]
            assert newest[2].path == "1.6/1.6.1/1.6.1.2.dcm" and newest[2].series_instance_uid == "1.6.1"
            assert db.forget_instances(s.connection(), newest, "its file is missing") == 3
            assert db.forget_instances(s.connection(), newest, "again") == 0  # already gone: skipped
        with db.session_scope(factory) as s:
            series = dict(s.execute(select(db.Series.series_instance_uid, db.Series.instance_count)).all())
            assert series == {"1.6.1": 1}
            studies = set(s.execute(select(db.Study.study_instance_uid)).scalars())
            assert studies == {"1.6", "1.7"}  # 1.8 was left empty; 1.7 keeps its job
            events = s.execute(
                select(db.EventRecord.sop_instance_uid, db.EventRecord.message)
                .where(db.EventRecord.kind == db.EventKind.INSTANCE_FORGOTTEN)
            ).all()
            assert sorted(e[0] for e in events) == ["1.6.1.2", "1.7.1.1", "1.8.1.1"]
            assert all(e[1].endswith(": its file is missing") for e in events)
        with pytest.raises(ValueError, match="limit must be >= 1"):
            with db.session_scope(factory) as s:
                db.newest_instances(s.connection(), 0)
    finally:
        engine.dispose()
