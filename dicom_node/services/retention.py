"""Retention: deleting old studies (instance files, result files, rows) so ``data_dir`` stays bounded.

The policy (:func:`assess`), the purge of one study in three crash-safe steps
(:class:`Purger`), the guard between purge and listener (:class:`StudyGuard`), the scheduled
runner and ``orthonode purge``.  The rules, the steps and the race are described in
``docs/retention.md``.
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal

from sqlalchemy import Engine, delete, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import ConfigError, NodeConfig, RetentionSection, load_config
from dicom_node.db import (
    EventKind,
    Export,
    ExportState,
    Instance,
    Job,
    JobState,
    Series,
    Study,
    StudyState,
    add_event,
    make_engine,
    make_session_factory,
    session_scope,
    upgrade_database,
    utcnow,
)
from dicom_node.cluster import (
    RETENTION_RUN_LOCK,
    AdvisoryLock,
    LockTimeout,
    holding,
    is_postgresql,
    study_lock_key,
)
from dicom_node.layout import DataDirLock, DataDirLockedError
from dicom_node.services.base import BackgroundService
from dicom_node.storage import fsync_directory, validate_uid

log = logging.getLogger(__name__)

#: how long a scheduled purge waits for a study's receivers before leaving it for the next run
GUARD_TIMEOUT_SECONDS = 30.0

_OPEN_STUDY_STATES = frozenset({StudyState.RECEIVING, StudyState.COMPLETE, StudyState.PROCESSING})
_OPEN_JOB_STATES = frozenset({JobState.QUEUED, JobState.RUNNING})
_OPEN_EXPORT_STATES = frozenset({ExportState.PENDING, ExportState.SENDING})
_DAY = 86400.0


# --------------------------------------------------------------------------- the guard


class StudyBusyError(RuntimeError):
    """The exclusive guard of a study could not be taken in time (instances kept arriving)."""


class StudyGuard:
    """In-process reader/writer guard per Study Instance UID.

    ``receiving(uid)`` is shared: any number of associations may store instances of one study
    at once.  ``purging(uid)`` is exclusive: it waits until no receive of the study is in
    progress, and receives that start meanwhile wait until the purge is over.  A waiting purge
    has priority over new receives, so a steady stream of instances cannot starve it (the
    purge then re-checks, sees the fresh instance and leaves the study alone).

    Only studies in use have an entry, so the guard does not grow with the number of studies.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._receivers: dict[str, int] = {}
        self._purging: set[str] = set()
        self._waiting_purges: dict[str, int] = {}

    @contextmanager
    def receiving(self, study_uid: str) -> Iterator[None]:
        """Hold while writing one instance of ``study_uid`` and committing its row."""
        with self._cond:
            while study_uid in self._purging or self._waiting_purges.get(study_uid, 0):
                self._cond.wait()
            self._receivers[study_uid] = self._receivers.get(study_uid, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                left = self._receivers[study_uid] - 1
                if left:
                    self._receivers[study_uid] = left
                else:
                    del self._receivers[study_uid]
                self._cond.notify_all()

    @contextmanager
    def purging(self, study_uid: str, timeout: float | None = None) -> Iterator[None]:
        """Hold exclusively while purging ``study_uid``; :class:`StudyBusyError` when receives of
        the study still run after ``timeout`` seconds (``None``: wait as long as it takes)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._waiting_purges[study_uid] = self._waiting_purges.get(study_uid, 0) + 1
            try:
                while study_uid in self._purging or self._receivers.get(study_uid, 0):
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise StudyBusyError(f"study {study_uid}: instances were still being received after "
                                             f"{timeout:g} s; left for the next purge")
                    self._cond.wait(remaining)
                self._purging.add(study_uid)
            finally:
                left = self._waiting_purges[study_uid] - 1
                if left:
                    self._waiting_purges[study_uid] = left
                else:
                    del self._waiting_purges[study_uid]
                self._cond.notify_all()  # receivers waiting only for this waiting purge re-check
        try:
            yield
        finally:
            with self._cond:
                self._purging.discard(study_uid)
                self._cond.notify_all()

    def receivers(self, study_uid: str) -> int:
        """Receives of ``study_uid`` in progress now."""
        with self._cond:
            return self._receivers.get(study_uid, 0)

    def is_purging(self, study_uid: str) -> bool:
        with self._cond:
            return study_uid in self._purging


class DatabaseStudyGuard:
    """:class:`StudyGuard` across processes and hosts, for PostgreSQL: a receive holds the
    study's advisory lock shared, a purge holds it exclusively (:class:`dicom_node.cluster.AdvisoryLock`).

    A purge waiting for the lock makes new receives of the study wait behind it, as the
    in-process guard does, and the server drops a lock whose process died.  Each hold costs a
    pooled connection and two statements.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @contextmanager
    def receiving(self, study_uid: str) -> Iterator[None]:
        lock = AdvisoryLock(self.engine, study_lock_key(study_uid), shared=True)
        lock.acquire()
        try:
            yield
        finally:
            lock.release()

    @contextmanager
    def purging(self, study_uid: str, timeout: float | None = None) -> Iterator[None]:
        lock = AdvisoryLock(self.engine, study_lock_key(study_uid))
        try:
            lock.acquire(timeout)
        except LockTimeout:
            raise StudyBusyError(f"study {study_uid}: instances were still being received after {timeout:g} s; "
                                 f"left for the next purge") from None
        try:
            yield
        finally:
            lock.release()


def study_guard_for(engine: Engine) -> StudyGuard | DatabaseStudyGuard:
    """The guard a node on ``engine`` uses: across processes on PostgreSQL, in memory on SQLite
    (one process)."""
    return DatabaseStudyGuard(engine) if is_postgresql(engine) else StudyGuard()


# --------------------------------------------------------------------------- eligibility

Category = Literal["delivered", "failed"]


@dataclass(frozen=True)
class Assessment:
    """What the retention policy says about one study at one moment."""

    study_id: int
    study_instance_uid: str
    #: may be purged now
    eligible: bool
    #: ``delivered`` (kept ``delivered_days``) or ``failed`` (kept ``failed_days``); None when
    #: open work keeps the study whatever its age
    category: Category | None
    #: why, in words: ``delivered``, ``processing failed``, ``export pending`` ...
    reason: str
    #: the study's last activity (the age counts from here)
    last_activity: datetime
    age_days: float
    #: when the study becomes eligible (None: open work)
    keep_until: datetime | None


def _latest(values: list[datetime | None]) -> datetime:
    present = [v for v in values if v is not None]
    return max(present)


def assess(session: Session, study: Study, policy: RetentionSection, now: datetime) -> Assessment:
    """Whether ``study`` may be purged at ``now`` under ``policy``, and why (reads its jobs and
    exports in ``session``)."""
    jobs = sorted(study.jobs, key=lambda j: j.id)
    exports = [e for j in jobs for e in j.exports]
    last = _latest([study.last_received_at, study.state_changed_at, *(j.finished_at for j in jobs),
                    *(j.created_at for j in jobs), *(e.updated_at for e in exports)])
    age_days = (now - last).total_seconds() / _DAY

    def result(category: Category | None, reason: str) -> Assessment:
        if category is None:
            return Assessment(study.id, study.study_instance_uid, False, None, reason, last, age_days, None)
        days = policy.delivered_days if category == "delivered" else policy.failed_days
        keep_until = last + timedelta(days=days)
        return Assessment(study.id, study.study_instance_uid, now >= keep_until, category, reason, last, age_days,
                          keep_until)

    if study.state in _OPEN_STUDY_STATES:
        return result(None, f"work pending: study {study.state.value}")
    open_jobs = [j for j in jobs if j.state in _OPEN_JOB_STATES]
    if open_jobs:
        return result(None, f"work pending: job {open_jobs[-1].id} {open_jobs[-1].state.value}")
    open_exports = [e for e in exports if e.state in _OPEN_EXPORT_STATES]
    if open_exports:
        e = open_exports[0]
        what = "retrying" if e.state is ExportState.PENDING and e.attempts > 0 else e.state.value
        return result(None, f"work pending: export {e.id} to {e.destination} {what}")
    current = next((j for j in reversed(jobs) if j.state is not JobState.SUPERSEDED), None)
    if current is None:
        return result("failed", "no job recorded")
    if study.state is StudyState.FAILED or current.state is JobState.FAILED:
        return result("failed", "processing failed")
    if study.state is StudyState.SKIPPED:
        return result("failed", "unsupported (nothing the node could process)")
    mine = list(current.exports)
    if not mine:
        return result("failed", "results not exported (no route matched)")
    if any(e.state is ExportState.FAILED for e in mine):
        return result("failed", "export failed")
    return result("delivered", "delivered")


# --------------------------------------------------------------------------- deleting files


def tree_size(root: Path) -> tuple[int, int]:
    """(files, bytes) under ``root`` (0, 0 when it does not exist); links are not followed."""
    files = size = 0
    if root.is_symlink() or not root.is_dir():
        return (1, root.lstat().st_size) if root.is_symlink() or root.is_file() else (0, 0)
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            try:
                size += os.lstat(os.path.join(dirpath, name)).st_size
                files += 1
            except FileNotFoundError:
                continue
    return files, size


def remove_tree(root: Path, written_before: float | None = None) -> tuple[int, int]:
    """Delete ``root`` and everything under it, durably; returns (files, bytes) deleted.

    Bottom-up: the files of a folder are unlinked, the folder removed and its parent fsynced,
    so a crash leaves a smaller tree that a second call finishes (missing entries are fine).
    Symbolic links are removed, never followed.  With ``written_before`` (a POSIX time), files
    modified later are left in place with their folders: they were written after the purge
    began, so they are not part of what it deletes.
    """
    if not root.exists() and not root.is_symlink():
        return 0, 0
    if root.is_symlink() or not root.is_dir():
        stat = root.lstat()
        if written_before is not None and stat.st_mtime > written_before:
            return 0, 0
        root.unlink()
        fsync_directory(root.parent)
        return 1, stat.st_size
    files = size = 0
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        folder = Path(dirpath)
        for name in [*filenames, *(d for d in dirnames if (folder / d).is_symlink())]:
            path = folder / name
            try:
                stat = path.lstat()
                if written_before is not None and stat.st_mtime > written_before:
                    continue
                path.unlink()
            except FileNotFoundError:
                continue
            size += stat.st_size
            files += 1
        try:
            folder.rmdir()
        except FileNotFoundError:
            continue
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            log.warning("%s: left in place, it holds files written after the purge began", folder)
            continue
        fsync_directory(folder.parent)
    return files, size


# --------------------------------------------------------------------------- purging


@dataclass(frozen=True)
class Candidate:
    """An eligible study and what purging it would delete (for the listing and the report)."""

    assessment: Assessment
    instances: int
    #: bytes of the files on disk: instances, results and leftover work copies
    size_bytes: int

    @property
    def study_instance_uid(self) -> str:
        return self.assessment.study_instance_uid


@dataclass(frozen=True)
class PurgedStudy:
    """One study purged: what was deleted (the ``study_purged`` event says the same)."""

    study_instance_uid: str
    reason: str
    age_days: float
    files: int
    size_bytes: int
    instances: int
    jobs: int
    exports: int
    #: finished after an interruption (a crash or an error mid-purge)
    resumed: bool = False


@dataclass
class PurgeReport:
    """What one purge run did."""

    purged: list[PurgedStudy] = field(default_factory=list)
    #: (study uid, why it was left alone this time)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    #: (study uid, error) of purges that failed; they are finished at the next run
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def size_bytes(self) -> int:
        return sum(p.size_bytes for p in self.purged)


@dataclass(frozen=True)
class _Mark:
    study_id: int
    study_instance_uid: str
    time: datetime
    reason: str
    age_days: float


class Purger:
    """Finds and purges the studies the retention policy allows (see the module docstring).

    ``guard`` is the node's :class:`StudyGuard`, or :class:`DatabaseStudyGuard` on PostgreSQL (the
    listener's receives hold it; the default is :func:`study_guard_for` the factory's engine).
    On PostgreSQL one purge runs at a time over all processes (an advisory lock).  ``busy(uid)``
    answers why the rest of the node still needs a study that the database alone cannot tell
    (the assembler holds it for an open association, or has a timer armed), or None.
    ``on_purged`` is called after each study's rows were deleted (the node counts metrics there).
    """

    def __init__(
        self,
        config: NodeConfig,
        factory: sessionmaker[Session],
        guard: StudyGuard | None = None,
        *,
        busy: Callable[[str], str | None] | None = None,
        on_purged: Callable[[PurgedStudy], None] | None = None,
        guard_timeout: float | None = GUARD_TIMEOUT_SECONDS,
    ) -> None:
        self.policy = config.retention
        self.factory = factory
        engine = factory.kw.get("bind")
        #: PostgreSQL: several processes may run purges; an advisory lock lets one at a time
        self._engine: Engine | None = engine if engine is not None and is_postgresql(engine) else None
        self.guard = guard if guard is not None else (
            study_guard_for(engine) if engine is not None else StudyGuard())
        self.busy = busy
        self.on_purged = on_purged
        self.guard_timeout = guard_timeout
        self.data_dir = config.data_dir
        self.layout = config.layout
        self._run_lock = threading.Lock()

    # ------------------------------------------------------------------ what is there
    def _study_paths(self, study_uid: str, job_ids: list[int]) -> list[Path]:
        """The study's folders, instances last (the results name them).  The UID is checked
        against the UID grammar before it becomes a path component."""
        validate_uid("StudyInstanceUID", study_uid)
        return [self.layout.study_results(study_uid), *(self.layout.job_work(i) for i in job_ids),
                self.layout.study_instances(study_uid)]

    def _stray_exports(self, session: Session, study_id: int, study_uid: str) -> list[Path]:
        """Result objects of the study's exports outside its own result folder (normally none);
        only files under ``results/`` are ever considered."""
        paths = []
        results = self.layout.results.resolve()
        inside = results / study_uid
        rows = session.scalars(select(Export.object_path).join(Job).where(Job.study_id == study_id))
        for relative in rows:
            path = (self.data_dir / relative).resolve()
            if path.is_relative_to(results) and not path.is_relative_to(inside):
                paths.append(path)
        return paths

    def assessments(self, now: datetime | None = None) -> list[Assessment]:
        """The policy's verdict on every study that could be old enough, oldest activity first.

        Studies still open (receiving, complete, processing) and studies whose last instance is
        younger than ``delivered_days`` are kept whatever else is true, so the database leaves
        them out and only the others are judged by :func:`assess`.
        """
        now = now or utcnow()
        cutoff = now - timedelta(days=min(self.policy.delivered_days, self.policy.failed_days))
        with session_scope(self.factory) as session:
            studies = session.scalars(
                select(Study).where(Study.state.in_([StudyState.DONE, StudyState.FAILED, StudyState.SKIPPED]),
                                    Study.last_received_at <= cutoff)
                .order_by(Study.last_received_at)
            ).all()
            verdicts = [assess(session, s, self.policy, now) for s in studies]
        return sorted(verdicts, key=lambda a: a.last_activity)

    def candidates(self, now: datetime | None = None) -> list[Candidate]:
        """Studies that may be purged now, with what purging them would delete (read-only)."""
        found = []
        for verdict in self.assessments(now):
            if not verdict.eligible:
                continue
            why = self.busy(verdict.study_instance_uid) if self.busy is not None else None
            if why is not None:
                continue
            with session_scope(self.factory) as session:
                instances = session.scalar(
                    select(func.count()).select_from(Instance).join(Series).where(Series.study_id == verdict.study_id)
                ) or 0
                job_ids = list(session.scalars(select(Job.id).where(Job.study_id == verdict.study_id)))
                stray = self._stray_exports(session, verdict.study_id, verdict.study_instance_uid)
            size = sum(tree_size(p)[1] for p in [*self._study_paths(verdict.study_instance_uid, job_ids), *stray])
            found.append(Candidate(verdict, int(instances), size))
        return found

    def interrupted(self) -> list[_Mark]:
        """Studies whose purge was marked but not finished (nor given up): their ``purge_started_at``."""
        with session_scope(self.factory) as session:
            rows = session.execute(
                select(Study.id, Study.study_instance_uid, Study.purge_started_at, Study.purge_reason,
                       Study.purge_age_days)
                .where(Study.purge_started_at.is_not(None))
                .order_by(Study.purge_started_at, Study.id)
            ).all()
        return [_Mark(r.id, r.study_instance_uid, r.purge_started_at, r.purge_reason or "", r.purge_age_days or 0.0)
                for r in rows]

    # ------------------------------------------------------------------ purging
    def _mark(self, study_uid: str, now: datetime) -> _Mark | str:
        """Step 1: re-check and mark in one transaction; the mark, or why the study is kept."""
        with session_scope(self.factory) as session:
            study = session.scalars(
                select(Study).where(Study.study_instance_uid == study_uid).with_for_update()
            ).first()
            if study is None:
                return "no longer in the database"
            verdict = assess(session, study, self.policy, now)
            if not verdict.eligible:
                if verdict.keep_until is None:
                    return verdict.reason
                return f"{verdict.reason}, kept until {verdict.keep_until:%Y-%m-%d %H:%M} UTC"
            event = add_event(session, EventKind.PURGE_STARTED,
                              f"{verdict.reason}; {verdict.age_days:.2f} days since the last activity "
                              f"({verdict.last_activity:%Y-%m-%d %H:%M:%S} UTC); deleting files, then rows",
                              study_instance_uid=study_uid)
            study.purge_started_at = event.time
            study.purge_reason = verdict.reason[:255]
            study.purge_age_days = verdict.age_days
            return _Mark(study.id, study_uid, event.time, verdict.reason, verdict.age_days)

    def _delete_files(self, mark: _Mark) -> tuple[int, int]:
        """Step 2: the study's folders and stray result objects; (files, bytes)."""
        with session_scope(self.factory) as session:
            job_ids = list(session.scalars(select(Job.id).where(Job.study_id == mark.study_id)))
            stray = self._stray_exports(session, mark.study_id, mark.study_instance_uid)
        files = size = 0
        for path in [*stray, *self._study_paths(mark.study_instance_uid, job_ids)]:
            f, s = remove_tree(path, written_before=mark.time.timestamp())
            files += f
            size += s
        return files, size

    def _delete_rows(self, mark: _Mark, files: int, size: int, resumed: bool) -> PurgedStudy | None:
        """Step 3: the rows and the ``study_purged`` event in one transaction."""
        with session_scope(self.factory) as session:
            study = session.scalars(select(Study).where(Study.id == mark.study_id).with_for_update()).first()
            if study is None or study.study_instance_uid != mark.study_instance_uid:
                add_event(session, EventKind.PURGED,
                          f"{mark.reason}; rows already gone; {files} file(s), {size} bytes deleted",
                          study_instance_uid=mark.study_instance_uid)
                return PurgedStudy(mark.study_instance_uid, mark.reason, mark.age_days, files, size, 0, 0, 0, resumed)
            if study.last_received_at > mark.time:
                forgotten = self._forget_deleted_instances(session, study, mark)
                message = (f"an instance arrived after the purge started ({study.last_received_at:%Y-%m-%d %H:%M:%S} "
                           f"UTC): the study is kept with the instances received since; {forgotten} row(s) of "
                           f"instances whose files were already deleted removed (is the listener holding the "
                           f"study guard?)")
                study.purge_started_at = study.purge_reason = study.purge_age_days = None
                add_event(session, EventKind.PURGE_ABANDONED, message, study_instance_uid=mark.study_instance_uid)
                log.error("study %s: purge abandoned: %s", mark.study_instance_uid, message)
                return None
            job_ids = select(Job.id).where(Job.study_id == study.id)
            series_ids = select(Series.id).where(Series.study_id == study.id)
            instances = session.scalar(
                select(func.count()).select_from(Instance).where(Instance.series_id.in_(series_ids))
            ) or 0
            exports = session.execute(delete(Export).where(Export.job_id.in_(job_ids))).rowcount
            jobs = session.execute(delete(Job).where(Job.study_id == study.id)).rowcount
            session.execute(delete(Instance).where(Instance.series_id.in_(series_ids)))
            series = session.execute(delete(Series).where(Series.study_id == study.id)).rowcount
            session.execute(delete(Study).where(Study.id == study.id))
            add_event(session, EventKind.PURGED,
                      f"{mark.reason}; {mark.age_days:.2f} days since the last activity; {instances} instance(s) in "
                      f"{series} series, {jobs} job(s), {exports} export(s); {files} file(s), {size} bytes deleted"
                      + ("; finished after an interruption" if resumed else ""),
                      study_instance_uid=mark.study_instance_uid)
        purged = PurgedStudy(mark.study_instance_uid, mark.reason, mark.age_days, files, size, int(instances), jobs,
                             exports, resumed)
        log.info("study %s purged (%s, %.1f days): %d instance(s), %d job(s), %d export(s), %d file(s), %.1f MB",
                 mark.study_instance_uid, mark.reason, mark.age_days, purged.instances, jobs, exports, files,
                 size / 1e6)
        if self.on_purged is not None:
            self.on_purged(purged)
        return purged

    def _forget_deleted_instances(self, session: Session, study: Study, mark: _Mark) -> int:
        """In an abandoned purge: delete the rows of instances received before the mark whose
        files are gone, recount their series and drop series left empty, so that no row names
        a deleted file.  The study's next job runs on what is left."""
        root = self.layout.instances.resolve()

        def present(relative: str) -> bool:
            path = (root / relative).resolve()
            return path.is_relative_to(root) and path.is_file()

        rows = session.execute(
            select(Instance.id, Instance.series_id, Instance.path).join(Series)
            .where(Series.study_id == study.id, Instance.received_at <= mark.time)
        ).all()
        gone = [r for r in rows if not present(r.path)]
        for row in gone:
            session.execute(delete(Instance).where(Instance.id == row.id))
        for series_id in {r.series_id for r in gone}:
            left = session.scalar(select(func.count()).select_from(Instance).where(Instance.series_id == series_id))
            if left:
                session.get(Series, series_id).instance_count = int(left)
            else:
                session.execute(delete(Series).where(Series.id == series_id))
        return len(gone)

    def purge_study(self, study_uid: str, now: datetime | None = None) -> PurgedStudy | str:
        """Purge one study if the policy allows it at ``now`` (default: the current time).

        Returns what was purged, or why the study was kept.  Raises :class:`StudyBusyError`
        when receives of the study keep the guard past the timeout, and :class:`OSError` or
        :class:`sqlalchemy.exc.SQLAlchemyError` when deleting failed mid-way (the mark stays;
        :meth:`finish_interrupted` completes the purge).
        """
        now = now or utcnow()
        with self.guard.purging(study_uid, self.guard_timeout):
            why = self.busy(study_uid) if self.busy is not None else None
            if why is not None:
                return why
            mark = self._mark(study_uid, now)
            if isinstance(mark, str):
                return mark
            files, size = self._delete_files(mark)
            purged = self._delete_rows(mark, files, size, resumed=False)
        return purged if purged is not None else "an instance arrived during the purge"

    @contextmanager
    def _one_run(self, wait: bool) -> Iterator[bool]:
        """One purge run at a time: in this process, and on PostgreSQL in every process of the
        database.  Yields False when another process is purging and ``wait`` is false."""
        with self._run_lock:
            if self._engine is None:
                yield True
                return
            with holding(self._engine, RETENTION_RUN_LOCK, None if wait else 0) as ours:
                yield ours

    def finish_interrupted(self, report: PurgeReport | None = None) -> list[PurgedStudy]:
        """Finish every purge that was marked and not completed (see :meth:`_finish_interrupted`);
        waits while another process purges."""
        with self._one_run(wait=True):
            return self._finish_interrupted(report)

    def _finish_interrupted(self, report: PurgeReport | None = None) -> list[PurgedStudy]:
        """Finish every purge that was marked and not completed (run before the listener starts,
        and at the beginning of each purge run); returns the studies finished.

        A study whose files or rows cannot be deleted now is logged (and added to
        ``report.failed``) and keeps its mark, so the next run tries again; the others go on.
        A node still starts then: one old study that cannot be deleted must not stop it from
        receiving, and an instance that arrives for that study meanwhile makes the purge give
        up rather than delete it (``study_purge_abandoned``).
        """
        done: list[PurgedStudy] = []
        for mark in self.interrupted():
            log.warning("study %s: its purge was interrupted (marked %s); finishing it", mark.study_instance_uid,
                        f"{mark.time:%Y-%m-%d %H:%M:%S} UTC")
            try:
                with self.guard.purging(mark.study_instance_uid, self.guard_timeout):
                    files, size = self._delete_files(mark)
                    purged = self._delete_rows(mark, files, size, resumed=True)
            except (OSError, SQLAlchemyError, StudyBusyError) as exc:
                log.error("study %s: finishing the interrupted purge failed (tried again at the next run): %s",
                          mark.study_instance_uid, exc)
                if report is not None:
                    report.failed.append((mark.study_instance_uid, f"{type(exc).__name__}: {exc}"))
                continue
            if purged is not None:
                done.append(purged)
        return done

    def purge(self, now: datetime | None = None) -> PurgeReport:
        """One run: finish interrupted purges, then purge every eligible study.

        One study's failure (a file that cannot be deleted, a database error) is logged and
        reported, and the run goes on with the others.
        """
        report = PurgeReport()
        with self._one_run(wait=False) as ours:
            if not ours:
                log.info("retention: another process is purging now; this run is skipped")
                report.skipped.append(("*", "another process is purging"))
                return report
            report.purged.extend(self._finish_interrupted(report))
            retried = {uid for uid, _ in report.failed}
            for verdict in self.assessments(now):
                uid = verdict.study_instance_uid
                if not verdict.eligible or uid in retried:
                    continue
                try:
                    outcome = self.purge_study(uid, now)
                except (OSError, SQLAlchemyError, StudyBusyError, ValueError) as exc:
                    log.error("study %s: purge failed: %s", uid, exc)
                    report.failed.append((uid, f"{type(exc).__name__}: {exc}"))
                    continue
                if isinstance(outcome, PurgedStudy):
                    report.purged.append(outcome)
                else:
                    report.skipped.append((uid, outcome))
        if report.purged or report.failed:
            log.info("retention: %d study(ies) purged (%.1f MB), %d skipped, %d failed", len(report.purged),
                     report.size_bytes / 1e6, len(report.skipped), len(report.failed))
        return report


# --------------------------------------------------------------------------- the schedule


class RetentionRunner(BackgroundService):
    """Runs :meth:`Purger.purge` in a thread: once ``first_delay_seconds`` after start, then every
    ``interval_minutes``.  A failing run (e.g. a database outage) is logged and the schedule
    goes on.  :meth:`stop` stops after the study being purged (a purge is never cut in the
    middle by this)."""

    stop_timeout = 30.0
    already_started_message = "the retention runner is already started"

    def __init__(self, purger: Purger, interval_minutes: float, first_delay_seconds: float = 0.0) -> None:
        if interval_minutes <= 0:
            raise ValueError(f"interval_minutes must be > 0, got {interval_minutes}")
        super().__init__("orthonode-retention")
        self.purger = purger
        self.interval_seconds = interval_minutes * 60.0
        self.first_delay_seconds = first_delay_seconds
        self.last_report: PurgeReport | None = None

    # ------------------------------------------------------------------ the loop (BackgroundService)
    def _first_wait_seconds(self) -> float:
        return self.first_delay_seconds

    def _pause(self, seconds: float) -> None:
        """The schedule keeps its interval: only :meth:`stop` cuts a wait short, not :meth:`wake`."""
        self._stop.wait(seconds)

    def _tick(self) -> bool:
        self.last_report = self.purger.purge()
        return False  # one run per interval

    def _wait_seconds(self) -> float:
        return self.interval_seconds

    def _tick_failed(self) -> None:  # a database outage must not end the schedule; logged with traceback
        log.exception("retention run failed; trying again in %.0f min", self.interval_seconds / 60)


# --------------------------------------------------------------------------- orthonode purge


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=Path("node.yaml"), metavar="NODE_YAML",
                        help="node configuration (default: ./node.yaml); its retention section sets the ages")
    parser.add_argument("--dry-run", action="store_true",
                        help="list what would be deleted (study, age, size, reason) and delete nothing")


def _table(rows: list[tuple[str, str, float, int]]) -> list[str]:
    lines = [f"{'study':<64}  {'reason':<44} {'age (days)':>10} {'size (MB)':>10}"]
    lines += [f"{uid:<64}  {reason:<44} {age:>10.1f} {size / 1e6:>10.1f}" for uid, reason, age, size in rows]
    return lines


def run(args: argparse.Namespace) -> int:
    """``orthonode purge``: list (``--dry-run``) or delete the studies the retention policy allows."""
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"orthonode purge: {exc}", file=sys.stderr)
        return 2
    policy = config.retention
    if not config.data_dir.is_dir():
        print(f"orthonode purge: data directory {config.data_dir} does not exist; nothing to purge")
        return 0
    if not args.dry_run and not policy.enabled:
        print(f"orthonode purge: retention.enabled is false in {args.config}; set it to true to allow deleting "
              f"studies (or run with --dry-run to see what would be deleted)", file=sys.stderr)
        return 2
    lock = DataDirLock(config.data_dir)
    # On PostgreSQL several node processes share the folder; the database's locks guard each
    # study and let one purge run at a time, so a purge may run beside them.  On SQLite the
    # one node holds the folder's lock.
    if config.database_url.startswith("sqlite") and args.dry_run:
        if lock.locked_by_other():
            print(f"note: a node is serving {config.data_dir} ({lock.holder()}); the list may change while it runs")
    elif config.database_url.startswith("sqlite"):
        try:
            lock.acquire("orthonode purge")
        except DataDirLockedError:
            print(f"orthonode purge: a node is serving {config.data_dir} ({lock.holder()}, lock file {lock.path}); "
                  f"stop it first, or let its scheduled purge (retention.interval_minutes) do this",
                  file=sys.stderr)
            return 1
    logging.getLogger("alembic").setLevel(logging.WARNING)
    engine = None
    try:
        upgrade_database(config.database_url)
        engine = make_engine(config.database_url)
        purger = Purger(config, make_session_factory(engine), guard_timeout=None)
        print(f"retention: delivered studies kept {policy.delivered_days:g} days, failed or unsupported "
              f"{policy.failed_days:g} days after their last activity")
        if args.dry_run:
            marks = purger.interrupted()
            for mark in marks:
                print(f"interrupted purge of {mark.study_instance_uid} (marked {mark.time:%Y-%m-%d %H:%M:%S} UTC) "
                      f"would be finished")
            found = purger.candidates()
            if found:
                print("\n".join(_table([(c.study_instance_uid, c.assessment.reason, c.assessment.age_days,
                                         c.size_bytes) for c in found])))
            print(f"would delete {len(found)} study(ies), {sum(c.size_bytes for c in found) / 1e6:.1f} MB "
                  f"(dry run: nothing deleted)")
            return 0
        report = purger.purge()
        if report.purged:
            print("\n".join(_table([(p.study_instance_uid, p.reason + (" (resumed)" if p.resumed else ""),
                                     p.age_days, p.size_bytes) for p in report.purged])))
        for uid, why in report.skipped:
            print(f"kept {uid}: {why}")
        for uid, error in report.failed:
            print(f"FAILED {uid}: {error}", file=sys.stderr)
        print(f"deleted {len(report.purged)} study(ies), {report.size_bytes / 1e6:.1f} MB"
              + (f"; {len(report.failed)} failed (finished at the next run)" if report.failed else ""))
        return 1 if report.failed else 0
    finally:
        if engine is not None:
            engine.dispose()
        lock.release()
