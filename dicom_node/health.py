"""Operating the node: ``/healthz`` and ``/metrics`` on a loopback HTTP port.

``/healthz`` answers 200 with a JSON body when every check passes and 503 otherwise; each check
(listener, database, worker, exporter, disk) says what it saw, so a monitoring system or an
administrator reading ``curl`` output knows which part is down.

``/metrics`` is the Prometheus text format (``prometheus_client``).  Two kinds of metrics:

* counted in the process (reset at restart, as Prometheus counters are expected to be):
  instances received, job and export durations and outcomes, active associations, studies
  and bytes deleted by the retention policy;
* read from the database at scrape time (:class:`DatabaseCollector`), so they survive a
  restart and agree with ``orthonode status``: rejections and refusals by reason (from the
  audit trail: refused instances, and associations rejected at negotiation for an unknown
  called or calling AE title, a host not allowed, or too many associations), studies, jobs
  and exports per state, and the queue depths.

Each node has its own :class:`prometheus_client.CollectorRegistry`, so several nodes (tests)
can live in one process.
"""
from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db import (
    EventKind,
    EventRecord,
    Export,
    ExportState,
    Instance,
    Job,
    JobState,
    Study,
    StudyState,
    session_scope,
)

log = logging.getLogger(__name__)
# No ``*_created`` timestamp series next to every counter: they double the output and no
# dashboard of ours reads them.
disable_created_metrics()

#: audit-trail event kinds that record a refused or dropped input (the listener's kinds, plus
#: any kind that says so in its name), reported as ``orthonode_rejections_total{reason=kind}``
REJECTION_EVENT_KINDS = frozenset({EventKind.DUPLICATE_REFUSED, EventKind.DUPLICATE_KEPT_FIRST,
                                   EventKind.SERIES_IN_OTHER_STUDY})
#: the events of an association rejected at negotiation (``association_rejected_<reason>``, see
#: :data:`dicom_node.db.ASSOCIATION_REJECTED_PREFIX`) count by the word "rejected"
#: (e.g. ``orthonode_rejections_total{reason="association_rejected_host"}``)
_REJECTION_WORDS = ("rejected", "refused", "ignored")

_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class NodeMetrics:
    """The in-process metrics of one node, in its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.instances_received = Counter(
            "orthonode_instances_received", "Instances stored by the listener since the node started",
            registry=self.registry,
        )
        self.job_seconds = Histogram(
            "orthonode_job_duration_seconds", "Wall time of finished jobs", ["state", "outcome"],
            buckets=_DURATION_BUCKETS, registry=self.registry,
        )
        self.export_seconds = Histogram(
            "orthonode_export_duration_seconds", "Time to send one result object", ["destination", "result"],
            buckets=_DURATION_BUCKETS, registry=self.registry,
        )
        self.exports_sent = Counter(
            "orthonode_export_attempts", "Export attempts by destination, object kind and result",
            ["destination", "kind", "result"], registry=self.registry,
        )
        self.active_associations = Gauge(
            "orthonode_active_associations", "DICOM associations open on the listener", registry=self.registry
        )
        self.up = Gauge("orthonode_up", "1 while the node is serving", registry=self.registry)
        self.process_roles = Gauge(
            "orthonode_process_role", "1 for each role this process runs (listener, worker, exporter)",
            ["process", "role"], registry=self.registry,
        )
        self.jobs_held = Gauge(
            "orthonode_jobs_held", "Jobs this process's workers are running now", registry=self.registry
        )
        self.exports_held = Gauge(
            "orthonode_exports_held", "Exports this process's exporter is sending now", registry=self.registry
        )
        self.purged_studies = Counter(
            "orthonode_purged_studies", "Studies deleted by the retention policy since the node started",
            registry=self.registry,
        )
        self.purged_bytes = Counter(
            "orthonode_purged_bytes", "Bytes of instance, result and work files deleted by the retention policy "
            "since the node started", registry=self.registry,
        )

    def set_process(self, process: str, roles: tuple[str, ...]) -> None:
        """Say which process this is and what it runs (``host:pid``, its roles)."""
        for role in roles:
            self.process_roles.labels(process=process, role=role).set(1)

    def job_finished(self, state: str, outcome: str, seconds: float) -> None:
        self.job_seconds.labels(state=state, outcome=outcome).observe(seconds)

    def export_finished(self, destination: str, kind: str, ok: bool, seconds: float) -> None:
        result = "ok" if ok else "error"
        self.export_seconds.labels(destination=destination, result=result).observe(seconds)
        self.exports_sent.labels(destination=destination, kind=kind, result=result).inc()

    def study_purged(self, size_bytes: int) -> None:
        self.purged_studies.inc()
        self.purged_bytes.inc(size_bytes)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class DatabaseCollector(Collector):
    """Metrics read from the database at each scrape (restart-proof, agree with ``status``)."""

    def __init__(self, factory: sessionmaker[Session]) -> None:
        self.factory = factory

    def describe(self) -> list[Any]:
        return []  # collected lazily; describing would query the database at registration

    def collect(self) -> Iterator[Any]:
        with session_scope(self.factory) as session:
            studies = dict(session.execute(select(Study.state, func.count()).group_by(Study.state)).all())
            jobs = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
            exports = dict(session.execute(select(Export.state, func.count()).group_by(Export.state)).all())
            instances = session.scalar(select(func.count()).select_from(Instance)) or 0
            events = session.execute(select(EventRecord.kind, func.count()).group_by(EventRecord.kind)).all()
        for name, enum_cls, counts, help_text in (
            ("orthonode_studies", StudyState, studies, "Studies by state"),
            ("orthonode_jobs", JobState, jobs, "Jobs by state"),
            ("orthonode_exports", ExportState, exports, "Exports by state"),
        ):
            family = GaugeMetricFamily(name, help_text, labels=["state"])
            for state in enum_cls:
                family.add_metric([state.value], float(counts.get(state, 0)))
            yield family
        queue = GaugeMetricFamily("orthonode_queue_depth", "Work waiting: queued jobs, pending exports",
                                  labels=["queue"])
        queue.add_metric(["jobs"], float(jobs.get(JobState.QUEUED, 0)))
        queue.add_metric(["exports"], float(exports.get(ExportState.PENDING, 0) + exports.get(ExportState.SENDING, 0)))
        yield queue
        yield GaugeMetricFamily("orthonode_instances_stored", "Instances in the database", value=float(instances))
        rejections = CounterMetricFamily(
            "orthonode_rejections", "Inputs refused or dropped, by reason (audit trail)", labels=["reason"]
        )
        recorded = CounterMetricFamily("orthonode_events", "Audit-trail events by kind", labels=["kind"])
        for kind, count in events:
            recorded.add_metric([kind], float(count))
            if kind in REJECTION_EVENT_KINDS or any(word in kind for word in _REJECTION_WORDS):
                rejections.add_metric([kind], float(count))
        yield rejections
        yield recorded


# --------------------------------------------------------------------------- health checks


@dataclass(frozen=True)
class Check:
    ok: bool
    detail: str


def answers_healthy(http_port: int, host: str = "127.0.0.1", timeout: float = 2.0) -> bool:
    """True when a node's ``/healthz`` at ``host:http_port`` answers 200 (for scripts that start
    ``orthonode serve`` and wait for it); False when it is unreachable or unhealthy (503)."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{host}:{http_port}/healthz", timeout=timeout) as response:
            return response.status == 200
    except OSError:  # refused, timed out, or an HTTP error status (HTTPError is an OSError)
        return False


def check_database(factory: sessionmaker[Session]) -> Check:
    started = time.monotonic()
    try:
        with session_scope(factory) as session:
            session.execute(text("SELECT 1"))
    except Exception as exc:  # reported in the health answer, which is what the check is for
        return Check(False, f"{type(exc).__name__}: {exc}")
    return Check(True, f"SELECT 1 in {1000 * (time.monotonic() - started):.0f} ms")


def check_disk(path: Path, min_free_mb: int) -> Check:
    try:
        usage = shutil.disk_usage(path)
    except OSError as exc:
        return Check(False, f"{path}: {exc}")
    free_mb = usage.free // (1024 * 1024)
    if free_mb < min_free_mb:
        return Check(False, f"{free_mb} MB free on {path}, below storage.min_free_mb {min_free_mb}")
    return Check(True, f"{free_mb} MB free on {path} (reserve {min_free_mb} MB)")


def check_loop(name: str, alive: bool, last_loop_at: float | None, busy: bool, max_idle_seconds: float) -> Check:
    """A worker-style thread: running, and its loop turned recently (unless it is busy on a job)."""
    if not alive:
        return Check(False, f"{name} thread is not running")
    if busy:
        return Check(True, f"{name} busy")
    if last_loop_at is None or time.monotonic() - last_loop_at > max_idle_seconds:
        return Check(False, f"{name} loop has not run for more than {max_idle_seconds:.0f} s")
    return Check(True, f"{name} alive")


class HealthServer:
    """``/healthz`` and ``/metrics`` over HTTP in a background thread.

    ``checks`` maps a name to a function returning a :class:`Check`; all run on each request.
    ``about()`` adds what the process says of itself to ``/healthz`` (its roles, what it holds).
    """

    def __init__(self, bind_address: str, port: int, checks: dict[str, Callable[[], Check]],
                 render_metrics: Callable[[], bytes], about: Callable[[], dict[str, Any]] | None = None) -> None:
        self.checks = checks
        self.render_metrics = render_metrics
        self.about = about
        server = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "orthonode"

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = self.path.split("?", 1)[0]
                if path == "/healthz":
                    status, body, ctype = server.healthz()
                elif path == "/metrics":
                    try:
                        status, body, ctype = 200, server.render_metrics(), CONTENT_TYPE_LATEST
                    except Exception as exc:  # a scrape during a database outage says so
                        log.exception("/metrics failed")
                        status, body, ctype = 500, f"metrics unavailable: {exc}\n".encode(), "text/plain"
                else:
                    status, body, ctype = 404, b"not found: try /healthz or /metrics\n", "text/plain"
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
                log.debug("http %s: " + format, self.address_string(), *args)

        self._httpd = ThreadingHTTPServer((bind_address, port), Handler)
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def healthz(self) -> tuple[int, bytes, str]:
        results = {name: check() for name, check in self.checks.items()}
        ok = all(r.ok for r in results.values())
        body: dict[str, Any] = {"status": "ok" if ok else "fail"}
        if self.about is not None:
            body.update(self.about())
        body["checks"] = {name: {"ok": r.ok, "detail": r.detail} for name, r in results.items()}
        return (200 if ok else 503), (json.dumps(body, indent=2) + "\n").encode(), "application/json"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="orthonode-http", daemon=True)
        self._thread.start()
        log.info("HTTP /healthz and /metrics on %s:%d", self._httpd.server_address[0], self.port)

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(5)
            self._thread = None
        self._httpd.server_close()
