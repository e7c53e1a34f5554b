"""The retention purge: finding eligible studies and purging each in three crash-safe steps.

:class:`Purger` marks a study (step 1), deletes its files (step 2) and then its rows with the
``study_purged`` event (step 3); a purge cut short is finished by the next run
(:meth:`Purger.finish_interrupted`).  It holds the study's guard
(:mod:`dicom_node.services.retention.guard`) while it works, and on PostgreSQL one purge runs at a
time over all processes.  The steps and the race are described in ``docs/retention.md``.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import Engine, delete, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.cluster import RETENTION_RUN_LOCK, holding, is_postgresql
from dicom_node.config import NodeConfig
from dicom_node.db import (
    EventKind,
    Export,
    Instance,
    Job,
    Series,
    Study,
    StudyState,
    add_event,
    session_scope,
    utcnow,
)
from dicom_node.services.retention.files import remove_tree, tree_size
from dicom_node.services.retention.guard import StudyBusyError, StudyGuard, study_guard_for
from dicom_node.services.retention.policy import Assessment, assess
from dicom_node.storage import validate_uid

log = logging.getLogger(__name__)

#: how long a scheduled purge waits for a study's receivers before leaving it for the next run
GUARD_TIMEOUT_SECONDS = 30.0


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
