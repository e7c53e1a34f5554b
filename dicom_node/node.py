"""The node runner: wires listener -> study assembler -> job worker(s) -> exporter, plus HTTP.

::

    PACS --C-STORE--> Listener --(file + row)--> on_instance_stored --> StudyAssembler (timers)
                                                                           |  job row
                                                                           v
    PACS <--C-STORE / STOW-RS-- Exporter <--(export rows)-- Worker (inference.pipeline.run_study)

Each arrow that crosses a thread goes through the database, so the node can be killed at any
point and picks up where it was at the next start (see :mod:`dicom_node.jobs` and
:mod:`dicom_node.export`).  In memory there are only timers and wake-up events.

Start order is data-dir lock -> unfinished purges -> rows without files -> exporter -> workers ->
assembler -> listener -> HTTP -> scheduled purge: everything that consumes work runs before
anything that produces it, the listener acknowledges instances only once the assembler can hear
about them, a purge a crash interrupted is finished before any instance can arrive for its study
(:mod:`dicom_node.retention`), and rows committed just before a crash whose files did not survive
are removed before anything reads them (:meth:`dicom_node.listener.Listener.check_rows_without_files`).
Stop order is the reverse.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from dicom_node.assembly import StudyAssembler
from dicom_node.config import NodeConfig
from dicom_node.db import make_engine, make_session_factory, upgrade_database
from dicom_node.export import Exporter
from dicom_node.health import (
    Check,
    DatabaseCollector,
    HealthServer,
    NodeMetrics,
    check_database,
    check_disk,
    check_loop,
)
from dicom_node.jobs import JobOutcome, SharedModel, Worker
from dicom_node.layout import DataDirLock, DataLayout
from dicom_node.listener import AssociationHolds, Listener
from dicom_node.retention import PurgedStudy, Purger, RetentionRunner, StudyGuard
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
    """One running node.  ``with Node(config) as node: ...`` or ``start()`` / ``stop()``.

    ``preview`` makes the worker also write preview PNGs next to the results (the demo).
    ``poll_seconds`` bounds how long an idle worker or exporter sleeps between database polls.
    """

    def __init__(self, config: NodeConfig, *, preview: bool = False, poll_seconds: float = 1.0) -> None:
        self.config = config
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
        self.exporter = Exporter(config, self.factory, poll_seconds=poll_seconds,
                                 on_result=self.metrics.export_finished)
        model = SharedModel.from_config(config)
        self.model = model
        self.workers = [
            Worker(config, self.factory, self.storage.resolve, index=i, poll_seconds=poll_seconds, preview=preview,
                   on_finished=self._job_finished, on_exports_queued=self.exporter.wake, model=model)
            for i in range(config.jobs.workers)
        ]
        self.assembler = StudyAssembler(config.study_assembly, self.factory, on_job_queued=self._job_queued)
        #: per-study guard between receives (shared) and the retention purge (exclusive)
        self.study_guard = StudyGuard()
        self.purger = Purger(config, self.factory, self.study_guard, busy=self._assembly_busy,
                             on_purged=self._study_purged)
        #: the scheduled purge; None unless retention.enabled
        self.retention: RetentionRunner | None = None
        if config.retention.enabled:
            self.retention = RetentionRunner(self.purger, config.retention.interval_minutes)
        self._lock = DataDirLock(self.data_dir)
        self.listener = Listener(config, self.storage, self.factory, on_instance_stored=self._instance_stored,
                                 study_holds=AssociationHolds(self.assembler.hold, self.assembler.release),
                                 study_guard=self.study_guard, check_rows=False)
        self.http: HealthServer | None = None
        if config.http.enabled:
            self.http = HealthServer(config.http.bind_address, config.http.port, self._checks(), self._render_metrics)
        self._started = False
        self._stopped = threading.Event()

    # ------------------------------------------------------------------ callbacks
    def _instance_stored(self, study_uid: str, series_uid: str) -> None:
        self.metrics.instances_received.inc()
        self.assembler.nudge(study_uid, series_uid)

    def _job_queued(self, job_id: int) -> None:
        for worker in self.workers:
            worker.wake()

    def _assembly_busy(self, study_uid: str) -> str | None:
        """Why the assembler still needs ``study_uid`` (for the purge), or None."""
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
        self.metrics.active_associations.set(self.listener.active_associations)
        return self.metrics.render()

    def _checks(self) -> dict[str, Any]:
        idle = max(30.0, 10 * self.poll_seconds)

        def listener() -> Check:
            if not self.listener.running:
                return Check(False, "the DICOM listener is not running")
            host, port = self.listener.address
            return Check(True, f"listening on {host}:{port}, {self.listener.active_associations} active association(s)")

        def worker() -> Check:
            checks = [check_loop(w.worker_id, w.alive, w.last_loop_at, w.current_job is not None, idle)
                      for w in self.workers]
            return Check(all(c.ok for c in checks), "; ".join(c.detail for c in checks))

        def exporter() -> Check:
            return check_loop("exporter", self.exporter.alive, self.exporter.last_loop_at, False, idle)

        def assembler() -> Check:
            return Check(self.assembler.running, f"{len(self.assembler.pending())} study timer(s) armed"
                         if self.assembler.running else "the study assembler is not running")

        return {
            "listener": listener,
            "database": lambda: check_database(self.factory),
            "worker": worker,
            "exporter": exporter,
            "assembler": assembler,
            "disk": lambda: check_disk(self.data_dir, self.config.storage.min_free_mb),
        }

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Node:
        if self._started:
            raise RuntimeError("the node is already started")
        self._started = True
        try:
            self._lock.acquire()
            # a purge cut short by a crash is finished before anything can arrive for its study
            # (one that cannot be finished now is logged and tried again by the next run)
            self.purger.finish_interrupted()
            # rows committed in the last moments before a crash may lack their file: removed
            # before the assembler or a worker can see them
            self.listener.check_rows_without_files()
            self.exporter.start()
            for worker in self.workers:
                worker.start()
            if self.config.jobs.preload_model:
                # once the listener has been without an association for a moment: loading
                # competes for the CPU with a PACS sending at start-up (a restart under load)
                self.model.preload(busy=lambda: self.listener.active_associations > 0, stop=self._stopped)
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
        host, port = self.listener.address
        log.info("node %s up: DICOM %s on %s:%d, data in %s, models: %s", self.config.node.name,
                 "/".join(self.config.listener.ae_titles), host, port, self.data_dir,
                 ", ".join(f"{key} {path}" for key, path in self.config.model_files().items()))
        return self

    def stop(self) -> None:
        """Stop in reverse order; a running job is left to be re-queued at the next start."""
        self.metrics.up.set(0)
        if self.retention is not None:
            self.retention.stop()
        if self.http is not None:
            self.http.stop()
        self.listener.stop()
        self.assembler.stop()
        for worker in self.workers:
            worker.stop(timeout=5)
        self.exporter.stop()
        self.engine.dispose()
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
