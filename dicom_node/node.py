"""The node runner: wires listener -> study assembler -> job worker(s) -> exporter, plus HTTP.

::

    PACS --C-STORE--> Listener --(file + row)--> on_instance_stored --> StudyAssembler (timers)
                                                                           |  job row
                                                                           v
    PACS <--C-STORE / STOW-RS-- Exporter <--(export rows)-- Worker (inference.pipeline.run_study)

Each arrow that crosses a thread goes through the database, so the node can be killed at any
point and picks up where it was at the next start (see :mod:`dicom_node.services.jobs` and
:mod:`dicom_node.services.export`).  In memory there are only timers and wake-up events.

A process runs the parts of its roles (:mod:`dicom_node.cluster`: listener, worker, exporter;
all by default).  Start order is data-dir lock (SQLite) -> start-up refusals (a second SQLite
process, a foreign data folder) -> process registration -> unfinished purges -> rows without
files -> exporter -> workers -> assembler -> listener -> HTTP -> scheduled purge: everything that consumes work runs before
anything that produces it, the listener acknowledges instances only once the assembler can hear
about them, a purge a crash interrupted is finished before any instance can arrive for its study
(:mod:`dicom_node.services.retention`), and rows committed just before a crash whose files did not survive
are removed before anything reads them (:meth:`dicom_node.ingest.Listener.check_rows_without_files`).
Stop order is the reverse.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dicom_node.cluster import (
    ProcessRegistry,
    check_data_folder,
    check_roles_for_database,
    check_single_sqlite_process,
    is_postgresql,
    process_id,
)
from dicom_node.config import NodeConfig
from dicom_node.db import make_engine, make_session_factory, upgrade_database
from dicom_node.health import (
    Check,
    DatabaseCollector,
    HealthServer,
    NodeMetrics,
    check_database,
    check_disk,
    check_loop,
)
from dicom_node.layout import DataDirLock, DataLayout
from dicom_node.ingest import AssociationHolds, Listener
from dicom_node.roles import ROLES, describe_roles
from dicom_node.services.assembly import StudyAssembler
from dicom_node.services.export import Exporter
from dicom_node.services.jobs import JobOutcome, SharedModel, Worker
from dicom_node.services.retention import PurgedStudy, Purger, RetentionRunner, study_guard_for
from dicom_node.storage import Storage

log = logging.getLogger(__name__)

#: umask of ``orthonode serve``: files 0640, folders 0750 (patient data stays with the node's group)
PRIVATE_UMASK = 0o027


def _private(path: Path) -> None:
    """Take read/write/search access for other users away from ``path`` (if it exists).

    For what an earlier run, or a laxer umask, left behind: the data folder and the SQLite
    files.  The rest is created under :data:`PRIVATE_UMASK` by ``orthonode serve``.
    """
    if path.exists():
        mode = path.stat().st_mode & 0o7777
        if mode & 0o007:
            path.chmod(mode & ~0o007)


class Node:
    """One running node process.  ``with Node(config) as node: ...`` or ``start()`` / ``stop()``.

    ``roles`` (default ``node.role``, i.e. all) says which parts this process runs
    (:mod:`dicom_node.cluster`): ``listener`` (listener, assembly, retention), ``worker``,
    ``exporter``.  ``preview`` makes the worker also write preview PNGs next to the results
    (the demo).  ``poll_seconds`` bounds how long an idle worker or exporter sleeps between
    database polls.
    """

    def __init__(self, config: NodeConfig, *, preview: bool = False, poll_seconds: float = 1.0,
                 roles: Iterable[str] | None = None) -> None:
        self.config = config
        self.roles = tuple(role for role in ROLES if role in set(roles)) if roles is not None else config.node.roles
        if not self.roles:
            raise ValueError("a node process needs at least one role")
        check_roles_for_database(config.database_url, self.roles)  # before anything is created
        self.poll_seconds = poll_seconds
        self.data_dir = config.data_dir
        self.layout = DataLayout(self.data_dir)
        self.data_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        _private(self.data_dir)
        upgrade_database(config.database_url)
        if config.database_url.startswith("sqlite:///"):
            database = Path(config.database_url.removeprefix("sqlite:///"))
            for path in (database, Path(f"{database}-wal"), Path(f"{database}-shm")):
                _private(path)
        self.engine = make_engine(config.database_url)
        self.factory = make_session_factory(self.engine)
        self.storage = Storage(self.layout.instances, config.storage.min_free_mb)
        self.metrics = NodeMetrics()
        self.metrics.registry.register(DatabaseCollector(self.factory))
        self.metrics.set_process(process_id(), self.roles)
        self.registry = ProcessRegistry(self.factory, self.roles,
                                        device=config.jobs.device if "worker" in self.roles else None)
        self.exporter: Exporter | None = None
        if "exporter" in self.roles:
            self.exporter = Exporter(config, self.factory, poll_seconds=poll_seconds,
                                     on_result=self.metrics.export_finished)
        model = SharedModel.from_config(config)
        self.model = model
        self.workers: list[Worker] = []
        if "worker" in self.roles:
            wake_exporter = self.exporter.wake if self.exporter is not None else None
            self.workers = [
                Worker(config, self.factory, self.storage.resolve, index=i, poll_seconds=poll_seconds,
                       preview=preview, on_finished=self._job_finished, on_exports_queued=wake_exporter, model=model)
                for i in range(config.jobs.workers)
            ]
        #: per-study guard between receives (shared) and the retention purge (exclusive); across
        #: processes on PostgreSQL
        self.study_guard = study_guard_for(self.engine)
        self.assembler: StudyAssembler | None = None
        self.listener: Listener | None = None
        self.purger: Purger | None = None
        #: the scheduled purge; None unless retention.enabled (and this process is a listener)
        self.retention: RetentionRunner | None = None
        if "listener" in self.roles:
            self.assembler = StudyAssembler(config.study_assembly, self.factory, on_job_queued=self._job_queued)
            self.purger = Purger(config, self.factory, self.study_guard, busy=self._assembly_busy,
                                 on_purged=self._study_purged)
            if config.retention.enabled:
                self.retention = RetentionRunner(self.purger, config.retention.interval_minutes)
            self.listener = Listener(config, self.storage, self.factory, on_instance_stored=self._instance_stored,
                                     study_holds=AssociationHolds(self.assembler.hold, self.assembler.release),
                                     study_guard=self.study_guard, check_rows=False)
        #: one node per data folder on SQLite; on PostgreSQL the processes share it
        self._lock: DataDirLock | None = None if is_postgresql(self.engine) else DataDirLock(self.data_dir)
        self.http: HealthServer | None = None
        if config.http.enabled:
            self.http = HealthServer(config.http.bind_address, config.http.port, self._checks(), self._render_metrics,
                                     about=self._about)
        self._started = False
        self._stopped = threading.Event()

    # ------------------------------------------------------------------ callbacks
    def _instance_stored(self, study_uid: str, series_uid: str) -> None:
        self.metrics.instances_received.inc()
        self.assembler.nudge(study_uid, series_uid)

    def _job_queued(self, job_id: int) -> None:
        for worker in self.workers:  # workers of other processes poll the database
            worker.wake()

    def _assembly_busy(self, study_uid: str) -> str | None:
        """Why the assembler still needs ``study_uid`` (for the purge), or None."""
        assert self.assembler is not None
        if self.assembler.held(study_uid):
            return "held by an open association"
        if study_uid in self.assembler.pending():
            return "assembly timer armed"
        return None

    def _study_purged(self, purged: PurgedStudy) -> None:
        self.metrics.study_purged(purged.size_bytes)

    def _job_finished(self, outcome: JobOutcome) -> None:
        self.metrics.job_finished(outcome.state, outcome.outcome, outcome.seconds)

    def _render_metrics(self) -> bytes:
        if self.listener is not None:
            self.metrics.active_associations.set(self.listener.active_associations)
        self.metrics.jobs_held.set(sum(1 for w in self.workers if w.current_job is not None))
        self.metrics.exports_held.set(self.exporter.sending if self.exporter is not None else 0)
        return self.metrics.render()

    def _about(self) -> dict[str, Any]:
        """What ``/healthz`` says of this process besides its checks: its roles and what it holds."""
        holds: dict[str, Any] = {}
        if self.workers:
            holds["jobs"] = [w.current_job for w in self.workers if w.current_job is not None]
            holds["device"] = self.config.jobs.device
        if self.listener is not None:
            holds["associations"] = self.listener.active_associations
            holds["study_timers"] = len(self.assembler.pending()) if self.assembler is not None else 0
        if self.exporter is not None:
            holds["exports_sending"] = self.exporter.sending
        return {"process": process_id(), "roles": list(self.roles), "holds": holds}

    def _checks(self) -> dict[str, Any]:
        idle = max(30.0, 10 * self.poll_seconds)
        listener_, exporter_, assembler_ = self.listener, self.exporter, self.assembler

        def listener() -> Check:
            assert listener_ is not None
            if not listener_.running:
                return Check(False, "the DICOM listener is not running")
            host, port = listener_.address
            return Check(True, f"listening on {host}:{port}, {listener_.active_associations} active association(s)")

        def worker() -> Check:
            checks = [check_loop(w.worker_id, w.alive, w.last_loop_at, w.current_job is not None, idle)
                      for w in self.workers]
            return Check(all(c.ok for c in checks), "; ".join(c.detail for c in checks))

        def exporter() -> Check:
            assert exporter_ is not None
            return check_loop("exporter", exporter_.alive, exporter_.last_loop_at, False, idle)

        def assembler() -> Check:
            assert assembler_ is not None
            return Check(assembler_.running, f"{len(assembler_.pending())} study timer(s) armed"
                         if assembler_.running else "the study assembler is not running")

        checks: dict[str, Any] = {}
        if listener_ is not None:
            checks["listener"] = listener
        checks["database"] = lambda: check_database(self.factory)
        if self.workers:
            checks["worker"] = worker
        if exporter_ is not None:
            checks["exporter"] = exporter
        if assembler_ is not None:
            checks["assembler"] = assembler
        checks["disk"] = lambda: check_disk(self.data_dir, self.config.storage.min_free_mb)
        return checks

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Node:
        if self._started:
            raise RuntimeError("the node is already started")
        self._started = True
        try:
            if self._lock is not None:
                self._lock.acquire()
            # refused before anything is received: a second process on SQLite, a data folder that
            # is not the one the database's processes share
            check_single_sqlite_process(self.engine, self.factory)
            check_data_folder(self.factory, self.data_dir)
            self.registry.start()
            if self.listener is not None:
                assert self.purger is not None
                # a purge cut short by a crash is finished before anything can arrive for its study
                # (one that cannot be finished now is logged and tried again by the next run)
                self.purger.finish_interrupted()
                # rows committed in the last moments before a crash may lack their file: removed
                # before the assembler or a worker can see them
                self.listener.check_rows_without_files()
            if self.exporter is not None:
                self.exporter.start()
            for worker in self.workers:
                worker.start()
            if self.workers and self.config.jobs.preload_model:
                # once the listener has been without an association for a moment: loading
                # competes for the CPU with a PACS sending at start-up (a restart under load)
                listener = self.listener
                self.model.preload(busy=(lambda: listener.active_associations > 0) if listener is not None else None,
                                   stop=self._stopped)
            if self.listener is not None:
                assert self.assembler is not None
                self.assembler.start()
                self.listener.start()
            if self.http is not None:
                self.http.start()
            if self.retention is not None:
                self.retention.start()
        except BaseException:
            self.stop()
            raise
        self.metrics.up.set(1)
        parts = [f"roles {describe_roles(self.roles)}"]
        if self.listener is not None:
            host, port = self.listener.address
            parts.append(f"DICOM {'/'.join(self.config.listener.ae_titles)} on {host}:{port}")
        if self.workers:
            parts.append(f"{len(self.workers)} worker(s) on {self.config.jobs.device}, models: "
                         + ", ".join(f"{key} {path}" for key, path in self.config.model_files().items()))
        log.info("node %s up (process %s): %s; data in %s", self.config.node.name, process_id(), "; ".join(parts),
                 self.data_dir)
        return self

    def stop(self) -> None:
        """Stop in reverse order; a running job is left to be re-queued at the next start."""
        self.metrics.up.set(0)
        if self.retention is not None:
            self.retention.stop()
        if self.http is not None:
            self.http.stop()
        if self.listener is not None:
            self.listener.stop()
        if self.assembler is not None:
            self.assembler.stop()
        for worker in self.workers:
            worker.stop(timeout=5)
        if self.exporter is not None:
            self.exporter.stop()
        self.registry.stop()
        self.engine.dispose()
        if self._lock is not None:
            self._lock.release()
        self._stopped.set()
        log.info("node %s stopped", self.config.node.name)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until :meth:`stop` ran (or ``timeout``); True when stopped."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def http_url(self) -> str | None:
        return f"http://{self.config.http.bind_address}:{self.http.port}" if self.http is not None else None

    @property
    def results_dir(self) -> Path:
        return self.layout.results
