"""Retention: which studies may be purged, what a purge deletes, the race with receives, a purge
cut short by a crash, the scheduled purge of a running node and ``orthonode purge``.

Studies are made of real files in the node's layout and real rows (the listener's own
``record_instance`` for instances), with every timestamp set ``days`` in the past, so the
policy is checked against the wall clock exactly as the node runs it.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import func, select

from dicom_node.cli import main
from dicom_node.config import NodeConfig
from dicom_node.db import (
    EventKind,
    EventRecord,
    Export,
    ExportState,
    Instance,
    Job,
    JobState,
    Series,
    Study,
    StudyState,
    make_engine,
    make_session_factory,
    session_scope,
    upgrade_database,
    utcnow,
)
from dicom_node.layout import DataDirLock, DataDirLockedError
from dicom_node.services.retention import (
    PurgedStudy,
    Purger,
    StudyBusyError,
    StudyGuard,
    assess,
)
from tests.support.node import add_instance, wait_for

ROOT = "1.2.826.0.1.3680043.10.999"
INSTANCE_BYTES = 1000
RESULT_BYTES = 300

_FINISHED_JOB_STATES = (JobState.DONE, JobState.FAILED)


class Site:
    """A node's data directory and database, without the node's threads."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.data_dir = config.data_dir
        self.data_dir.mkdir(parents=True, exist_ok=True)
        upgrade_database(config.database_url)
        self.engine = make_engine(config.database_url)
        self.factory = make_session_factory(self.engine)

    def instance_dir(self, uid: str) -> Path:
        return self.data_dir / "instances" / uid

    def results_dir(self, uid: str) -> Path:
        return self.data_dir / "results" / uid

    def study(self, uid: str, *, days: float, study_state: StudyState = StudyState.DONE,
              job_state: JobState | None = JobState.DONE, exports: tuple[ExportState, ...] = (ExportState.DONE,),
              instances: int = 2) -> int | None:
        """A study whose every timestamp is ``days`` ago: instance files and rows, one job with
        its result files and a leftover work copy, and one export per entry of ``exports``.
        Returns the job id."""
        when = utcnow() - timedelta(days=days)
        series = f"{uid}.1"
        for i in range(instances):
            sop = f"{uid}.1.{i}"
            path = self.instance_dir(uid) / series / f"{sop}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"\0" * INSTANCE_BYTES)
            add_instance(self.factory, uid, series, sop, received_at=when)
        with session_scope(self.factory) as session:
            study = session.scalars(select(Study).where(Study.study_instance_uid == uid)).one()
            study.state = study_state
            study.state_changed_at = when
            if job_state is None:
                return None
            job = Job(study_id=study.id, state=job_state, attempts=1, created_at=when, started_at=when,
                      finished_at=when if job_state in _FINISHED_JOB_STATES else None,
                      heartbeat_at=when, input_fingerprint="0" * 64, step=job_state.value)
            session.add(job)
            session.flush()
            out = self.results_dir(uid) / f"job-{job.id}"
            out.mkdir(parents=True)
            work = self.data_dir / "work" / f"job-{job.id}" / series
            work.mkdir(parents=True)
            (work / "leftover.dcm").write_bytes(b"\0" * RESULT_BYTES)
            for k, state in enumerate(exports):
                name = f"object{k}.dcm"
                (out / name).write_bytes(b"\0" * RESULT_BYTES)
                session.add(Export(
                    job_id=job.id, destination="pacs", object_path=f"results/{uid}/job-{job.id}/{name}",
                    object_kind="seg", sop_instance_uid=f"{uid}.9.{k}", state=state,
                    attempts=0 if state is ExportState.PENDING else 1, created_at=when, updated_at=when,
                    next_attempt_at=when if state is ExportState.PENDING else None,
                ))
            return job.id

    def rows(self, uid: str) -> dict[str, int]:
        """Rows of the study in each table (0 everywhere once it is purged)."""
        with session_scope(self.factory) as session:
            study_id = session.scalar(select(Study.id).where(Study.study_instance_uid == uid))
            if study_id is None:
                return {"studies": 0, "series": 0, "instances": 0, "jobs": 0, "exports": 0}

            def count(query: Any) -> int:
                return int(session.scalar(query) or 0)

            return {
                "studies": 1,
                "series": count(select(func.count()).select_from(Series).where(Series.study_id == study_id)),
                "instances": count(select(func.count()).select_from(Instance).join(Series)
                                   .where(Series.study_id == study_id)),
                "jobs": count(select(func.count()).select_from(Job).where(Job.study_id == study_id)),
                "exports": count(select(func.count()).select_from(Export).join(Job).where(Job.study_id == study_id)),
            }

    def events(self, uid: str, *kinds: str) -> list[EventRecord]:
        with session_scope(self.factory) as session:
            query = select(EventRecord).where(EventRecord.study_instance_uid == uid).order_by(EventRecord.id)
            if kinds:
                query = query.where(EventRecord.kind.in_(kinds))
            return list(session.scalars(query))

    def receive(self, uid: str, sop_suffix: str) -> Path:
        """What the listener does for one instance: the file, then its row (received now)."""
        series = f"{uid}.2"
        sop = f"{uid}.2.{sop_suffix}"
        path = self.instance_dir(uid) / series / f"{sop}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\1" * INSTANCE_BYTES)
        add_instance(self.factory, uid, series, sop)
        return path

    def close(self) -> None:
        self.engine.dispose()


RETENTION = {"enabled": True, "delivered_days": 30, "failed_days": 90, "interval_minutes": 60}


@pytest.fixture()
def site(make_config: Callable[..., NodeConfig]) -> Any:
    made = Site(make_config(retention=RETENTION))
    yield made
    made.close()


def _uid(n: int) -> str:
    return f"{ROOT}.{n}"


# --------------------------------------------------------------------------- eligibility


def test_which_studies_are_eligible(site: Site) -> None:
    cases = {
        # uid: (study kwargs, eligible, reason starts with)
        1: (dict(days=40), True, "delivered"),
        2: (dict(days=5), False, "delivered"),
        3: (dict(days=400, exports=(ExportState.DONE, ExportState.PENDING)), False, "work pending: export"),
        4: (dict(days=400, exports=(ExportState.SENDING,)), False, "work pending: export"),
        5: (dict(days=400, study_state=StudyState.PROCESSING, job_state=JobState.RUNNING, exports=()), False,
            "work pending: study processing"),
        6: (dict(days=400, study_state=StudyState.DONE, job_state=JobState.QUEUED, exports=()), False,
            "work pending: job"),
        7: (dict(days=400, study_state=StudyState.RECEIVING, job_state=None), False, "work pending: study receiving"),
        8: (dict(days=40, study_state=StudyState.FAILED, job_state=JobState.FAILED, exports=()), False,
            "processing failed"),
        9: (dict(days=100, study_state=StudyState.FAILED, job_state=JobState.FAILED, exports=()), True,
            "processing failed"),
        10: (dict(days=100, study_state=StudyState.SKIPPED, exports=()), True, "unsupported"),
        11: (dict(days=40, study_state=StudyState.SKIPPED, exports=()), False, "unsupported"),
        12: (dict(days=40, exports=(ExportState.DONE, ExportState.FAILED)), False, "export failed"),
        13: (dict(days=100, exports=(ExportState.FAILED,)), True, "export failed"),
        14: (dict(days=40, exports=()), False, "results not exported"),
    }
    for n, (kwargs, _, _) in cases.items():
        site.study(_uid(n), **kwargs)
    # a retrying export (pending after failed attempts) keeps an old study too
    with session_scope(site.factory) as session:
        export = session.scalars(select(Export).join(Job).join(Study)
                                 .where(Study.study_instance_uid == _uid(3), Export.state == ExportState.PENDING)).one()
        export.attempts = 2
        export.updated_at = utcnow() - timedelta(days=400)
    now = utcnow()
    with session_scope(site.factory) as session:
        verdicts = {s.study_instance_uid: assess(session, s, site.config.retention, now)
                    for s in session.scalars(select(Study))}
    for n, (_, eligible, reason) in cases.items():
        verdict = verdicts[_uid(n)]
        assert verdict.eligible is eligible, (n, verdict)
        assert verdict.reason.startswith(reason), (n, verdict.reason)
    assert verdicts[_uid(3)].reason.endswith("retrying")
    assert verdicts[_uid(1)].category == "delivered" and verdicts[_uid(9)].category == "failed"
    assert 39.9 < verdicts[_uid(1)].age_days < 40.1
    # the purger judges only studies that could be old enough, and finds the same ones
    eligible = {uid for uid, v in verdicts.items() if v.eligible}
    judged = Purger(site.config, site.factory).assessments(now)
    assert {v.study_instance_uid for v in judged if v.eligible} == eligible == {_uid(n) for n in (1, 9, 10, 13)}
    assert {_uid(2), _uid(5), _uid(7)}.isdisjoint(v.study_instance_uid for v in judged)
    # the same failed study is purged once failed_days have passed since its last activity
    later = utcnow() + timedelta(days=51)
    assert {v.study_instance_uid for v in Purger(site.config, site.factory).assessments(later) if v.eligible} >= {
        _uid(8), _uid(11), _uid(12), _uid(14)}


def test_a_recent_instance_keeps_an_old_delivered_study(site: Site) -> None:
    site.study(_uid(1), days=40)
    site.receive(_uid(1), "late")  # the study goes back to receiving: work pending
    with session_scope(site.factory) as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == _uid(1))).one()
        assert study.state is StudyState.RECEIVING
        study.state = StudyState.DONE  # even once processed again, the new instance is recent
    report = Purger(site.config, site.factory).purge()
    assert report.purged == [] and site.rows(_uid(1))["instances"] == 3


# --------------------------------------------------------------------------- the purge


def test_purge_deletes_files_results_and_rows_and_leaves_an_event(site: Site) -> None:
    old = site.study(_uid(1), days=40, exports=(ExportState.DONE, ExportState.DONE))
    site.study(_uid(2), days=5)
    site.study(_uid(3), days=400, exports=(ExportState.PENDING,))
    before = {uid: site.rows(uid) for uid in (_uid(2), _uid(3))}
    purged: list[PurgedStudy] = []
    purger = Purger(site.config, site.factory, on_purged=purged.append)
    assert [c.study_instance_uid for c in purger.candidates()] == [_uid(1)]
    expected_bytes = 2 * INSTANCE_BYTES + 2 * RESULT_BYTES + RESULT_BYTES  # instances, results, work copy
    assert purger.candidates()[0].size_bytes == expected_bytes

    report = purger.purge()

    assert [p.study_instance_uid for p in report.purged] == [_uid(1)] and purged == report.purged
    done = report.purged[0]
    assert (done.instances, done.jobs, done.exports, done.files, done.size_bytes) == (2, 1, 2, 5, expected_bytes)
    assert not site.instance_dir(_uid(1)).exists()
    assert not site.results_dir(_uid(1)).exists()
    assert not (site.data_dir / "work" / f"job-{old}").exists()
    assert site.rows(_uid(1)) == {"studies": 0, "series": 0, "instances": 0, "jobs": 0, "exports": 0}
    # the others are untouched, rows and files
    assert {uid: site.rows(uid) for uid in (_uid(2), _uid(3))} == before
    for uid in (_uid(2), _uid(3)):
        assert len(list(site.instance_dir(uid).rglob("*.dcm"))) == 2 and site.results_dir(uid).is_dir()
    # the audit trail: the mark, then the end with what was deleted; the earlier history stays
    trail = site.events(_uid(1))
    assert [e.kind for e in trail][-2:] == [EventKind.PURGE_STARTED, EventKind.PURGED]
    assert [e.kind for e in trail].count("instance_stored") == 2
    assert trail[-1].message.startswith("delivered; 40.0")
    assert f"2 instance(s) in 1 series, 1 job(s), 2 export(s); 5 file(s), {expected_bytes} bytes" in trail[-1].message
    # the folders above the study stay
    assert (site.data_dir / "instances").is_dir() and (site.data_dir / "results").is_dir()
    # nothing left to do: a second run purges nothing
    assert purger.purge().purged == []


def test_purge_on_postgres(make_config: Callable[..., NodeConfig], postgres_url: str) -> None:
    """The same deletes, the mark's row lock and the resumption on a real PostgreSQL server."""
    from dicom_node.services.retention import purge as purge_module

    site = Site(make_config(retention=RETENTION, database={"url": postgres_url}))
    try:
        site.study(_uid(1), days=40, exports=(ExportState.DONE, ExportState.DONE))
        site.study(_uid(2), days=100, study_state=StudyState.SKIPPED, exports=())
        site.study(_uid(3), days=5)
        real_remove = purge_module.remove_tree

        def die_on_2(path: Path, **options: Any) -> tuple[int, int]:
            if _uid(2) in str(path):
                raise _Crash()
            return real_remove(path, **options)

        purge_module.remove_tree = die_on_2
        try:
            with pytest.raises(_Crash):
                Purger(site.config, site.factory).purge()
        finally:
            purge_module.remove_tree = real_remove
        report = Purger(site.config, site.factory).purge()
        # study 2 (the oldest) went first and was cut short; the next run finishes it, then study 1
        assert [(p.study_instance_uid, p.resumed) for p in report.purged] == [(_uid(2), True), (_uid(1), False)]
        for uid in (_uid(1), _uid(2)):
            assert site.rows(uid)["studies"] == 0 and not site.instance_dir(uid).exists()
            assert site.events(uid)[-1].kind == EventKind.PURGED
        assert site.rows(_uid(3)) == {"studies": 1, "series": 1, "instances": 2, "jobs": 1, "exports": 1}
    finally:
        site.close()


# --------------------------------------------------------------------------- the guard


def test_guard_receives_share_and_a_purge_excludes() -> None:
    guard = StudyGuard()
    with guard.receiving("1.2"), guard.receiving("1.2"):
        assert guard.receivers("1.2") == 2
        with pytest.raises(StudyBusyError, match="still being received"):
            with guard.purging("1.2", timeout=0.05):
                pass
        with guard.purging("1.3", timeout=0.05):  # another study is not held up
            assert guard.is_purging("1.3")
    assert guard.receivers("1.2") == 0 and not guard.is_purging("1.3")
    assert guard._receivers == {} and guard._waiting_purges == {} and guard._purging == set()


def test_a_receive_in_progress_holds_the_purge_which_then_keeps_the_study(site: Site) -> None:
    uid = _uid(1)
    site.study(uid, days=40)
    guard = StudyGuard()
    purger = Purger(site.config, site.factory, guard)
    outcome: list[Any] = []
    with guard.receiving(uid):
        thread = threading.Thread(target=lambda: outcome.append(purger.purge_study(uid)))
        thread.start()
        time.sleep(0.3)
        assert thread.is_alive() and outcome == [], "the purge did not wait for the receive"
        assert site.events(uid, EventKind.PURGE_STARTED) == []
        late = site.receive(uid, "late")  # the instance being received commits under the guard
    thread.join(10)
    assert outcome and isinstance(outcome[0], str) and outcome[0].startswith("work pending: study receiving")
    assert late.is_file() and len(list(site.instance_dir(uid).rglob("*.dcm"))) == 3
    assert site.rows(uid)["instances"] == 3 and site.events(uid, EventKind.PURGE_STARTED) == []


def test_a_purge_in_progress_holds_a_receive_which_then_stores_the_study_afresh(site: Site) -> None:
    uid = _uid(1)
    site.study(uid, days=40)
    guard = StudyGuard()
    in_purge, go_on = threading.Event(), threading.Event()

    def hold_the_purge(_: PurgedStudy) -> None:  # called inside the exclusive guard, rows deleted
        in_purge.set()
        assert go_on.wait(10)

    purger = Purger(site.config, site.factory, guard, on_purged=hold_the_purge)
    purging = threading.Thread(target=purger.purge)
    purging.start()
    assert in_purge.wait(10)
    stored: list[Path] = []

    def receive() -> None:
        with guard.receiving(uid):
            stored.append(site.receive(uid, "new"))

    receiving = threading.Thread(target=receive)
    receiving.start()
    time.sleep(0.3)
    assert receiving.is_alive() and stored == [], "the receive did not wait for the purge"
    go_on.set()
    purging.join(10)
    receiving.join(10)
    assert len(stored) == 1 and stored[0].is_file()
    # a new study under the same UID: new rows, its own folder with only the new instance
    assert site.rows(uid) == {"studies": 1, "series": 1, "instances": 1, "jobs": 0, "exports": 0}
    assert [p.name for p in site.instance_dir(uid).rglob("*.dcm")] == [stored[0].name]
    mark = site.events(uid, EventKind.PURGE_STARTED)[-1]
    with session_scope(site.factory) as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == uid)).one()
        assert study.first_received_at > mark.time and study.state is StudyState.RECEIVING
    # the new study survives the next run and a restart's recovery
    assert purger.interrupted() == []
    assert purger.purge().purged == [] and stored[0].is_file()


def test_the_receiver_stores_a_study_again_after_its_purge(site: Site, tmp_path: Path) -> None:
    """The listener's own C-STORE path (file, rows) under the guard, before and after a purge
    of the study: the purge removes the folders the storage had seen, and the next instance
    makes them again."""
    from pydicom import dcmread

    from dicom_node.ingest import StoreReceiver, StoreStatus
    from dicom_node.storage import Storage
    from tests.support.node import receive_file
    from tests.inference.dicom_factory import Geometry, pattern_volume, write_classic_series

    files = write_classic_series(tmp_path / "in", pattern_volume(2, 16, 16), Geometry())
    uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    receiver = StoreReceiver(Storage(site.data_dir / "instances", 0), site.factory,
                             duplicate_policy="reject_if_different", accept_sop_classes=["MRImageStorage"])
    guard = StudyGuard()
    receiver.study_guard = guard  # as the node wires it: each receive holds the study's guard shared
    try:
        # a purge holding the study keeps the receive waiting: no file, no row meanwhile
        statuses: list[int] = []
        with guard.purging(uid):
            receiving = threading.Thread(target=lambda: statuses.append(receive_file(receiver, files[0])))
            receiving.start()
            time.sleep(0.3)
            assert receiving.is_alive() and statuses == [], "the receive did not wait for the purge"
            assert not site.instance_dir(uid).exists() and site.rows(uid)["instances"] == 0
        receiving.join(10)
        assert statuses == [StoreStatus.SUCCESS]
        old = utcnow() - timedelta(days=40)
        with session_scope(site.factory) as session:  # processed and delivered 40 days ago
            study = session.scalars(select(Study).where(Study.study_instance_uid == uid)).one()
            study.first_received_at = study.last_received_at = study.state_changed_at = old
            study.state = StudyState.DONE
            for instance in session.scalars(select(Instance)):
                instance.received_at = old
            job = Job(study_id=study.id, state=JobState.DONE, attempts=1, created_at=old, finished_at=old,
                      input_fingerprint="0" * 64)
            session.add(job)
            session.flush()
            session.add(Export(job_id=job.id, destination="pacs", object_path=f"results/{uid}/job-{job.id}/sr.dcm",
                               object_kind="sr", sop_instance_uid=f"{ROOT}.77", state=ExportState.DONE,
                               attempts=1, created_at=old, updated_at=old))
        assert [p.study_instance_uid for p in Purger(site.config, site.factory, guard).purge().purged] == [uid]
        assert not site.instance_dir(uid).exists()

        assert receive_file(receiver, files[1]) == StoreStatus.SUCCESS
        assert receive_file(receiver, files[0]) == StoreStatus.SUCCESS  # the purged one, sent again
        assert site.rows(uid) == {"studies": 1, "series": 1, "instances": 2, "jobs": 0, "exports": 0}
        assert len(list(site.instance_dir(uid).rglob("*.dcm"))) == 2
    finally:
        receiver.close()


# --------------------------------------------------------------------------- crashes


class _Crash(BaseException):
    """The process dies here (nothing after it runs)."""


def test_a_purge_cut_short_is_finished_at_the_next_start(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    from dicom_node.services.retention import purge as purge_module

    site.study(_uid(1), days=40)
    site.study(_uid(2), days=40)
    site.study(_uid(3), days=5)
    real_remove = purge_module.remove_tree

    def remove_then_die(path: Path, **options: Any) -> tuple[int, int]:
        if path == site.instance_dir(_uid(2)):  # study 2: results and work copy deleted, then the crash
            raise _Crash()
        return real_remove(path, **options)

    monkeypatch.setattr(purge_module, "remove_tree", remove_then_die)
    with pytest.raises(_Crash):
        Purger(site.config, site.factory).purge()
    monkeypatch.setattr(purge_module, "remove_tree", real_remove)
    # study 1 was purged; the crash left study 2 marked, with part of its files and all of its rows
    assert site.rows(_uid(1))["studies"] == 0
    crashed = _uid(2)
    assert site.rows(crashed)["instances"] == 2 and site.instance_dir(crashed).is_dir()
    assert not site.results_dir(crashed).exists()
    assert [e.kind for e in site.events(crashed, EventKind.PURGE_STARTED, EventKind.PURGED)] == [EventKind.PURGE_STARTED]
    with session_scope(site.factory) as session:  # the mark is the study row's purge state
        marked = session.scalars(select(Study).where(Study.study_instance_uid == crashed)).one()
        assert marked.purge_started_at is not None and marked.purge_reason == "delivered"
        assert 39.9 < marked.purge_age_days < 40.1

    restarted = Purger(site.config, site.factory)  # a new process
    assert [m.study_instance_uid for m in restarted.interrupted()] == [crashed]
    finished = restarted.finish_interrupted()
    assert [(p.study_instance_uid, p.resumed, p.reason) for p in finished] == [(crashed, True, "delivered")]
    assert site.rows(crashed)["studies"] == 0 and not site.instance_dir(crashed).exists()
    assert site.events(crashed)[-1].message.endswith("finished after an interruption")
    assert restarted.interrupted() == [] and restarted.purge().purged == []
    assert site.rows(_uid(3))["instances"] == 2 and site.instance_dir(_uid(3)).is_dir()


def test_a_failed_purge_is_reported_and_the_run_goes_on(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    from dicom_node.services.retention import purge as purge_module

    site.study(_uid(1), days=40)
    site.study(_uid(2), days=41)
    real_remove = purge_module.remove_tree

    def refuse_study_2(path: Path, **options: Any) -> tuple[int, int]:
        if _uid(2) in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_remove(path, **options)

    monkeypatch.setattr(purge_module, "remove_tree", refuse_study_2)
    report = Purger(site.config, site.factory).purge()
    assert [p.study_instance_uid for p in report.purged] == [_uid(1)]
    assert [uid for uid, _ in report.failed] == [_uid(2)] and "Permission denied" in report.failed[0][1]
    monkeypatch.setattr(purge_module, "remove_tree", real_remove)
    # the next run finishes it first
    again = Purger(site.config, site.factory).purge()
    assert [(p.study_instance_uid, p.resumed) for p in again.purged] == [(_uid(2), True)]


def test_an_instance_committed_past_the_guard_makes_the_purge_give_up(site: Site,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Second line of defence, for a listener that does not hold the guard: an instance that
    arrives after the mark keeps the rows (and its own file), and the trail says why."""
    from dicom_node.services.retention import purge as purge_module

    uid = _uid(1)
    site.study(uid, days=40)
    real_remove = purge_module.remove_tree
    late: list[Path] = []

    def remove_then_receive(path: Path, **options: Any) -> tuple[int, int]:
        result = real_remove(path, **options)
        if path == site.instance_dir(uid):
            late.append(site.receive(uid, "unguarded"))
        return result

    monkeypatch.setattr(purge_module, "remove_tree", remove_then_receive)
    outcome = Purger(site.config, site.factory).purge_study(uid)
    assert outcome == "an instance arrived during the purge"
    # the study goes on with the instance that arrived; the rows of the deleted files are gone
    assert late[0].is_file() and site.rows(uid)["instances"] == 1 and site.rows(uid)["series"] == 1
    with session_scope(site.factory) as session:
        assert session.scalars(select(Instance.path)).all() == [str(late[0].relative_to(site.data_dir / "instances"))]
    assert [e.kind for e in site.events(uid, EventKind.PURGE_STARTED, EventKind.PURGED, EventKind.PURGE_ABANDONED)] == [EventKind.PURGE_STARTED,
                                                                                          EventKind.PURGE_ABANDONED]
    assert Purger(site.config, site.factory).interrupted() == []  # given up, not resumed at the next start
    with session_scope(site.factory) as session:  # the purge state is cleared
        kept = session.scalars(select(Study).where(Study.study_instance_uid == uid)).one()
        assert (kept.purge_started_at, kept.purge_reason, kept.purge_age_days) == (None, None, None)


def test_a_resumed_purge_keeps_what_arrived_after_its_mark(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    """A purge cut short, then an instance of the study stored (by a listener without the
    guard) before the purge is finished: its file and row survive the finishing."""
    from dicom_node.services.retention import purge as purge_module

    uid = _uid(1)
    site.study(uid, days=40)

    def die(path: Path, **options: Any) -> tuple[int, int]:
        raise _Crash()

    monkeypatch.setattr(purge_module, "remove_tree", die)
    with pytest.raises(_Crash):
        Purger(site.config, site.factory).purge_study(uid)
    monkeypatch.undo()
    late = site.receive(uid, "after-the-mark")
    assert Purger(site.config, site.factory).finish_interrupted() == []
    assert late.is_file() and [p.name for p in site.instance_dir(uid).rglob("*.dcm")] == [late.name]
    assert site.rows(uid)["instances"] == 1 and not site.results_dir(uid).exists()
    assert site.events(uid)[-1].kind == EventKind.PURGE_ABANDONED


def test_the_purge_state_migration_carries_over_unfinished_marks(make_config: Callable[..., NodeConfig]) -> None:
    """A database of revision 0002 kept its purge marks in events only: upgrading sets the purge
    state of a study whose latest purge event is a mark, and of no other."""
    import sqlalchemy as sa

    config = make_config(retention=RETENTION)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_database(config.database_url, "0002_processes")
    engine = make_engine(config.database_url)
    now = utcnow()
    studies = sa.table("studies", sa.column("study_instance_uid"), sa.column("first_received_at"),
                       sa.column("last_received_at"), sa.column("state"), sa.column("state_changed_at"))
    events = sa.table("events", sa.column("time"), sa.column("kind"), sa.column("message"),
                      sa.column("study_instance_uid"))
    old, day = now - timedelta(days=50), timedelta(days=1)
    mark = "delivered; 41.50 days since the last activity (2026-10-20 10:00:00 UTC); deleting files, then rows"
    with engine.begin() as connection:
        for n, first in ((1, old), (2, old), (3, old), (4, now)):
            connection.execute(studies.insert().values(study_instance_uid=_uid(n), first_received_at=first,
                                                       last_received_at=first, state="done", state_changed_at=first))
        connection.execute(events.insert(), [
            # 1: marked, never finished; 2: marked, then given up; 3: no purge; 4: marked, purged, received again
            {"time": old + day, "kind": "study_purge_started", "message": mark, "study_instance_uid": _uid(1)},
            {"time": old + day, "kind": "study_purge_started", "message": mark, "study_instance_uid": _uid(2)},
            {"time": old + 2 * day, "kind": "study_purge_abandoned", "message": "x", "study_instance_uid": _uid(2)},
            {"time": old + day, "kind": "study_purge_started", "message": mark, "study_instance_uid": _uid(4)},
        ])
    engine.dispose()
    upgrade_database(config.database_url)
    engine = make_engine(config.database_url)
    try:
        marks = Purger(config, make_session_factory(engine)).interrupted()
        assert [(m.study_instance_uid, m.reason, m.age_days) for m in marks] == [(_uid(1), "delivered", 41.5)]
        assert abs((marks[0].time - (old + day)).total_seconds()) < 1
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- the node


def test_the_node_finishes_a_cut_purge_at_start_and_runs_the_scheduled_purge(
    make_config: Callable[..., NodeConfig], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from dicom_node.services.retention import purge as purge_module
    from dicom_node.node import Node

    config = make_config(retention=RETENTION, http={"enabled": False},
                         jobs={"preload_model": False, "device": "cpu"},
                         model={"checkpoint": str(tmp_path / "no-model.pt")})
    site = Site(config)
    try:
        site.study(_uid(1), days=40)
        site.study(_uid(2), days=200, study_state=StudyState.SKIPPED, exports=())
        site.study(_uid(3), days=2)

        def die(path: Path, **options: Any) -> tuple[int, int]:
            raise _Crash()

        monkeypatch.setattr(purge_module, "remove_tree", die)
        with pytest.raises(_Crash):
            Purger(config, site.factory).purge_study(_uid(1))
        monkeypatch.undo()
        assert site.rows(_uid(1))["studies"] == 1

        # a row committed just before a crash whose file name did not survive it: the start-up
        # check (after the lock and the purge finishing) removes it before anything reads it
        lost = site.instance_dir(_uid(3)) / f"{_uid(3)}.1" / f"{_uid(3)}.1.1.dcm"
        lost.unlink()

        with DataDirLock(config.data_dir):  # another node (or orthonode purge) holds the folder
            with pytest.raises(DataDirLockedError, match="orthonode.lock is locked by pid"):
                Node(config, poll_seconds=0.2).start()
        node = Node(config, poll_seconds=0.2)
        node.start()
        try:
            assert site.rows(_uid(1))["studies"] == 0, "the cut purge was not finished before the listener started"
            wait_for(lambda: site.rows(_uid(2))["studies"] == 0, 10, "the scheduled purge")
            metrics = node.metrics.render().decode()
            assert "orthonode_purged_studies_total 2.0" in metrics
            assert f"orthonode_purged_bytes_total {2 * (2 * INSTANCE_BYTES + RESULT_BYTES) + RESULT_BYTES:.1f}" \
                in metrics
            with pytest.raises(DataDirLockedError):
                DataDirLock(config.data_dir).acquire()
            assert node.listener.receiver.study_guard is node.study_guard
        finally:
            node.stop()
        assert site.rows(_uid(3))["instances"] == 1
        DataDirLock(config.data_dir).acquire()  # released at stop
    finally:
        site.close()


# --------------------------------------------------------------------------- orthonode purge


def _node_yaml(site: Site, tmp_path: Path, **retention: Any) -> Path:
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump({"node": {"data_dir": str(site.data_dir)},
                                    "retention": {**RETENTION, **retention}}), encoding="utf-8")
    return path


def test_purge_command_dry_run_lists_and_deletes_nothing_then_deletes(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site.study(_uid(1), days=40)
    site.study(_uid(2), days=120, study_state=StudyState.FAILED, job_state=JobState.FAILED, exports=())
    site.study(_uid(3), days=5)
    config = _node_yaml(site, tmp_path)

    assert main(["purge", "--config", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    listed = [line.split() for line in out.splitlines() if line.startswith(ROOT)]
    assert [row[0] for row in listed] == [_uid(2), _uid(1)]  # oldest first
    assert listed[0][1:3] == ["processing", "failed"] and listed[0][-2] == "120.0"
    assert listed[1][1] == "delivered" and listed[1][-2] == "40.0"
    assert "would delete 2 study(ies)" in out and "nothing deleted" in out
    assert all(site.rows(_uid(n))["studies"] == 1 for n in (1, 2, 3))
    assert site.instance_dir(_uid(1)).is_dir() and site.events(_uid(1), EventKind.PURGE_STARTED) == []

    assert main(["purge", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "deleted 2 study(ies)" in out
    assert site.rows(_uid(1))["studies"] == site.rows(_uid(2))["studies"] == 0
    assert not site.instance_dir(_uid(2)).exists() and site.rows(_uid(3))["instances"] == 2


def test_purge_command_refuses_while_a_node_serves_the_folder_or_when_disabled(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site.study(_uid(1), days=40)
    config = _node_yaml(site, tmp_path)
    with DataDirLock(site.data_dir):
        assert main(["purge", "--config", str(config)]) == 1
        err = capsys.readouterr().err
        assert "a node is serving" in err and "orthonode.lock" in err
        assert main(["purge", "--config", str(config), "--dry-run"]) == 0  # listing only: allowed, with a note
        assert "a node is serving" in capsys.readouterr().out
    assert main(["purge", "--config", str(_node_yaml(site, tmp_path, enabled=False))]) == 2
    assert "retention.enabled is false" in capsys.readouterr().err
    assert site.rows(_uid(1))["studies"] == 1 and site.instance_dir(_uid(1)).is_dir()
