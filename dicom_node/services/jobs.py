"""Jobs: one processing run of a study, queued in the database and run off the listener.

Why one module of about 700 lines: the queue (claim, lease, heartbeat, sweeps), the shared
model and the worker that runs a claimed job are one protocol over the jobs table; split, the
rules of who may finish a job would live in three places.

Life of a job (``dicom_node.db.JobState``)::

    queued --claim--> running --finish--> done | failed
       ^                 |
       +-- requeue ------+   (worker died: stale heartbeat, or found at start-up)
    queued/running --> superseded   (the study changed: a newer job replaces this one)

Why it is safe to kill the node at any moment:

* A job is a row for one exact set of instances (:func:`content_fingerprint`); the study
  assembler queues it in the same transaction that marks the study complete
  (:func:`enqueue_if_changed`).  Nothing lives only in memory.
* The running worker refreshes ``heartbeat_at`` every :data:`HEARTBEAT_SECONDS`.  At start-up,
  running jobs of a dead worker (this host, a pid that no longer runs, or a heartbeat older than
  the lease) go back to ``queued`` and run again from the start; the pipeline is a pure function
  of its inputs, so the re-run writes the same objects with the same UIDs.
* A job is only finished by a conditional update (still ``running``, still ours), and its
  exports are queued in that same transaction.  When a job was re-queued or superseded while a
  worker still ran it, that late worker's results are discarded.  So a study is exported once
  per job that completes, never twice for one job.
* A study whose job keeps killing the node (e.g. out of memory) is not retried forever: after
  :data:`MAX_JOB_ATTEMPTS` interruptions while processing the study the job is marked failed
  (deaths before that, e.g. during the model load, do not count); ``orthonode retry --jobs``
  queues failed jobs again.

The worker runs :func:`inference.pipeline.run_study` on exactly the instance files recorded
when the job was claimed (a :class:`inference.pipeline.StudyFiles` from the database's rows),
so instances that arrive meanwhile neither change the running job nor get lost (they
re-trigger assembly).  A file replaced meanwhile (``duplicate_policy: overwrite``) is read
whole, old or new (files are replaced by rename), and its new content queues the study again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.cluster import pid_alive
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
    session_scope,
    utcnow,
)
from dicom_node.services.base import BackgroundService
from dicom_node.services.export import queue_exports, route_destinations

if TYPE_CHECKING:  # torch and the model stay out of the node's start-up
    from inference.checkpoint import ModelBundle
    from inference.model_set import ModelSet
    from inference.pipeline import StudyFiles, StudyResult

log = logging.getLogger(__name__)

#: how often a running job's heartbeat is refreshed
HEARTBEAT_SECONDS = 5.0
#: a running job whose heartbeat is older than this belongs to a dead worker
LEASE_SECONDS = 60.0
#: interruptions of one job inside its study's processing before it is marked failed
MAX_JOB_ATTEMPTS = 3
#: steps before the study's own data is processed; a worker that dies in one of them (a kill
#: during the model load, say) does not count against the job's attempts
STEPS_BEFORE_THE_STUDY = frozenset({"claimed", "instances", "load model"})


def worker_identity(index: int = 0) -> str:
    """``host:pid:index``: lets a restarted node recognise jobs of its dead predecessor."""
    return f"{socket.gethostname()}:{os.getpid()}:{index}"


def _dead_local_worker(worker_id: str | None, at_startup: bool = True) -> bool:
    """True when ``worker_id`` names a process on this host that no longer runs (or, at
    start-up, is us: a job recorded under our own pid before we started belongs to a previous
    life).  A job without a worker id is dead only at start-up."""
    if not worker_id:
        return at_startup
    parts = worker_id.split(":")
    if len(parts) != 3 or parts[0] != socket.gethostname():
        return False
    try:
        pid = int(parts[1])
    except ValueError:
        return False
    if pid == os.getpid():
        return at_startup
    return not pid_alive(pid)


def content_fingerprint(pairs: Iterable[tuple[str, str]]) -> str:
    """SHA-256 over the sorted ``(SOP Instance UID, file SHA-256)`` pairs of a study.

    Like :func:`dicom_node.db.input_fingerprint` (UIDs only) but it also changes when an
    instance is replaced by different content under the same UID (``duplicate_policy:
    overwrite``), which must re-trigger processing too.
    """
    digest = hashlib.sha256()
    for uid, sha in sorted(set(pairs)):
        digest.update(f"{uid}\x1f{sha}\n".encode("ascii"))
    return digest.hexdigest()


def study_fingerprint(session: Session, study: Study) -> tuple[str, int]:
    """(content fingerprint, instance count) of the instances stored for ``study`` now."""
    rows = session.execute(
        select(Instance.sop_instance_uid, Instance.sha256).join(Series).where(Series.study_id == study.id)
    ).all()
    return content_fingerprint((uid, sha) for uid, sha in rows), len(rows)


def enqueue_if_changed(session: Session, study: Study, reason: str) -> Job | None:
    """Queue a job for ``study`` unless its latest job already covers exactly these instances.

    This is the guard against double firing: a timer that fires twice, a PACS that sends a
    study again, or instances that arrive in pieces after the study was queued all end here,
    and only a changed set of instances gives a new job.  Open (queued or running) jobs of the
    study on another instance set are superseded by the new one.  Runs in the caller's
    transaction.
    """
    fingerprint, count = study_fingerprint(session, study)
    if count == 0:
        log.info("study %s: no instances stored; nothing to queue", study.study_instance_uid)
        return None
    latest = session.scalars(
        select(Job).where(Job.study_id == study.id, Job.state != JobState.SUPERSEDED).order_by(Job.id.desc()).limit(1)
    ).first()
    if latest is not None and latest.input_fingerprint == fingerprint:
        log.info("study %s: %s, but job %d (%s) already covers these %d instances; no new job",
                 study.study_instance_uid, reason, latest.id, latest.state.value, count)
        if study.state is StudyState.RECEIVING:
            # duplicates only (e.g. the PACS sent the study again): back to the job's state
            study.state = _study_state_for(latest)
            study.state_changed_at = utcnow()
        return None
    job = Job(study_id=study.id, state=JobState.QUEUED, attempts=0, input_fingerprint=fingerprint, step="queued")
    session.add(job)
    session.flush()
    for open_job in session.scalars(
        select(Job).where(Job.study_id == study.id, Job.id != job.id,
                          Job.state.in_([JobState.QUEUED, JobState.RUNNING]))
    ):
        open_job.state = JobState.SUPERSEDED
        open_job.error = f"superseded by job {job.id}: the study changed"
        open_job.finished_at = utcnow()
        log.info("study %s: job %d superseded by job %d (the study changed)",
                 study.study_instance_uid, open_job.id, job.id)
    study.state = StudyState.COMPLETE
    study.state_changed_at = utcnow()
    session.add(EventRecord(kind=EventKind.JOB_QUEUED, study_instance_uid=study.study_instance_uid, job_id=job.id,
                            message=f"{reason}; {count} instances"))
    log.info("study %s: %s; job %d queued for %d instances", study.study_instance_uid, reason, job.id, count)
    return job


def _study_state_for(job: Job) -> StudyState:
    return {
        JobState.QUEUED: StudyState.COMPLETE,
        JobState.RUNNING: StudyState.PROCESSING,
        JobState.DONE: StudyState.DONE,
        JobState.FAILED: StudyState.FAILED,
    }.get(job.state, StudyState.COMPLETE)


def retry_failed_jobs(factory: sessionmaker[Session], job_ids: Iterable[int] = ()) -> list[int]:
    """Queue failed jobs again (attempts reset); return the ids re-queued.

    With ``job_ids`` only those (each must exist and be failed); otherwise every failed job
    that is the latest of its study (an older failure was replaced by a newer job).
    """
    wanted = list(job_ids)
    with session_scope(factory) as session:
        if wanted:
            found = {j.id: j for j in session.scalars(select(Job).where(Job.id.in_(wanted)))}
            missing = [i for i in wanted if i not in found]
            if missing:
                raise LookupError(f"no job with id {', '.join(map(str, missing))}")
            not_failed = [f"{i} ({found[i].state.value})" for i in wanted if found[i].state is not JobState.FAILED]
            if not_failed:
                raise ValueError(f"only failed jobs can be retried; not failed: {', '.join(not_failed)}")
            jobs = [found[i] for i in wanted]
        else:
            jobs = []
            for job in session.scalars(select(Job).where(Job.state == JobState.FAILED)):
                newer = session.scalar(select(Job.id).where(Job.study_id == job.study_id, Job.id > job.id).limit(1))
                if newer is None:
                    jobs.append(job)
        for job in jobs:
            job.state = JobState.QUEUED
            job.attempts = 0
            job.error = None
            job.finished_at = None
            job.step = "queued"
            job.study.state = StudyState.COMPLETE
            job.study.state_changed_at = utcnow()
            session.add(EventRecord(kind=EventKind.JOB_REQUEUED, study_instance_uid=job.study.study_instance_uid,
                                    job_id=job.id, message="failed job queued again by the operator"))
        return [job.id for job in jobs]


@dataclass(frozen=True)
class ClaimedJob:
    """What a worker needs to run a job, read in the claiming transaction."""

    job_id: int
    study_id: int
    study_instance_uid: str
    calling_ae_title: str | None
    attempt: int
    #: instance file paths relative to the storage root, sorted
    instance_paths: tuple[str, ...]
    fingerprint: str


class JobQueue:
    """The database side of jobs: claim, heartbeat, finish, requeue."""

    def __init__(self, factory: sessionmaker[Session], worker_id: str, lease_seconds: float = LEASE_SECONDS,
                 max_attempts: int = MAX_JOB_ATTEMPTS) -> None:
        if lease_seconds < 3 * HEARTBEAT_SECONDS:
            raise ValueError(f"lease_seconds={lease_seconds} must be at least 3 heartbeats "
                             f"({3 * HEARTBEAT_SECONDS:g} s): a busy worker would be taken for dead")
        self.factory = factory
        self.worker_id = worker_id
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts

    def requeue_abandoned(self, at_startup: bool = False) -> list[int]:
        """Running jobs of dead workers go back to ``queued`` (or ``failed`` after too many starts).

        A job of another process on this host whose pid is gone is dead at once (and at
        start-up one recorded under this process's own pid: a previous life); otherwise a job
        is dead when its heartbeat is older than the lease (a worker on another host).  On
        PostgreSQL several workers sweep: each job is handled by one of them (``SKIP LOCKED``).
        Returns the ids handled.
        """
        limit = utcnow() - timedelta(seconds=self.lease_seconds)
        handled = []
        with session_scope(self.factory) as session:
            query = select(Job).where(Job.state == JobState.RUNNING)
            if session.get_bind().dialect.name == "postgresql":
                query = query.with_for_update(skip_locked=True)
            for job in session.scalars(query):
                stale = job.heartbeat_at is None or job.heartbeat_at < limit
                if not (stale or _dead_local_worker(job.worker_id, at_startup)):
                    continue
                study = job.study
                if job.step in STEPS_BEFORE_THE_STUDY:
                    # died before the study itself was touched (e.g. while loading the model):
                    # no evidence against this study, so the start does not count
                    job.attempts = max(job.attempts - 1, 0)
                if job.attempts >= self.max_attempts:
                    job.state = JobState.FAILED
                    job.finished_at = utcnow()
                    job.error = f"interrupted {job.attempts} times (last in step {job.step!r}); not started again"
                    study.state = StudyState.FAILED
                    kind, verb = EventKind.JOB_FAILED, "failed after repeated interruptions"
                else:
                    job.state = JobState.QUEUED
                    study.state = StudyState.COMPLETE
                    kind, verb = EventKind.JOB_REQUEUED, "queued again"
                study.state_changed_at = utcnow()
                message = (f"job {job.id} of worker {job.worker_id} was interrupted in step {job.step!r} "
                           f"(attempt {job.attempts}); {verb}")
                log.warning("study %s: %s", study.study_instance_uid, message)
                session.add(EventRecord(kind=kind, study_instance_uid=study.study_instance_uid, job_id=job.id,
                                        message=message))
                handled.append(job.id)
        return handled

    def claim(self) -> ClaimedJob | None:
        """Take the oldest queued job: mark it running under this worker and record the instances it covers."""
        with session_scope(self.factory) as session:
            query = select(Job).where(Job.state == JobState.QUEUED).order_by(Job.created_at, Job.id).limit(1)
            if session.get_bind().dialect.name == "postgresql":
                query = query.with_for_update(skip_locked=True)
            job = session.scalars(query).first()
            if job is None:
                return None
            study = job.study
            rows = session.execute(
                select(Instance.sop_instance_uid, Instance.path, Instance.sha256).join(Series)
                .where(Series.study_id == study.id)
            ).all()
            fingerprint = content_fingerprint((uid, sha) for uid, _, sha in rows)
            now = utcnow()
            job.state = JobState.RUNNING
            job.worker_id = self.worker_id
            job.attempts += 1
            job.started_at = now
            job.heartbeat_at = now
            job.finished_at = None
            job.step = "claimed"
            if fingerprint != job.input_fingerprint:
                # instances arrived after queueing: this run covers them, so record what it covers
                job.input_fingerprint = fingerprint
            study.state = StudyState.PROCESSING
            study.state_changed_at = now
            session.add(EventRecord(kind=EventKind.JOB_STARTED, study_instance_uid=study.study_instance_uid,
                                    job_id=job.id,
                                    message=f"worker {self.worker_id}, attempt {job.attempts}, {len(rows)} instances"))
            return ClaimedJob(job.id, study.id, study.study_instance_uid, study.calling_ae_title, job.attempts,
                              tuple(sorted(path for _, path, _ in rows)), fingerprint)

    def heartbeat(self, job_id: int, step: str | None = None) -> bool:
        """Refresh the job's heartbeat (and step); False when the job is no longer ours."""
        values: dict[str, Any] = {"heartbeat_at": utcnow()}
        if step is not None:
            values["step"] = step
        with session_scope(self.factory) as session:
            result = session.execute(
                update(Job).where(Job.id == job_id, Job.state == JobState.RUNNING, Job.worker_id == self.worker_id)
                .values(**values)
            )
            return bool(result.rowcount)

    def owned(self, session: Session, job_id: int) -> Job | None:
        """The job if it is still running under this worker (inside ``session``), else None."""
        job = session.get(Job, job_id)
        if job is None or job.state is not JobState.RUNNING or job.worker_id != self.worker_id:
            return None
        return job


# --------------------------------------------------------------------------- the worker


@dataclass
class JobOutcome:
    """What the worker reports per finished job (for metrics and tests)."""

    job_id: int
    study_instance_uid: str
    state: str  # done | failed | discarded
    outcome: str  # complete | partial | unsupported | error | superseded
    seconds: float


class SharedModel:
    """The node's models (``model.checkpoint``, or ``model.checkpoints`` one per joint), loaded
    once on first use as one :class:`inference.model_set.ModelSet` and shared by the workers of
    a node (one copy in memory, on the GPU too; identical backbones once across joints)."""

    def __init__(self, files: Path | Mapping[str, Path], torch_threads: int | None = None) -> None:
        #: the per-joint files; a single path is the one model, for whichever joint its card names
        self.files: dict[str, Path] | None = None if isinstance(files, (str, Path)) else dict(files)
        self.path: Path | None = Path(files) if isinstance(files, (str, Path)) else None
        self.torch_threads = torch_threads
        self._bundle: ModelSet | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: NodeConfig) -> SharedModel:
        return cls(config.checkpoints or config.checkpoint, config.jobs.torch_threads)

    @property
    def loaded(self) -> bool:
        return self._bundle is not None

    def preload(
        self, busy: Callable[[], bool] | None = None, quiet_seconds: float = 2.0, poll_seconds: float = 0.25,
        stop: threading.Event | None = None,
    ) -> threading.Thread:
        """Load the model in a background thread (node start-up), not at the first study.

        Loading imports torch and MONAI and reads the checkpoint: seconds of CPU under the GIL
        that would slow the C-STORE handlers.  With ``busy`` (e.g. "an association is open"),
        the load waits until ``busy()`` has been false for ``quiet_seconds``, so a PACS sending
        at start-up is served first.  A job that starts before then loads the model itself
        (:meth:`get`); ``stop`` ends the wait at shutdown.

        A failure is logged here and raised again by the first job's :meth:`get`, which records
        it on that job; the node keeps receiving meanwhile."""
        stopping = stop or threading.Event()

        def load() -> None:
            if busy is not None:
                quiet_since = time.monotonic()
                while not self.loaded and time.monotonic() - quiet_since < quiet_seconds:
                    if stopping.wait(poll_seconds):
                        return
                    if busy():
                        quiet_since = time.monotonic()
            try:
                self.get()
            except Exception as exc:  # noqa: BLE001 - reported again, per job, by get()
                log.error("the model could not be loaded at start-up: %s", exc)

        thread = threading.Thread(target=load, name="orthonode-model-preload", daemon=True)
        thread.start()
        return thread

    def get(self) -> ModelSet:
        """The :class:`inference.model_set.ModelSet`, loaded at the first call."""
        with self._lock:
            if self._bundle is None:
                from inference.checkpoint import ModelBundle
                from inference.model_set import ModelSet

                if self.path is not None and not self.path.is_file():
                    raise FileNotFoundError(f"model.checkpoint {self.path} does not exist (node.yaml "
                                            f"model.checkpoint); `orthonode train demo` builds the demo model")
                if self.torch_threads is not None:
                    import torch

                    torch.set_num_threads(self.torch_threads)
                if self.path is not None:
                    models = ModelSet.single(ModelBundle.load(self.path))
                else:
                    models = ModelSet.load(self.files or {})
                for joint, bundle in models:
                    log.info("model for the %s: %s %s loaded", joint, bundle.card.name, bundle.card.version)
                for joint, name, first_joint, first_name in models.shared:
                    log.info("model for the %s: backbone %s shared with the %s model's %s", joint, name, first_joint,
                             first_name)
                self._bundle = models
            return self._bundle


class Worker(BackgroundService):
    """Runs queued jobs one at a time in a thread: instances -> pipeline -> results -> exports.

    ``resolve_instance(path)`` maps an instance path relative to the storage root to a file
    (:meth:`dicom_node.storage.Storage.resolve`).  ``bundle`` is an already loaded
    :class:`inference.checkpoint.ModelBundle`; without it the worker takes the model from
    ``model`` (a :class:`SharedModel`, by default one of its own) when its first job starts.

    :meth:`stop` stops after the current job (a job cut short is re-queued at the next start).
    """

    stop_timeout = 60.0
    already_started_message = "worker already started"

    def __init__(
        self,
        config: NodeConfig,
        factory: sessionmaker[Session],
        resolve_instance: Callable[[str], Path],
        *,
        index: int = 0,
        poll_seconds: float = 1.0,
        preview: bool = False,
        on_finished: Callable[[JobOutcome], None] | None = None,
        on_exports_queued: Callable[[], None] | None = None,
        bundle: ModelBundle | ModelSet | None = None,
        model: SharedModel | None = None,
    ) -> None:
        self.config = config
        #: where the model comes from when ``bundle`` is not given (a node shares one between workers)
        self.model = model if model is not None else SharedModel.from_config(config)
        self.factory = factory
        self.resolve_instance = resolve_instance
        self.worker_id = worker_identity(index)
        super().__init__(f"orthonode-worker-{self.worker_id}")
        self.queue = JobQueue(factory, self.worker_id, config.jobs.lease_seconds, config.jobs.max_attempts)
        self.poll_seconds = poll_seconds
        self.preview = preview
        self.on_finished = on_finished
        self.on_exports_queued = on_exports_queued
        #: the model; loaded from ``model.checkpoint`` at the first job unless given
        self._bundle: ModelBundle | ModelSet | None = bundle
        self.current_job: int | None = None
        self._last_sweep = 0.0

    # ------------------------------------------------------------------ the loop (BackgroundService)
    def _starting(self) -> None:
        self.queue.requeue_abandoned(at_startup=True)
        self._last_sweep = 0.0

    def _tick(self) -> bool:
        """Sweep for abandoned jobs (every ``HEARTBEAT_SECONDS``), then run one claimed job;
        True when a job ran (the next is claimed without waiting)."""
        if time.monotonic() - self._last_sweep > HEARTBEAT_SECONDS:
            self.queue.requeue_abandoned()
            self._last_sweep = time.monotonic()
        claimed = self.queue.claim()
        if claimed is None:
            return False
        self.run_job(claimed)
        return True

    def _wait_seconds(self) -> float:
        return self.poll_seconds

    def _tick_failed(self) -> None:  # a database outage must not end the worker; logged with traceback
        log.exception("worker %s: loop failed; retrying in %.0f s", self.worker_id, self.poll_seconds)

    # ------------------------------------------------------------------ one job
    def bundle(self) -> ModelBundle | ModelSet:
        """The model, loaded when the first job needs it (given, shared, or from the checkpoint)."""
        if self._bundle is None:
            self._bundle = self.model.get()
        return self._bundle

    def _inputs(self, claimed: ClaimedJob) -> StudyFiles:
        """Exactly the job's instance files, as the database recorded them at the claim; raises
        :class:`FileNotFoundError` naming a file that is gone."""
        from inference.pipeline import StudyFiles

        return StudyFiles(self.resolve_instance(claimed.study_instance_uid),
                          tuple(self.resolve_instance(relative) for relative in claimed.instance_paths))

    def run_job(self, claimed: ClaimedJob) -> JobOutcome:
        """Run one claimed job to its end and record the outcome; never raises for a job error."""
        started = time.monotonic()
        self.current_job = claimed.job_id
        stop_beat = threading.Event()
        beat = threading.Thread(target=self._beat, args=(claimed.job_id, stop_beat), daemon=True,
                                name=f"orthonode-heartbeat-{claimed.job_id}")
        beat.start()
        study_uid = claimed.study_instance_uid
        out_dir = self.config.layout.job_results(study_uid, claimed.job_id)
        try:
            log.info("study %s: job %d started (attempt %d, %d instances)", study_uid, claimed.job_id, claimed.attempt,
                     len(claimed.instance_paths))
            self.queue.heartbeat(claimed.job_id, step="instances")
            inputs = self._inputs(claimed)
            self.queue.heartbeat(claimed.job_id, step="load model")
            bundle = self.bundle()
            self.queue.heartbeat(claimed.job_id, step="inference")
            if out_dir.exists():
                shutil.rmtree(out_dir)  # a previous, interrupted attempt of this job
            result = self._run_pipeline(inputs, bundle, out_dir, self._delivered_report(claimed))
            outcome = self._finish_ok(claimed, result, out_dir, time.monotonic() - started)
        except Exception as exc:  # any failure of the job is recorded on the job, with its traceback in the log
            log.exception("study %s: job %d failed", study_uid, claimed.job_id)
            outcome = self._finish_failed(claimed, exc, time.monotonic() - started)
        finally:
            stop_beat.set()
            beat.join(5)
            self.current_job = None
        if self.on_finished is not None:
            self.on_finished(outcome)
        return outcome

    def _beat(self, job_id: int, stop: threading.Event) -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            try:
                if not self.queue.heartbeat(job_id):
                    log.info("job %d is no longer ours (superseded or re-queued); its results will be discarded",
                             job_id)
                    return
            except Exception:  # a missed heartbeat is not fatal; the lease allows several
                log.exception("heartbeat of job %d failed", job_id)

    def _delivered_report(self, claimed: ClaimedJob) -> list[Path]:
        """The newest SR of an earlier job of the study that reached a destination: the PACS
        holds it, so the new report names it as the version it replaces.  Empty when none was
        delivered or its file is gone."""
        with session_scope(self.factory) as session:
            relative = session.scalars(
                select(Export.object_path)
                .join(Job, Export.job_id == Job.id)
                .where(Job.study_id == claimed.study_id, Job.id < claimed.job_id, Export.object_kind == "sr",
                       Export.state == ExportState.DONE)
                .order_by(Export.job_id.desc())
                .limit(1)
            ).first()
        if relative is None:
            return []
        path = self.config.data_dir / relative
        if not path.is_file():
            log.warning("study %s: the delivered report %s is gone; the new report cannot name it as replaced",
                        claimed.study_instance_uid, relative)
            return []
        return [path]

    def _run_pipeline(self, inputs: StudyFiles, bundle: ModelBundle | ModelSet, out_dir: Path,
                      previous_reports: list[Path]) -> StudyResult:
        from inference.pipeline import run_study
        from inference.uids import NodeInfo, default_node_info

        base = default_node_info()
        node_info = NodeInfo(
            software_version=base.software_version,
            station_name=self.config.node.name[:16] or None,
            institution_name=self.config.node.institution or None,
        )
        return run_study(
            inputs, bundle, out_dir,
            rules=self.config.series_selection, joint_rules=self.config.joints,
            node_info=node_info, preview=self.preview, device=self.config.jobs.device,
            previous_reports=previous_reports,
        )

    def _summary(self, result: StudyResult, out_dir: Path) -> dict[str, Any]:
        data_dir = self.config.data_dir
        return {
            "outcome": result.outcome.value,
            "reason": result.reason,
            "joint": result.joint,
            "chosen": {plane: {"series_instance_uid": c.series_instance_uid, "series_number": c.series_number,
                               "description": c.description, "slices": c.num_slices}
                       for plane, c in result.chosen.items()},
            "missing_planes": list(result.missing_planes),
            "findings": [f.text() for f in result.findings],
            "files": [str(p.relative_to(data_dir)) for p in result.files],
            "previews": [str(p) for p in result.previews],
            "timings": {k: round(float(v), 3) for k, v in result.timings.items()},
            "device": result.device,
            "model": result.model,
            "log": list(result.log)[-200:],
            "out_dir": str(out_dir),
        }

    def _finish_ok(self, claimed: ClaimedJob, result: StudyResult, out_dir: Path, seconds: float) -> JobOutcome:
        study_uid = claimed.study_instance_uid
        summary = self._summary(result, out_dir)
        # what was written, as the pipeline wrote it: the files are not read again
        objects = [(str(o.path.relative_to(self.config.data_dir)), o.kind, o.sop_instance_uid) for o in result.outputs]
        for line in result.log:
            log.info("study %s: job %d: %s", study_uid, claimed.job_id, line)
        (out_dir / "result.json").parent.mkdir(parents=True, exist_ok=True)
        (out_dir / "result.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
        with session_scope(self.factory) as session:
            job = self.queue.owned(session, claimed.job_id)
            if job is None:
                log.info("study %s: job %d was superseded or re-queued while it ran; its results are discarded",
                         study_uid, claimed.job_id)
                return JobOutcome(claimed.job_id, study_uid, "discarded", "superseded", seconds)
            study = job.study
            now = utcnow()
            job.state = JobState.DONE
            job.finished_at = now
            job.step = "done"
            job.error = None
            job.result_summary = summary
            study.state = StudyState.DONE if result.supported else StudyState.SKIPPED
            study.state_changed_at = now
            destinations: tuple[str, ...] = ()
            if result.supported and objects:
                destinations = route_destinations(self.config.export.routes, claimed.calling_ae_title, result.joint)
                if destinations:
                    queue_exports(session, job, objects, destinations)
                else:
                    log.warning("study %s: no export route matches (calling AE %s, joint %s); results kept in %s",
                                study_uid, claimed.calling_ae_title, result.joint, out_dir)
            self._supersede_older(session, job)
            session.add(EventRecord(
                kind=EventKind.JOB_DONE, study_instance_uid=study_uid, job_id=job.id,
                message=f"{result.outcome.value}: {result.reason}; {len(objects)} object(s) to "
                        f"{', '.join(destinations) or 'no destination'} in {seconds:.1f} s",
            ))
        log.info("study %s: job %d done in %.1f s: %s: %s; %d object(s) queued for %s", study_uid, claimed.job_id,
                 seconds, result.outcome.value, result.reason, len(objects) * len(destinations),
                 ", ".join(destinations) or "no destination")
        if destinations and self.on_exports_queued is not None:
            self.on_exports_queued()
        return JobOutcome(claimed.job_id, study_uid, "done", result.outcome.value, seconds)

    @staticmethod
    def _supersede_older(session: Session, job: Job) -> None:
        """Earlier finished jobs of the study are replaced by ``job``; their unsent exports are
        withdrawn so old results never reach a PACS after new ones."""
        older = session.scalars(
            select(Job).where(Job.study_id == job.study_id, Job.id < job.id,
                              Job.state.in_([JobState.DONE, JobState.FAILED]))
        ).all()
        for old in older:
            old.state = JobState.SUPERSEDED
            for export in old.exports:
                if export.state in (ExportState.PENDING, ExportState.FAILED):
                    export.state = ExportState.FAILED
                    export.next_attempt_at = None
                    export.last_error = f"withdrawn: job {old.id} was superseded by job {job.id}"

    def _finish_failed(self, claimed: ClaimedJob, exc: BaseException, seconds: float) -> JobOutcome:
        study_uid = claimed.study_instance_uid
        with session_scope(self.factory) as session:
            job = self.queue.owned(session, claimed.job_id)
            if job is None:
                return JobOutcome(claimed.job_id, study_uid, "discarded", "superseded", seconds)
            job.state = JobState.FAILED
            job.finished_at = utcnow()
            job.error = f"{type(exc).__name__}: {exc}"
            job.study.state = StudyState.FAILED
            job.study.state_changed_at = utcnow()
            session.add(EventRecord(kind=EventKind.JOB_FAILED, study_instance_uid=study_uid, job_id=job.id,
                                    message=f"in step {job.step!r}: {type(exc).__name__}: {exc}"))
        return JobOutcome(claimed.job_id, study_uid, "failed", "error", seconds)
