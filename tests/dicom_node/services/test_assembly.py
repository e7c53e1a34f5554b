"""Study assembly: quiet-period timers per series and per study, the forced limit, no double
firing, late instances re-triggering, and timers re-armed from the database after a restart.

Instances are recorded with the listener's own database function, so the assembler sees the
rows exactly as in production; the timers are real APScheduler timers with sub-second periods.
"""
from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import select

from dicom_node.config import StudyAssemblySection
from dicom_node.db import EventRecord, Job, JobState, Study, StudyState, session_scope, utcnow
from dicom_node.services.assembly import StudyAssembler, readiness
from dicom_node.services.jobs import enqueue_if_changed
from tests.support.node import add_instance, wait_for

STUDY = "1.2.3.100"


def _jobs(factory) -> list[tuple[int, str, str]]:
    with session_scope(factory) as session:
        return [(j.id, j.state.value, j.input_fingerprint) for j in session.scalars(select(Job).order_by(Job.id))]


def _study(session, uid: str = STUDY) -> Study:
    return session.scalars(select(Study).where(Study.study_instance_uid == uid)).one()


def test_readiness_waits_for_the_slowest_series_and_the_study(node_db) -> None:
    t0 = utcnow() - timedelta(seconds=100)
    add_instance(node_db, STUDY, "1.2.3.100.1", "1.2.3.100.1.1", received_at=t0)
    add_instance(node_db, STUDY, "1.2.3.100.2", "1.2.3.100.2.1", received_at=t0 + timedelta(seconds=10))
    timers = StudyAssemblySection(series_quiet_seconds=30, study_quiet_seconds=20, forced_after_seconds=300)
    with session_scope(node_db) as session:
        ready = readiness(session, _study(session), timers)
    # series 2 is the last to go quiet (t0+10+30) and its series timer outlasts the study timer (t0+10+20)
    assert ready.quiet_at == t0 + timedelta(seconds=40)
    assert ready.waiting_series == "1.2.3.100.2"
    assert ready.forced_at == t0 + timedelta(seconds=300)
    assert ready.reason(t0 + timedelta(seconds=39)) is None
    assert "quiet" in ready.reason(t0 + timedelta(seconds=40))

    longer_study = StudyAssemblySection(series_quiet_seconds=5, study_quiet_seconds=60, forced_after_seconds=300)
    with session_scope(node_db) as session:
        ready = readiness(session, _study(session), longer_study)
    assert ready.quiet_at == t0 + timedelta(seconds=70) and ready.waiting_series is None


def test_forced_limit_counts_from_the_first_instance_after_the_last_job(node_db) -> None:
    t0 = utcnow() - timedelta(seconds=1000)
    add_instance(node_db, STUDY, "1.2.3.100.1", "1.2.3.100.1.1", received_at=t0)
    timers = StudyAssemblySection(series_quiet_seconds=30, study_quiet_seconds=30, forced_after_seconds=100)
    with session_scope(node_db) as session:
        study = _study(session)
        assert readiness(session, study, timers).forced_at == t0 + timedelta(seconds=100)
        job = enqueue_if_changed(session, study, "test")
        assert job is not None
        job.created_at = t0 + timedelta(seconds=50)
    late = t0 + timedelta(seconds=500)
    add_instance(node_db, STUDY, "1.2.3.100.1", "1.2.3.100.1.2", received_at=late)
    add_instance(node_db, STUDY, "1.2.3.100.1", "1.2.3.100.1.3", received_at=late + timedelta(seconds=20))
    with session_scope(node_db) as session:
        ready = readiness(session, _study(session), timers)
    assert ready.forced_at == late + timedelta(seconds=100)  # the new episode, not the study's first instance


def test_a_study_arriving_in_pieces_is_queued_once(node_db) -> None:
    # quiet period well above the gaps, so a loaded test machine cannot stretch a gap past it
    timers = StudyAssemblySection(series_quiet_seconds=1.5, study_quiet_seconds=1.5, forced_after_seconds=30)
    queued: list[int] = []
    assembler = StudyAssembler(timers, node_db, on_job_queued=queued.append)
    assembler.start()
    try:
        # three pieces, each gap shorter than the quiet period, from two "associations" at once
        def piece(series: str, first: int) -> None:
            for i in range(first, first + 4):
                add_instance(node_db, STUDY, series, f"{series}.{i}")
                assembler.nudge(STUDY, series)
                time.sleep(0.05)

        for start in (0, 10, 20):
            threads = [threading.Thread(target=piece, args=(s, start)) for s in ("1.2.3.100.1", "1.2.3.100.2")]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert _jobs(node_db) == [], "queued while the study was still arriving"
            time.sleep(0.3)
        wait_for(lambda: queued, 10, "the study to be queued")
        time.sleep(1.6)  # any second firing would happen now
        assert len(_jobs(node_db)) == 1 and len(queued) == 1
        # a timer firing again (e.g. a duplicate nudge) finds the job covering the same instances
        assert assembler.check(STUDY) is None
        assert len(_jobs(node_db)) == 1
        with session_scope(node_db) as session:
            assert _study(session).state is StudyState.COMPLETE
    finally:
        assembler.stop()


def test_a_resent_study_does_not_queue_again_but_new_content_does(node_db) -> None:
    timers = StudyAssemblySection(series_quiet_seconds=0.2, study_quiet_seconds=0.2, forced_after_seconds=30)
    assembler = StudyAssembler(timers, node_db)
    past = utcnow() - timedelta(seconds=5)
    for i in range(3):
        add_instance(node_db, STUDY, "1.2.3.100.1", f"1.2.3.100.1.{i}", received_at=past)
    first = assembler.check(STUDY)
    assert first is not None
    # the PACS sends the same instances again (same bytes: the listener leaves the rows alone)
    for i in range(3):
        add_instance(node_db, STUDY, "1.2.3.100.1", f"1.2.3.100.1.{i}", received_at=past, content_changed=False)
    assert assembler.check(STUDY) is None
    # one instance replaced by other content under the same UID (duplicate_policy: overwrite)
    add_instance(node_db, STUDY, "1.2.3.100.1", "1.2.3.100.1.0", sha="f" * 64, received_at=past)
    second = assembler.check(STUDY)
    assert second is not None and second != first
    states = {job_id: state for job_id, state, _ in _jobs(node_db)}
    assert states == {first: "superseded", second: "queued"}


def test_late_instances_after_a_finished_job_queue_a_new_job(node_db) -> None:
    timers = StudyAssemblySection(series_quiet_seconds=0.3, study_quiet_seconds=0.3, forced_after_seconds=30)
    queued: list[int] = []
    assembler = StudyAssembler(timers, node_db, on_job_queued=queued.append)
    assembler.start()
    try:
        for i in range(3):
            add_instance(node_db, STUDY, "1.2.3.100.1", f"1.2.3.100.1.{i}")
            assembler.nudge(STUDY, "1.2.3.100.1")
        wait_for(lambda: queued, 5, "the first job")
        with session_scope(node_db) as session:  # as the worker would leave it
            job = session.get(Job, queued[0])
            job.state = JobState.DONE
            _study(session).state = StudyState.DONE
        add_instance(node_db, STUDY, "1.2.3.100.3", "1.2.3.100.3.1")  # a late series
        assembler.nudge(STUDY, "1.2.3.100.3")
        with session_scope(node_db) as session:
            assert _study(session).state is StudyState.RECEIVING
        wait_for(lambda: len(queued) == 2, 5, "the re-triggered job")
        jobs = _jobs(node_db)
        assert [state for _, state, _ in jobs] == ["done", "queued"]  # the worker supersedes "done" when the new one finishes
        assert jobs[0][2] != jobs[1][2]
    finally:
        assembler.stop()


def test_a_study_that_keeps_arriving_is_forced(node_db) -> None:
    timers = StudyAssemblySection(series_quiet_seconds=1.0, study_quiet_seconds=1.0, forced_after_seconds=2.0)
    queued: list[int] = []
    assembler = StudyAssembler(timers, node_db, on_job_queued=queued.append)
    assembler.start()
    try:
        started = time.monotonic()
        i = 0
        while time.monotonic() - started < 3.0:  # never quiet for 1 s
            add_instance(node_db, STUDY, "1.2.3.100.1", f"1.2.3.100.1.{i}")
            assembler.nudge(STUDY, "1.2.3.100.1")
            i += 1
            time.sleep(0.1)
        assert len(queued) == 1, "the forced limit did not fire while instances kept arriving"
        wait_for(lambda: len(queued) == 2, 10, "the job for the instances received after the forced one")
        with session_scope(node_db) as session:
            events = [e.message for e in session.scalars(select(EventRecord).where(EventRecord.kind == "job_queued"))]
        assert events[0].startswith("forced") and events[1].startswith("quiet")
    finally:
        assembler.stop()


def test_timers_are_rearmed_at_start_up_with_a_fresh_quiet_period(node_db) -> None:
    past = utcnow() - timedelta(seconds=30)
    add_instance(node_db, STUDY, "1.2.3.100.1", "1.2.3.100.1.1", received_at=past)  # acknowledged, then the node died
    timers = StudyAssemblySection(series_quiet_seconds=1.0, study_quiet_seconds=1.0, forced_after_seconds=30)
    queued: list[int] = []
    assembler = StudyAssembler(timers, node_db, on_job_queued=queued.append)
    assembler.start()
    try:
        assert assembler.pending() == [STUDY], "no timer was armed for the study from the database"
        time.sleep(0.5)
        assert queued == [], "the silence while the node was down was taken for a complete study"
        add_instance(node_db, STUDY, "1.2.3.100.1", "1.2.3.100.1.2")  # the sender resumes after the outage
        assembler.nudge(STUDY, "1.2.3.100.1")
        wait_for(lambda: queued, 5, "the study once quiet after the restart")
        time.sleep(0.3)
        assert len(queued) == 1
        with session_scope(node_db) as session:
            (event,) = session.scalars(select(EventRecord).where(EventRecord.kind == "job_queued"))
        assert event.message.endswith("2 instances")
    finally:
        assembler.stop()


def test_a_study_is_not_queued_while_an_association_that_sent_it_is_open(node_db) -> None:
    """A sender that pauses mid-association for longer than the quiet period (a lost answer, a slow
    archive) does not get half its study processed; the forced limit still bounds the wait."""
    timers = StudyAssemblySection(series_quiet_seconds=0.3, study_quiet_seconds=0.3, forced_after_seconds=30)
    queued: list[int] = []
    assembler = StudyAssembler(timers, node_db, on_job_queued=queued.append)
    assembler.start()
    try:
        assembler.hold(STUDY)
        assembler.hold(STUDY)  # a second association sends another series of the same study
        add_instance(node_db, STUDY, "1.2.3.100.1", "1.2.3.100.1.1")
        assembler.nudge(STUDY, "1.2.3.100.1")
        time.sleep(1.0)  # three quiet periods
        assert queued == [] and _jobs(node_db) == [], "queued while its associations were open"
        assembler.release(STUDY)
        time.sleep(0.6)
        assert queued == [], "queued while one association was still open"
        assert assembler.held(STUDY) == 1
        assembler.release(STUDY)
        wait_for(lambda: queued, 5, "the study to be queued once the last association ended")
        assert len(_jobs(node_db)) == 1 and assembler.held(STUDY) == 0
        with pytest.raises(ValueError, match="release without a matching hold"):
            assembler.release(STUDY)
    finally:
        assembler.stop()


def test_a_held_study_is_still_forced(node_db) -> None:
    timers = StudyAssemblySection(series_quiet_seconds=0.3, study_quiet_seconds=0.3, forced_after_seconds=1.0)
    queued: list[int] = []
    assembler = StudyAssembler(timers, node_db, on_job_queued=queued.append)
    assembler.start()
    try:
        assembler.hold(STUDY)  # an association that never ends
        add_instance(node_db, STUDY, "1.2.3.100.1", "1.2.3.100.1.1")
        assembler.nudge(STUDY, "1.2.3.100.1")
        time.sleep(0.6)
        assert queued == []
        wait_for(lambda: queued, 5, "the forced limit to queue the held study")
        with session_scope(node_db) as session:
            message = session.scalars(select(EventRecord).where(EventRecord.kind == "job_queued")).one().message
        assert message.startswith("quiet")  # ready by its quiet period; the hold only delayed it
    finally:
        assembler.stop()
