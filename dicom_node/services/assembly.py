"""Study assembly: deciding when a study has arrived, with quiet-period timers.

DICOM has no "end of study" signal, so the node does what mercure and Orthanc do: a study is
ready when no instance arrived for a quiet period, per series (``series_quiet_seconds`` since
the series' last instance, for every series) and per study (``study_quiet_seconds`` since the
study's last instance).  A study that keeps receiving is processed anyway once
``forced_after_seconds`` have passed since the first instance of the current *episode* (the
instances received after the study's previous job was queued).

Timers are APScheduler date jobs, one per study (id ``assemble:<StudyInstanceUID>``), run by a
single-threaded executor so checks never overlap.  Every new instance moves the study's timer
(debounce).  A firing timer does not trust memory: it re-reads the times from the database,
and either re-arms itself for the moment the study can be ready or queues a job through
:func:`dicom_node.services.jobs.enqueue_if_changed`, which refuses a job for an instance set that the
latest job already covers.  That is what prevents double firing when a study arrives in pieces
or is sent twice, and it makes late instances re-trigger processing (a changed instance set
gives a new job that supersedes the old one).

A quiet period alone cannot tell a finished sender from one that paused in the middle of an
association (a busy PACS, a slow archive, a sender waiting for an answer it lost), so the
listener can also *hold* a study while an association that delivered to it is open
(:meth:`StudyAssembler.hold` / :meth:`StudyAssembler.release`): a held study is not queued
before the association ends, except at the forced limit, which bounds the wait for an
association that never ends.

With several listener processes (:mod:`dicom_node.cluster`), each arms timers for the
studies it received instances of; the times come from the database, which every listener
updates, and a check holds the study's row lock, so one study's instances may arrive through
different listeners and still give one job per instance set.  A hold is the holding
listener's own: another listener's timer sees only the quiet period in the database.

Nothing here needs to survive a restart: at start-up :meth:`StudyAssembler.recover` re-arms a
timer for every study still receiving (or complete without a job), computed from the times in
the database.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import StudyAssemblySection
from dicom_node.db import Instance, Job, JobState, Series, Study, StudyState, session_scope, utcnow
from dicom_node.services.jobs import enqueue_if_changed

log = logging.getLogger(__name__)
# APScheduler logs every timer move at INFO ("Added job ..."), i.e. once per received instance;
# the assembler logs its own decisions instead.
logging.getLogger("apscheduler").setLevel(logging.WARNING)


@dataclass(frozen=True)
class Readiness:
    """When a study can be processed and why (computed from the database)."""

    study_instance_uid: str
    #: the quiet periods of the study and of all its series have passed at this time
    quiet_at: datetime
    #: the forced upper limit of the current episode
    forced_at: datetime
    #: the series whose quiet period ends last (None: the study timer is the later one)
    waiting_series: str | None

    @property
    def due_at(self) -> datetime:
        return min(self.quiet_at, self.forced_at)

    def reason(self, now: datetime) -> str | None:
        """Why the study is ready at ``now``, or None when it is not."""
        if now >= self.quiet_at:
            return "quiet period passed (study and every series)"
        if now >= self.forced_at:
            return "forced: still receiving at the upper time limit"
        return None


def readiness(session: Session, study: Study, timers: StudyAssemblySection) -> Readiness:
    """The quiet and forced times of ``study`` from its rows (UTC)."""
    series_rows = session.execute(
        select(Series.series_instance_uid, Series.last_received_at).where(Series.study_id == study.id)
    ).all()
    quiet_at = study.last_received_at + timedelta(seconds=timers.study_quiet_seconds)
    waiting: str | None = None
    for series_uid, last in series_rows:
        series_quiet = last + timedelta(seconds=timers.series_quiet_seconds)
        if series_quiet > quiet_at:
            quiet_at, waiting = series_quiet, series_uid
    last_job_at = session.scalar(
        select(func.max(Job.created_at)).where(Job.study_id == study.id, Job.state != JobState.SUPERSEDED)
    )
    episode_start = study.first_received_at
    if last_job_at is not None:
        first_late = session.scalar(
            select(func.min(Instance.received_at)).join(Series)
            .where(Series.study_id == study.id, Instance.received_at > last_job_at)
        )
        episode_start = first_late if first_late is not None else study.last_received_at
    if episode_start.tzinfo is None:  # pragma: no cover - db.UTCDateTime always returns aware values
        raise ValueError("naive timestamp from the database")
    forced_at = episode_start + timedelta(seconds=timers.forced_after_seconds)
    return Readiness(study.study_instance_uid, quiet_at, forced_at, waiting)


class StudyAssembler:
    """Arms, moves and fires the per-study timers; queues jobs for ready studies.

    ``on_job_queued(job_id)`` is called after the transaction that queued a job committed (the
    node wakes its worker there).
    """

    def __init__(
        self,
        timers: StudyAssemblySection,
        factory: sessionmaker[Session],
        on_job_queued: Callable[[int], None] | None = None,
    ) -> None:
        self.timers = timers
        self.factory = factory
        self.on_job_queued = on_job_queued
        self._scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_workers=1)},
            # One executor thread serialises the checks.  max_instances is high on purpose: a timer
            # re-armed while the previous check of the same study still runs must queue behind
            # it, not be skipped (APScheduler drops a run beyond max_instances, and a dropped
            # date timer would leave the study waiting until its next instance).
            job_defaults={"coalesce": True, "max_instances": 1000, "misfire_grace_time": None},
            timezone="UTC",
        )
        self._lock = threading.Lock()
        #: study uid -> when its current episode started (memory only; the database has the truth)
        self._episode: dict[str, datetime] = {}
        #: study uid -> earliest time it may be queued (a fresh quiet period after a restart)
        self._not_before: dict[str, datetime] = {}
        #: study uid -> associations that delivered to it and are still open (memory only: a
        #: restart ends every association)
        self._holds: dict[str, int] = {}
        self.fired: list[tuple[str, int]] = []  # (study uid, job id) of jobs queued, for tests/status

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._scheduler.start()
        self.recover()

    def stop(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)

    @property
    def running(self) -> bool:
        return bool(self._scheduler.running)

    def pending(self) -> list[str]:
        """Study UIDs with an armed timer."""
        return [job.id.removeprefix("assemble:") for job in self._scheduler.get_jobs()]

    def recover(self) -> int:
        """Arm a timer for every study still receiving, or complete without an open job.

        A study that was still *receiving* when the node stopped gets a fresh quiet period from
        now: while the node was down its sender could not send, so the silence in the database
        says nothing about whether the study is complete (a sender retrying after the outage
        would otherwise find half its study already processed).
        """
        now = utcnow()
        with session_scope(self.factory) as session:
            rows = session.execute(
                select(Study.study_instance_uid, Study.state)
                .where(Study.state.in_([StudyState.RECEIVING, StudyState.COMPLETE]))
            ).all()
        grace = timedelta(seconds=max(self.timers.series_quiet_seconds, self.timers.study_quiet_seconds))
        for uid, state in rows:
            if state is StudyState.RECEIVING:
                with self._lock:
                    self._not_before[uid] = now + grace
                self._arm(uid, now + grace)
            else:
                self._arm(uid, now)
        if rows:
            log.info("re-armed assembly timers for %d study(ies) after start-up", len(rows))
        return len(rows)

    # ------------------------------------------------------------------ events
    def nudge(self, study_uid: str, series_uid: str | None = None) -> None:
        """An instance of ``study_uid`` was stored: move the study's timer.

        Called on the listener's association thread, so it only arms a timer (no database).
        The timer is placed at the end of the longer quiet period, but never after the
        episode's forced limit.
        """
        now = utcnow()
        with self._lock:
            episode = self._episode.setdefault(study_uid, now)
        quiet = max(self.timers.series_quiet_seconds, self.timers.study_quiet_seconds)
        due = min(now + timedelta(seconds=quiet), episode + timedelta(seconds=self.timers.forced_after_seconds))
        log.debug("study %s series %s: instance stored; study timer at %s", study_uid, series_uid, due.isoformat())
        self._arm(study_uid, due)

    def hold(self, study_uid: str) -> None:
        """An open association delivered an instance of ``study_uid``: the study is not queued
        until every such association ended (:meth:`release`) or the forced limit passed.

        The listener calls this once per association and study (on the association's first
        instance of the study) and must call :meth:`release` for it when the association is
        released or aborted.
        """
        with self._lock:
            self._holds[study_uid] = self._holds.get(study_uid, 0) + 1

    def release(self, study_uid: str) -> None:
        """An association that held ``study_uid`` ended; when it was the last one, the study's
        quiet periods decide again (a study that went quiet during the hold is checked now)."""
        with self._lock:
            count = self._holds.get(study_uid, 0)
            if count <= 0:
                raise ValueError(f"study {study_uid}: release without a matching hold")
            if count == 1:
                del self._holds[study_uid]
            else:
                self._holds[study_uid] = count - 1
            last = count == 1
        if last and self.running:
            self._arm(study_uid, utcnow())

    def held(self, study_uid: str) -> int:
        """Open associations holding ``study_uid``."""
        with self._lock:
            return self._holds.get(study_uid, 0)

    def _arm(self, study_uid: str, when: datetime) -> None:
        self._scheduler.add_job(
            self.check, trigger="date", run_date=when, args=[study_uid],
            id=f"assemble:{study_uid}", replace_existing=True, name=f"assemble {study_uid}",
        )

    def check(self, study_uid: str) -> int | None:
        """Timer callback: queue a job if the study is ready, else re-arm; returns the job id."""
        now = utcnow()
        job_id: int | None = None
        try:
            with session_scope(self.factory) as session:
                # the study's row lock: with several listeners each arms its own timer for a study
                # it received part of, and the checks of one study must not queue twice
                study = session.scalars(
                    select(Study).where(Study.study_instance_uid == study_uid).with_for_update()
                ).first()
                if study is None:
                    log.warning("study %s: timer fired but the study is not in the database", study_uid)
                    return None
                ready = readiness(session, study, self.timers)
                reason = ready.reason(now)
                with self._lock:
                    not_before = self._not_before.get(study_uid)
                if reason is not None and not_before is not None and now < not_before and now < ready.forced_at:
                    log.debug("study %s: quiet since before the restart; waiting until %s", study_uid,
                              not_before.isoformat())
                    self._arm(study_uid, not_before)
                    return None
                holds = self.held(study_uid)
                if reason is not None and holds and now < ready.forced_at:
                    log.info("study %s: quiet, but %d association(s) that sent it are still open; waiting for them "
                             "to end (at most until the forced limit, %s)", study_uid, holds,
                             ready.forced_at.isoformat())
                    self._arm(study_uid, ready.forced_at)
                    return None
                if reason is None:
                    waiting = f"series {ready.waiting_series}" if ready.waiting_series else "the study quiet period"
                    log.debug("study %s: not ready, waiting for %s until %s",
                              study_uid, waiting, ready.due_at.isoformat())
                    self._arm(study_uid, ready.due_at)
                    return None
                job = enqueue_if_changed(session, study, reason)
                job_id = job.id if job is not None else None
        except Exception:  # the timer thread must go on; the study is retried in a few seconds
            log.exception("study %s: assembly check failed; trying again in 5 s", study_uid)
            self._arm(study_uid, utcnow() + timedelta(seconds=5))
            return None
        with self._lock:
            self._episode.pop(study_uid, None)
            self._not_before.pop(study_uid, None)
        if job_id is not None:
            self.fired.append((study_uid, job_id))
            if self.on_job_queued is not None:
                self.on_job_queued(job_id)
        return job_id
