"""Sending results back: destinations, routes, and a retry queue kept in the database.

Every result object of a finished job becomes one :class:`~dicom_node.db.Export` row per
destination (chosen by the routes of node.yaml) in the same transaction that marks the job
done, so a result is queued exactly once.  The :class:`Exporter` thread sends due rows:

* ``pending`` rows whose ``next_attempt_at`` has come are claimed (``sending``) and sent, one
  association (or one STOW-RS request) per destination and batch;
* success -> ``done``; failure -> ``pending`` again with ``next_attempt_at`` pushed back by an
  exponential backoff (:func:`backoff_delay`), or ``failed`` once ``retry.max_attempts`` are
  used up.  A failed export stays in the table (``orthonode status`` lists it) until
  ``orthonode retry`` queues it again.

Because the schedule lives in the database, a restart loses nothing: rows left ``sending`` by a
killed node go back to ``pending`` (:meth:`Exporter.recover`) and are sent again.  Sending an
object twice is harmless for a PACS: the object keeps its SOP Instance UID, and a PACS stores
one instance per UID.
"""
from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import Destination, ExportSection, NodeConfig, RetrySection, Route
from dicom_node.db import EventRecord, Export, ExportState, Job, JobState, session_scope, utcnow

log = logging.getLogger(__name__)

#: DIMSE statuses that mean "stored" (0x0000) or "stored with a warning" (0xB000-0xBFFF)
_STORED = {0x0000}
_WARNING_MASK = 0xF000
_WARNING = 0xB000


class ExportError(RuntimeError):
    """Sending to a destination failed; the message names the destination and the reason."""


# --------------------------------------------------------------------------- routes


def route_destinations(routes: Sequence[Route], calling_ae_title: str | None, joint: str | None) -> tuple[str, ...]:
    """Destinations of the first route whose ``match`` fits, or ``()`` when none does.

    ``match`` maps ``calling_ae_title`` and/or ``joint`` to regular expressions that must
    match the whole value (case-insensitive); an empty ``match`` fits every study.  A study
    without a value for a matched key (e.g. an unknown joint) does not fit that route.
    """
    values = {"calling_ae_title": calling_ae_title, "joint": joint}
    for route in routes:
        fits = True
        for key, pattern in route.match.items():
            value = values.get(key)
            if value is None or re.fullmatch(pattern, value, flags=re.IGNORECASE) is None:
                fits = False
                break
        if fits:
            return tuple(route.destinations)
    return ()


def backoff_delay(attempts: int, retry: RetrySection) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt (1-based): the initial delay,
    doubled per further attempt, capped at ``max_delay_seconds``."""
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    return float(min(retry.initial_delay_seconds * 2 ** (attempts - 1), retry.max_delay_seconds))


# --------------------------------------------------------------------------- senders


@dataclass(frozen=True)
class SendOutcome:
    """What happened to one file: ``ok`` and, when not ok, why."""

    ok: bool
    detail: str = ""


def send_dimse(destination: Destination, files: Sequence[Path], calling_ae_title: str,
               timeout: float = 30.0) -> list[SendOutcome]:
    """C-STORE ``files`` to a DIMSE destination over one association.

    Each file is sent as stored (its own transfer syntax); the association proposes exactly
    the SOP classes and transfer syntaxes of the files.  An association that cannot be
    established fails every file with the same reason.
    """
    from pydicom import dcmread
    from pynetdicom import AE

    datasets = [dcmread(path) for path in files]
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    contexts = sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets})
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, syntax)
    where = f"{destination.ae_title}@{destination.host}:{destination.port}"
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        if assoc.is_rejected:
            reason = "association rejected"
        elif assoc.is_aborted:
            reason = "association aborted"
        else:
            reason = "no association (peer unreachable?)"
        return [SendOutcome(False, f"{where}: {reason}") for _ in files]
    outcomes: list[SendOutcome] = []
    try:
        for path, ds in zip(files, datasets):
            if not assoc.is_established:
                outcomes.append(SendOutcome(False, f"{where}: association lost before {path.name}"))
                continue
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code is None:
                outcomes.append(SendOutcome(False, f"{where}: no C-STORE response for {path.name} (timeout or abort)"))
            elif code in _STORED or (code & _WARNING_MASK) == _WARNING:
                outcomes.append(SendOutcome(True, f"status 0x{code:04X}"))
            else:
                outcomes.append(SendOutcome(False, f"{where}: C-STORE of {path.name} failed with status 0x{code:04X}"))
    finally:
        if assoc.is_established:
            assoc.release()
    return outcomes


def send_stowrs(destination: Destination, files: Sequence[Path], timeout: float = 60.0) -> list[SendOutcome]:
    """STOW-RS ``files`` to a DICOMweb destination in one request (dicomweb-client).

    The response's Failed SOP Sequence marks the objects the server refused; any HTTP error
    fails the whole batch.
    """
    import requests
    from dicomweb_client.api import DICOMwebClient
    from pydicom import dcmread

    session = requests.Session()
    if destination.username:
        session.auth = (destination.username, destination.password or "")
    client = DICOMwebClient(url=str(destination.url), session=session)
    client.set_http_retry_params(retry=False)
    datasets = [dcmread(path) for path in files]
    try:
        response = client.store_instances(datasets)
    except (requests.RequestException, OSError) as exc:
        return [SendOutcome(False, f"STOW-RS {destination.url}: {exc}") for _ in files]
    failed: dict[str, str] = {}
    for item in getattr(response, "FailedSOPSequence", []) or []:
        failed[str(item.ReferencedSOPInstanceUID)] = f"0x{int(getattr(item, 'FailureReason', 0)):04X}"
    outcomes = []
    for path, ds in zip(files, datasets):
        reason = failed.get(str(ds.SOPInstanceUID))
        if reason is None:
            outcomes.append(SendOutcome(True, "stored"))
        else:
            detail = f"STOW-RS {destination.url}: refused {path.name} (failure reason {reason})"
            outcomes.append(SendOutcome(False, detail))
    return outcomes


def send_files(destination: Destination, files: Sequence[Path], calling_ae_title: str) -> list[SendOutcome]:
    """Send ``files`` to ``destination`` by its type; one outcome per file, in order."""
    if destination.type == "dimse":
        return send_dimse(destination, files, calling_ae_title)
    if destination.type == "stowrs":
        return send_stowrs(destination, files)
    raise ExportError(f"unknown destination type {destination.type!r}")


def echo(destination: Destination, calling_ae_title: str, timeout: float = 10.0) -> tuple[bool, str]:
    """C-ECHO a DIMSE destination, or GET the STOW-RS base of a DICOMweb one; (ok, detail)."""
    if destination.type == "stowrs":
        import requests

        try:
            response = requests.get(
                str(destination.url).rstrip("/") + "/studies", params={"limit": "1"}, timeout=timeout,
                auth=(destination.username, destination.password or "") if destination.username else None,
            )
        except requests.RequestException as exc:
            return False, f"{destination.url}: {exc}"
        return response.status_code < 400, f"{destination.url}: HTTP {response.status_code}"
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = timeout
    ae.add_requested_context(Verification)
    where = f"{destination.ae_title}@{destination.host}:{destination.port}"
    started = time.monotonic()
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        return False, f"{where}: association {'rejected' if assoc.is_rejected else 'failed'}"
    try:
        status = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    code = getattr(status, "Status", None)
    if code != 0x0000:
        return False, f"{where}: C-ECHO status {code!r}"
    return True, f"{where}: C-ECHO ok in {1000 * (time.monotonic() - started):.0f} ms"


# --------------------------------------------------------------------------- queue


def queue_exports(
    session: Session, job: Job, objects: Iterable[tuple[str, str, str]], destinations: Sequence[str]
) -> list[Export]:
    """Add one pending export per (object, destination) for ``job``.

    ``objects`` are ``(object_path relative to the data directory, kind, SOP Instance UID)``.
    Runs inside the caller's transaction (the one that marks the job done).
    """
    now = utcnow()
    rows = []
    for object_path, kind, sop_uid in objects:
        for name in destinations:
            row = Export(job_id=job.id, destination=name, object_path=object_path, object_kind=kind,
                         sop_instance_uid=sop_uid, state=ExportState.PENDING, attempts=0, next_attempt_at=now)
            session.add(row)
            rows.append(row)
    return rows


def retry_failed(
    factory: sessionmaker[Session], export_ids: Sequence[int] = (), destination: str | None = None
) -> list[int]:
    """Queue failed exports again (attempts reset, due now); return the ids re-queued.

    With ``export_ids`` only those (each must exist and be failed); otherwise every failed
    export, optionally only those of ``destination``.  Exports of a superseded job are not
    re-queued: newer results replace them.
    """
    with session_scope(factory) as session:
        query = select(Export).join(Job).where(Export.state == ExportState.FAILED)
        if export_ids:
            found = {e.id: e for e in session.scalars(select(Export).where(Export.id.in_(list(export_ids))))}
            missing = [i for i in export_ids if i not in found]
            if missing:
                raise ExportError(f"no export with id {', '.join(map(str, missing))}")
            not_failed = [f"{i} ({found[i].state.value})" for i in export_ids
                          if found[i].state is not ExportState.FAILED]
            if not_failed:
                raise ExportError(f"only failed exports can be retried; not failed: {', '.join(not_failed)}")
            query = query.where(Export.id.in_(list(export_ids)))
        if destination is not None:
            query = query.where(Export.destination == destination)
        ids = []
        for export in session.scalars(query):
            if export.job.state is JobState.SUPERSEDED:
                continue
            export.state = ExportState.PENDING
            export.attempts = 0
            export.next_attempt_at = utcnow()
            export.last_error = None
            session.add(EventRecord(kind="export_requeued", job_id=export.job_id,
                                    study_instance_uid=export.job.study.study_instance_uid,
                                    message=f"export {export.id} ({export.object_kind}) to "
                                            f"{export.destination} queued again"))
            ids.append(export.id)
        return ids


class Exporter:
    """The sender thread: sends due exports, records each outcome and the next attempt.

    ``on_result(destination, kind, ok, seconds)`` is called per object (the node hooks its
    metrics there).  ``poll_seconds`` bounds how long a new or due export waits when nobody
    calls :meth:`wake`.
    """

    def __init__(
        self,
        config: NodeConfig,
        factory: sessionmaker[Session],
        *,
        poll_seconds: float = 1.0,
        batch_size: int = 20,
        on_result: Callable[[str, str, bool, float], None] | None = None,
        sender: Callable[[Destination, Sequence[Path], str], list[SendOutcome]] = send_files,
    ) -> None:
        self.config = config
        self.export_config: ExportSection = config.export
        self.factory = factory
        self.poll_seconds = poll_seconds
        self.batch_size = batch_size
        self.on_result = on_result
        self.sender = sender
        self.calling_ae_title = config.listener.ae_titles[0]
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_loop_at: float | None = None

    # ------------------------------------------------------------------ lifecycle
    def recover(self) -> int:
        """Put exports left ``sending`` by a stopped node back to ``pending`` (due now)."""
        with session_scope(self.factory) as session:
            rows = list(session.scalars(select(Export).where(Export.state == ExportState.SENDING)))
            for row in rows:
                row.state = ExportState.PENDING
                row.next_attempt_at = utcnow()
                session.add(EventRecord(kind="export_recovered", job_id=row.job_id,
                                        message=f"export {row.id} to {row.destination} was being sent when the node "
                                                f"stopped; it is sent again"))
            if rows:
                log.warning("%d export(s) were interrupted by a restart; sending them again", len(rows))
            return len(rows)

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("exporter already started")
        self.recover()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="orthonode-exporter", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def wake(self) -> None:
        """Look for due exports now (called when a job queued some)."""
        self._wake.set()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.last_loop_at = time.monotonic()
            try:
                busy = self.run_once()
            except Exception:  # the sender thread must survive a database hiccup; it is logged
                log.exception("export loop failed; retrying in %.0f s", self.poll_seconds)
                busy = False
            if not busy:
                self._wake.wait(self.poll_seconds)
                self._wake.clear()

    # ------------------------------------------------------------------ work
    def _claim(self) -> dict[str, list[tuple[int, Path, str]]]:
        """Mark up to ``batch_size`` due exports ``sending``; grouped by destination."""
        now = utcnow()
        batches: dict[str, list[tuple[int, Path, str]]] = {}
        with session_scope(self.factory) as session:
            rows = session.scalars(
                select(Export)
                .where(Export.state == ExportState.PENDING, Export.next_attempt_at <= now)
                .order_by(Export.next_attempt_at, Export.id)
                .limit(self.batch_size)
            ).all()
            for row in rows:
                row.state = ExportState.SENDING
                row.attempts += 1
                batches.setdefault(row.destination, []).append(
                    (row.id, self.config.data_dir / row.object_path, row.object_kind)
                )
        return batches

    def run_once(self) -> bool:
        """Send one batch of due exports; True when there was something to send."""
        batches = self._claim()
        for name, items in batches.items():
            destination = self.export_config.destinations.get(name)
            started = time.monotonic()
            if destination is None:
                outcomes = [SendOutcome(False, f"destination {name!r} is no longer in node.yaml export.destinations")
                            for _ in items]
            else:
                exists = [path.is_file() for _, path, _ in items]
                present = [path for (_, path, _), ok in zip(items, exists) if ok]
                try:
                    sent = iter(self.sender(destination, present, self.calling_ae_title) if present else [])
                except Exception as exc:  # recorded on every row of the batch and retried with backoff
                    log.exception("sending %d object(s) to %s raised", len(present), name)
                    failure = SendOutcome(False, f"{name}: {type(exc).__name__}: {exc}")
                    sent = iter([failure] * len(present))
                outcomes = [next(sent) if ok else SendOutcome(False, f"result file {path} is missing")
                            for (_, path, _), ok in zip(items, exists)]
            seconds = (time.monotonic() - started) / max(len(items), 1)
            self._record(name, items, outcomes, seconds)
        return bool(batches)

    def _record(
        self, name: str, items: list[tuple[int, Path, str]], outcomes: list[SendOutcome], seconds: float
    ) -> None:
        retry = self.export_config.retry
        with session_scope(self.factory) as session:
            for (export_id, path, kind), outcome in zip(items, outcomes):
                row = session.get(Export, export_id)
                if row is None:  # deleted meanwhile (study purged); nothing to record
                    continue
                study_uid = row.job.study.study_instance_uid
                if outcome.ok:
                    row.state = ExportState.DONE
                    row.last_error = None
                    row.next_attempt_at = None
                    log.info("study %s: %s %s sent to %s (attempt %d, %s)", study_uid, kind, row.sop_instance_uid,
                             name, row.attempts, outcome.detail)
                    session.add(EventRecord(kind="export_done", job_id=row.job_id, study_instance_uid=study_uid,
                                            sop_instance_uid=row.sop_instance_uid,
                                            message=f"{kind} sent to {name} (attempt {row.attempts})"))
                elif row.attempts >= retry.max_attempts:
                    row.state = ExportState.FAILED
                    row.last_error = outcome.detail
                    row.next_attempt_at = None
                    log.error("study %s: %s %s to %s failed for good after %d attempts: %s "
                              "(orthonode retry re-queues it)",
                              study_uid, kind, row.sop_instance_uid, name, row.attempts, outcome.detail)
                    session.add(EventRecord(kind="export_failed", job_id=row.job_id, study_instance_uid=study_uid,
                                            sop_instance_uid=row.sop_instance_uid,
                                            message=f"{kind} to {name}: {outcome.detail}"))
                else:
                    delay = backoff_delay(row.attempts, retry)
                    row.state = ExportState.PENDING
                    row.last_error = outcome.detail
                    row.next_attempt_at = utcnow() + timedelta(seconds=delay)
                    log.warning("study %s: %s %s to %s failed (attempt %d of %d): %s; next attempt in %.0f s",
                                study_uid, kind, row.sop_instance_uid, name, row.attempts, retry.max_attempts,
                                outcome.detail, delay)
                    session.add(EventRecord(kind="export_retry", job_id=row.job_id, study_instance_uid=study_uid,
                                            sop_instance_uid=row.sop_instance_uid,
                                            message=f"{kind} to {name}: {outcome.detail}; retry in {delay:.0f} s"))
                if self.on_result is not None:
                    self.on_result(name, kind, outcome.ok, seconds)


def due_in_seconds(row: Export, now: datetime | None = None) -> float | None:
    """Seconds until a pending export's next attempt (negative: overdue); None otherwise."""
    if row.state is not ExportState.PENDING or row.next_attempt_at is None:
        return None
    return (row.next_attempt_at - (now or utcnow())).total_seconds()
