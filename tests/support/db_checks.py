"""Database behaviour that must be the same on every backend, as functions of a database URL:
``tests/dicom_node/test_db.py`` runs them on SQLite, ``test_postgres.py`` on a real PostgreSQL
server."""
from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import func, inspect, select, text
from sqlalchemy.exc import IntegrityError, StatementError

from dicom_node import db


def received(study: str, series: str, sop: str, **kw: object) -> db.ReceivedInstance:
    values: dict[str, object] = dict(
        study_instance_uid=study,
        series_instance_uid=series,
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=f"{study}/{series}/{sop}.dcm",
        size_bytes=1000,
        sha256="a" * 64,
        received_at=db.utcnow(),
        calling_ae_title="STORESCU",
        peer_host="127.0.0.1",
        modality="MR",
        series_number=3,
    )
    values.update(kw)
    return db.ReceivedInstance(**values)  # type: ignore[arg-type]


def check_migrations_match_models(url: str) -> None:
    """upgrade_database creates exactly the schema the models describe, and is idempotent."""
    db.upgrade_database(url)
    db.upgrade_database(url)  # second run: nothing to do, no error
    engine = db.make_engine(url)
    try:
        assert db.current_revision(engine) == "0003_purge_state"
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), db.Base.metadata)
        assert diff == [], f"models and migrations differ: {diff}"
        names = set(inspect(engine).get_table_names())
        assert {"studies", "series", "instances", "jobs", "exports", "events", "alembic_version"} <= names
        index_names = {ix["name"] for ix in inspect(engine).get_indexes("exports")}
        assert "ix_exports_state_next_attempt" in index_names
    finally:
        engine.dispose()


def check_record_instance(url: str) -> None:
    """Upserts of study/series/instance: new, resent, changed, moved; counts and states."""
    db.upgrade_database(url)
    engine = db.make_engine(url)
    factory = db.make_session_factory(engine)
    try:
        with db.session_scope(factory) as s:
            r1 = db.record_instance(s, received("1.2.1", "1.2.1.1", "1.2.1.1.1", patient_id_hash=db.hash_patient_id("P1")))
            r2 = db.record_instance(s, received("1.2.1", "1.2.1.1", "1.2.1.1.2"))
        assert r1.inserted and r1.changed and r2.inserted
        with db.session_scope(factory) as s:
            series = s.execute(select(db.Series).where(db.Series.series_instance_uid == "1.2.1.1")).scalar_one()
            assert series.instance_count == 2
            study = series.study
            assert study.state is db.StudyState.RECEIVING
            assert study.patient_id_hash == db.hash_patient_id("P1") != "P1"
            assert study.calling_ae_title == "STORESCU"
            study.state = db.StudyState.DONE

        # the same instance resent with the same bytes: no change, the finished study stays done
        with db.session_scope(factory) as s:
            r = db.record_instance(s, received("1.2.1", "1.2.1.1", "1.2.1.1.1"), content_changed=False)
        assert not r.inserted and not r.changed
        with db.session_scope(factory) as s:
            study = s.execute(select(db.Study)).scalar_one()
            assert study.state is db.StudyState.DONE
            kinds = s.execute(select(db.EventRecord.kind).order_by(db.EventRecord.id)).scalars().all()
            assert kinds == ["instance_stored", "instance_stored", "instance_resent"]

        # new content for an existing instance puts the study back to receiving
        with db.session_scope(factory) as s:
            r = db.record_instance(s, received("1.2.1", "1.2.1.1", "1.2.1.1.1", sha256="b" * 64, size_bytes=7))
        assert r.changed and not r.inserted and r.previous_path is None
        with db.session_scope(factory) as s:
            study = s.execute(select(db.Study)).scalar_one()
            assert study.state is db.StudyState.RECEIVING
            inst = s.execute(select(db.Instance).where(db.Instance.sop_instance_uid == "1.2.1.1.1")).scalar_one()
            assert (inst.sha256, inst.size_bytes) == ("b" * 64, 7)

        # the instance moves to another series of another study: counts follow, old path returned
        with db.session_scope(factory) as s:
            r = db.record_instance(s, received("1.2.9", "1.2.9.1", "1.2.1.1.1"))
        assert r.previous_path == "1.2.1/1.2.1.1/1.2.1.1.1.dcm"
        with db.session_scope(factory) as s:
            counts = dict(s.execute(select(db.Series.series_instance_uid, db.Series.instance_count)).all())
            assert counts == {"1.2.1.1": 1, "1.2.9.1": 1}
            assert s.execute(select(func.count()).select_from(db.Instance)).scalar_one() == 2

        # a series UID reused under another study is refused and nothing is written
        with pytest.raises(db.SeriesStudyMismatchError, match="1.2.1.1 is recorded under study 1.2.1"):
            with db.session_scope(factory) as s:
                db.record_instance(s, received("1.2.5", "1.2.1.1", "1.2.5.1.1"))
        with db.session_scope(factory) as s:
            assert s.execute(select(func.count()).select_from(db.Instance)).scalar_one() == 2
    finally:
        engine.dispose()


def check_constraints(url: str) -> None:
    """Enum CHECKs, foreign keys and cascades are enforced by the database itself."""
    db.upgrade_database(url)
    engine = db.make_engine(url)
    factory = db.make_session_factory(engine)
    try:
        with pytest.raises(IntegrityError):
            with engine.begin() as conn:
                conn.execute(
                    text(
                        "INSERT INTO studies (study_instance_uid, first_received_at, last_received_at, state, "
                        "state_changed_at) VALUES ('1.2', :t, :t, 'bogus', :t)"
                    ),
                    {"t": datetime(2026, 1, 1)},
                )
        with pytest.raises(IntegrityError):
            with engine.begin() as conn:
                conn.execute(
                    text(
                        "INSERT INTO series (series_instance_uid, study_id, first_received_at, last_received_at, "
                        "instance_count) VALUES ('1.2.3', 999, :t, :t, 0)"
                    ),
                    {"t": datetime(2026, 1, 1)},
                )
        with db.session_scope(factory) as s:
            db.record_instance(s, received("1.3", "1.3.1", "1.3.1.1"))
            study = s.execute(select(db.Study)).scalar_one()
            job = db.Job(study=study, input_fingerprint=db.input_fingerprint(["1.3.1.1"]), result_summary={"seg": 1})
            s.add(job)
            s.flush()
            s.add(
                db.Export(
                    job=job, destination="pacs", object_path="results/x.dcm", object_kind="seg", sop_instance_uid="1.3.9"
                )
            )
        with db.session_scope(factory) as s:
            export = s.execute(select(db.Export)).scalar_one()
            assert export.state is db.ExportState.PENDING and export.attempts == 0
            assert export.job.result_summary == {"seg": 1}
            assert export.job.state is db.JobState.QUEUED
        # ON DELETE CASCADE in the database (not only in the ORM): a raw delete removes everything
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM studies"))
        with db.session_scope(factory) as s:
            for model in (db.Series, db.Instance, db.Job, db.Export):
                assert s.execute(select(func.count()).select_from(model)).scalar_one() == 0
            # the audit trail outlives the rows it refers to
            assert s.execute(select(func.count()).select_from(db.EventRecord)).scalar_one() == 1
    finally:
        engine.dispose()


def check_timestamps(url: str) -> None:
    """Timestamps go in aware, come back aware in UTC; naive ones are refused."""
    db.upgrade_database(url)
    engine = db.make_engine(url)
    factory = db.make_session_factory(engine)
    try:
        local = datetime(2026, 3, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
        with db.session_scope(factory) as s:
            s.add(db.EventRecord(time=local, kind="test"))
        with db.session_scope(factory) as s:
            value = s.execute(select(db.EventRecord.time)).scalar_one()
        assert value == local and value.tzinfo is not None and value.utcoffset() == timedelta(0)
        with pytest.raises(StatementError, match="has no timezone"):
            with db.session_scope(factory) as s:
                s.add(db.EventRecord(time=datetime(2026, 3, 1), kind="test"))
    finally:
        engine.dispose()


def check_concurrent_receivers(url: str, threads: int = 4, per_thread: int = 5) -> None:
    """Several associations storing instances of the same new study at once: no lost update,
    no 'database is locked', one study and one series row."""
    db.upgrade_database(url)
    engine = db.make_engine(url)
    factory = db.make_session_factory(engine)
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def work(t: int) -> None:
        try:
            start.wait()
            for i in range(per_thread):
                with db.session_scope(factory) as s:
                    db.record_instance(s, received("1.4", "1.4.1", f"1.4.1.{t}.{i}"))
        except BaseException as exc:  # collected and re-raised in the test thread
            errors.append(exc)

    try:
        workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert errors == []
        with db.session_scope(factory) as s:
            assert s.execute(select(func.count()).select_from(db.Study)).scalar_one() == 1
            series = s.execute(select(db.Series)).scalar_one()
            assert series.instance_count == threads * per_thread
    finally:
        engine.dispose()
