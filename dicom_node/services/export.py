"""Sending results back: destinations, routes, and a retry queue kept in the database.

Why one module of about 780 lines: routes, the two destination classes and the exporter share
one protocol over the exports table (claim, send, verify before a resend, retry).

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
killed node go back to ``pending`` (:meth:`Exporter.recover`) and are sent again.

Exactly once, not at least once.  A send can end without an answer after the request went out
(the association aborted, the DIMSE timeout ran out, the HTTP response never came, the node was
killed mid-send): the destination may or may not have stored the object.  Such a failure is
marked *outcome unknown* (:data:`OUTCOME_UNKNOWN`, kept at the start of ``last_error`` until the
export is done), and when the destination has ``verify_before_resend`` the next attempt first
asks it whether it holds the SOP instance (:func:`verify_held`: C-FIND at IMAGE level, or
QIDO-RS).  An object it holds is marked done without being sent again.  When the query itself
fails the object is resent and the log says it may now be there twice; a PACS that receives the
same SOP Instance UID with the same content normally keeps one copy, but some keep both or
answer with a warning.  A failure with a definite answer (a refusal status, no association,
an HTTP 4xx) is retried without a query: the object did not arrive.
"""
from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.cluster import PROCESS_LEASE_SECONDS, live_process_ids, process_id
from dicom_node.config import Destination, ExportSection, NodeConfig, RetrySection, Route
from dicom_node.db import EventKind, EventRecord, Export, ExportState, Job, JobState, session_scope, utcnow
from dicom_node.services.base import BackgroundService

log = logging.getLogger(__name__)

#: DIMSE statuses that mean "stored" (0x0000) or "stored with a warning" (0xB000-0xBFFF)
_STORED = {0x0000}
_WARNING_MASK = 0xF000
_WARNING = 0xB000


#: ``last_error`` starts with this while the export's last attempt may have reached the destination
OUTCOME_UNKNOWN = "outcome unknown: "


class ExportError(RuntimeError):
    """Sending to a destination failed; the message names the destination and the reason."""


def outcome_unknown(last_error: str | None) -> bool:
    """Whether an export's earlier attempt may have delivered it (see :data:`OUTCOME_UNKNOWN`)."""
    return last_error is not None and last_error.startswith(OUTCOME_UNKNOWN)


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
    """What happened to one file: ``ok`` and, when not ok, why.

    ``unknown`` marks a failure after the request went out with no answer: the destination may
    hold the object anyway, so the next attempt verifies before resending.
    """

    ok: bool
    detail: str = ""
    unknown: bool = False
    #: ok without a send: the destination already held the object from an earlier attempt
    already_held: bool = False


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
            if code is None:  # the request went out: the PACS may have stored it
                outcomes.append(SendOutcome(False, f"{where}: no C-STORE response for {path.name} (timeout or abort)",
                                            unknown=True))
                # The association cannot be trusted after a lost response (pynetdicom may still
                # report it established for a moment after the peer's A-ABORT), so the rest of
                # the batch is not sent on it: those objects fail without having gone out.
                if assoc.is_established:
                    assoc.abort()
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
        unknown = not _request_never_arrived(exc)
        return [SendOutcome(False, f"STOW-RS {destination.url}: {exc}", unknown=unknown) for _ in files]
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


def _request_never_arrived(exc: BaseException) -> bool:
    """True when an HTTP failure proves the server did not take the request: the connection was
    never made, or the server answered with a 4xx.  Anything else (a read timeout, a connection
    reset mid-request, a 5xx from a gateway) may hide a stored object."""
    import requests
    from urllib3.exceptions import NewConnectionError

    if isinstance(exc, requests.ConnectTimeout):
        return True
    if isinstance(exc, requests.HTTPError):
        status = exc.response.status_code if exc.response is not None else None
        return status is not None and 400 <= status < 500
    if isinstance(exc, requests.ConnectionError):
        reason = getattr(exc.args[0], "reason", None) if exc.args else None
        return isinstance(reason, NewConnectionError)
    return False


def send_files(destination: Destination, files: Sequence[Path], calling_ae_title: str) -> list[SendOutcome]:
    """Send ``files`` to ``destination`` by its type; one outcome per file, in order."""
    return destination_kind(destination).send(files, calling_ae_title)


def echo(destination: Destination, calling_ae_title: str, timeout: float = 10.0) -> tuple[bool, str]:
    """C-ECHO a DIMSE destination, or GET the STOW-RS base of a DICOMweb one; (ok, detail)."""
    return destination_kind(destination).echo(calling_ae_title, timeout)


def echo_stowrs(destination: Destination, timeout: float = 10.0) -> tuple[bool, str]:
    """GET ``<url>/studies?limit=1`` of a DICOMweb destination; (ok, detail)."""
    import requests

    try:
        response = requests.get(
            str(destination.url).rstrip("/") + "/studies", params={"limit": "1"}, timeout=timeout,
            auth=(destination.username, destination.password or "") if destination.username else None,
        )
    except requests.RequestException as exc:
        return False, f"{destination.url}: {exc}"
    return response.status_code < 400, f"{destination.url}: HTTP {response.status_code}"


def echo_dimse(destination: Destination, calling_ae_title: str, timeout: float = 10.0) -> tuple[bool, str]:
    """C-ECHO a DIMSE destination; (ok, detail)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = timeout
    ae.add_requested_context(Verification)
    where = DimseDestination(destination).describe()
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


# --------------------------------------------------------------------------- verification


@dataclass(frozen=True)
class Presence:
    """Whether a destination holds one object: ``held`` True/False, or None when the query
    failed (then ``detail`` says why and the caller must assume nothing)."""

    held: bool | None
    detail: str


def _object_keys(path: Path) -> tuple[str, str, str]:
    """(Study, Series, SOP Instance UID) of a result file, read without its pixel data."""
    from pydicom import dcmread

    ds = dcmread(path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def find_dimse(destination: Destination, files: Sequence[Path], calling_ae_title: str,
               timeout: float = 30.0) -> list[Presence]:
    """Ask a DIMSE destination (or its ``query`` AE) by C-FIND, Study Root at IMAGE level, whether
    it holds each file's SOP instance; one association for all files.

    The identifier carries the unique keys of every level (Study, Series and SOP Instance UID),
    as the hierarchical model requires, so any Query/Retrieve SCP can answer it.
    """
    from pydicom.dataset import Dataset
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    target = destination.query or destination
    where = f"C-FIND {target.ae_title}@{target.host}:{target.port}"
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(target.host, target.port, ae_title=target.ae_title)
    if not assoc.is_established:
        if assoc.is_rejected:
            reason = "association rejected"
        elif assoc.is_aborted:  # pynetdicom aborts when no presentation context was accepted
            reason = "association aborted (does the peer accept Study Root C-FIND?)"
        else:
            reason = "no association (peer unreachable?)"
        return [Presence(None, f"{where}: {reason}") for _ in files]
    presences: list[Presence] = []
    try:
        if not any(cx.abstract_syntax == StudyRootQueryRetrieveInformationModelFind
                   for cx in assoc.accepted_contexts):
            return [Presence(None, f"{where}: the peer does not accept Study Root C-FIND") for _ in files]
        for path in files:
            if not assoc.is_established:
                presences.append(Presence(None, f"{where}: association lost before {path.name}"))
                continue
            study, series, sop = _object_keys(path)
            query = Dataset()
            query.QueryRetrieveLevel = "IMAGE"
            query.StudyInstanceUID, query.SeriesInstanceUID, query.SOPInstanceUID = study, series, sop
            held = False
            final: int | None = None
            try:
                for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
                    code = getattr(status, "Status", None)
                    if code in (0xFF00, 0xFF01):
                        held = held or (identifier is not None
                                        and str(getattr(identifier, "SOPInstanceUID", "")) == sop)
                    else:
                        final = code
            except RuntimeError as exc:  # pynetdicom: the peer ended the association (e.g. refused the query)
                presences.append(Presence(None, f"{where}: association ended by the peer ({exc}); is the node's "
                                                f"AE {calling_ae_title} allowed to query it?"))
                continue
            if final == 0x0000:
                presences.append(Presence(held, f"{where}: {'held' if held else 'not held'}"))
            elif final is None:
                presences.append(Presence(None, f"{where}: no response for {sop} (timeout or abort)"))
            else:
                presences.append(Presence(None, f"{where}: status 0x{final:04X} for {sop}"))
    finally:
        if assoc.is_established:
            assoc.release()
    return presences


def find_qido(destination: Destination, files: Sequence[Path], timeout: float = 30.0) -> list[Presence]:
    """Ask a DICOMweb destination by QIDO-RS (``qido_url`` or ``url``) whether it holds each
    file's SOP instance: a search for instances of the study with that SOP Instance UID."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    base = str(destination.qido_url or destination.url)
    session = requests.Session()
    if destination.username:
        session.auth = (destination.username, destination.password or "")
    client = DICOMwebClient(url=base, session=session)
    client.set_http_retry_params(retry=False)
    presences = []
    for path in files:
        study, _, sop = _object_keys(path)
        try:
            found = client.search_for_instances(study_instance_uid=study, search_filters={"SOPInstanceUID": sop})
        except (requests.RequestException, OSError, ValueError) as exc:
            presences.append(Presence(None, f"QIDO-RS {base}: {type(exc).__name__}: {exc}"))
            continue
        held = any(item.get("00080018", {}).get("Value", [None])[0] == sop for item in found)
        presences.append(Presence(held, f"QIDO-RS {base}: {'held' if held else 'not held'}"))
    return presences


def verify_held(destination: Destination, files: Sequence[Path], calling_ae_title: str) -> list[Presence]:
    """Whether ``destination`` already holds each of ``files`` (C-FIND or QIDO-RS by its type)."""
    return destination_kind(destination).holds(files, calling_ae_title)


# --------------------------------------------------------------------------- destination types


class DestinationKind(Protocol):
    """What the node does with one type of destination (``destination.type`` in node.yaml)."""

    def send(self, files: Sequence[Path], calling_ae_title: str) -> list[SendOutcome]:
        """Send ``files``; one outcome per file, in order."""

    def holds(self, files: Sequence[Path], calling_ae_title: str) -> list[Presence]:
        """Whether the destination already holds each of ``files`` (verify before resend)."""

    def echo(self, calling_ae_title: str, timeout: float) -> tuple[bool, str]:
        """Whether the destination answers; (ok, detail)."""

    def describe(self) -> str:
        """Where the destination is, for messages (``AE@host:port`` or the URL)."""


@dataclass(frozen=True)
class DimseDestination:
    """A DICOM peer: C-STORE to send, C-FIND (Study Root, IMAGE level) to verify, C-ECHO."""

    config: Destination

    def send(self, files: Sequence[Path], calling_ae_title: str) -> list[SendOutcome]:
        return send_dimse(self.config, files, calling_ae_title)

    def holds(self, files: Sequence[Path], calling_ae_title: str) -> list[Presence]:
        return find_dimse(self.config, files, calling_ae_title)

    def echo(self, calling_ae_title: str, timeout: float) -> tuple[bool, str]:
        return echo_dimse(self.config, calling_ae_title, timeout)

    def describe(self) -> str:
        return f"{self.config.ae_title}@{self.config.host}:{self.config.port}"


@dataclass(frozen=True)
class StowRsDestination:
    """A DICOMweb server: STOW-RS to send, QIDO-RS to verify, a GET of its studies to echo."""

    config: Destination

    def send(self, files: Sequence[Path], calling_ae_title: str) -> list[SendOutcome]:
        return send_stowrs(self.config, files)

    def holds(self, files: Sequence[Path], calling_ae_title: str) -> list[Presence]:
        return find_qido(self.config, files)

    def echo(self, calling_ae_title: str, timeout: float) -> tuple[bool, str]:
        return echo_stowrs(self.config, timeout)

    def describe(self) -> str:
        return f"{self.config.url}"


#: the class of each ``destination.type``
DESTINATION_KINDS: dict[str, Callable[[Destination], DestinationKind]] = {
    "dimse": DimseDestination,
    "stowrs": StowRsDestination,
}


def destination_kind(destination: Destination) -> DestinationKind:
    """The operations of ``destination``'s type; :class:`ExportError` for an unknown type."""
    kind = DESTINATION_KINDS.get(destination.type)
    if kind is None:
        raise ExportError(f"unknown destination type {destination.type!r}")
    return kind(destination)


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
            if not outcome_unknown(export.last_error):  # an unknown outcome still needs its check
                export.last_error = None
            session.add(EventRecord(kind=EventKind.EXPORT_REQUEUED, job_id=export.job_id,
                                    study_instance_uid=export.job.study.study_instance_uid,
                                    message=f"export {export.id} ({export.object_kind}) to "
                                            f"{export.destination} queued again"))
            ids.append(export.id)
        return ids


class Exporter(BackgroundService):
    """The sender thread: sends due exports, records each outcome and the next attempt.

    ``on_result(destination, kind, ok, seconds)`` is called per object (the node hooks its
    metrics there).  ``poll_seconds`` bounds how long a new or due export waits when nobody
    calls :meth:`wake` (called when a job queued some).  ``sender`` and ``verifier`` send and
    look up objects (by default :func:`send_files` and :func:`verify_held`).
    """

    stop_timeout = 30.0
    already_started_message = "exporter already started"

    def __init__(
        self,
        config: NodeConfig,
        factory: sessionmaker[Session],
        *,
        poll_seconds: float = 1.0,
        batch_size: int = 20,
        on_result: Callable[[str, str, bool, float], None] | None = None,
        sender: Callable[[Destination, Sequence[Path], str], list[SendOutcome]] = send_files,
        verifier: Callable[[Destination, Sequence[Path], str], list[Presence]] = verify_held,
    ) -> None:
        super().__init__("orthonode-exporter")
        self.config = config
        self.export_config: ExportSection = config.export
        self.factory = factory
        self.poll_seconds = poll_seconds
        self.batch_size = batch_size
        self.on_result = on_result
        self.sender = sender
        self.verifier = verifier
        self.calling_ae_title = config.listener.ae_titles[0]
        #: ``host:pid``, recorded on the exports this exporter is sending
        self.process_id = process_id()
        self._last_sweep = time.monotonic()
        #: exports of the batch being sent now (for /healthz and /metrics)
        self.sending = 0

    # ------------------------------------------------------------------ lifecycle
    def recover(self, at_startup: bool = True) -> int:
        """Put exports left ``sending`` by an exporter that is gone back to ``pending`` (due now).

        Gone: a process no longer registered alive in ``processes`` (:mod:`dicom_node.cluster`),
        or, at start-up, an earlier life of this process id.  Exports another live exporter is
        sending are left to it.
        """
        me = process_id()
        with session_scope(self.factory) as session:
            live = live_process_ids(session)
            query = select(Export).where(Export.state == ExportState.SENDING)
            if session.get_bind().dialect.name == "postgresql":
                query = query.with_for_update(skip_locked=True)
            rows = [row for row in session.scalars(query)
                    if row.sender_id is None or (row.sender_id == me and at_startup)
                    or (row.sender_id != me and row.sender_id not in live)]
            for row in rows:
                row.state = ExportState.PENDING
                row.next_attempt_at = utcnow()
                row.sender_id = None
                # the stopped exporter may have sent it before it could record the answer
                row.last_error = f"{OUTCOME_UNKNOWN}interrupted while being sent (exporter stopped)"
                session.add(EventRecord(kind=EventKind.EXPORT_RECOVERED, job_id=row.job_id,
                                        message=f"export {row.id} to {row.destination} was being sent by an exporter "
                                                f"that stopped; it is sent again unless the destination already "
                                                f"holds it"))
            if rows:
                log.warning("%d export(s) were interrupted by a stopped exporter; sending them again", len(rows))
            return len(rows)

    # ------------------------------------------------------------------ the loop (BackgroundService)
    def _starting(self) -> None:
        self.recover()
        self._last_sweep = time.monotonic()

    def _tick(self) -> bool:
        if time.monotonic() - self._last_sweep > PROCESS_LEASE_SECONDS:
            self.recover(at_startup=False)  # an exporter of another process may have died
            self._last_sweep = time.monotonic()
        return self.run_once()

    def _wait_seconds(self) -> float:
        return self.poll_seconds

    def _tick_failed(self) -> None:  # the sender thread must survive a database hiccup; it is logged
        log.exception("export loop failed; retrying in %.0f s", self.poll_seconds)

    # ------------------------------------------------------------------ work
    def _claim(self) -> dict[str, list[_Claimed]]:
        """Mark up to ``batch_size`` due exports ``sending``; grouped by destination."""
        now = utcnow()
        batches: dict[str, list[_Claimed]] = {}
        with session_scope(self.factory) as session:
            query = (select(Export)
                     .where(Export.state == ExportState.PENDING, Export.next_attempt_at <= now)
                     .order_by(Export.next_attempt_at, Export.id)
                     .limit(self.batch_size))
            if session.get_bind().dialect.name == "postgresql":  # several exporters: each row to one
                query = query.with_for_update(skip_locked=True)
            rows = session.scalars(query).all()
            for row in rows:
                row.state = ExportState.SENDING
                row.sender_id = self.process_id
                row.attempts += 1
                batches.setdefault(row.destination, []).append(_Claimed(
                    row.id, self.config.data_dir / row.object_path, row.object_kind, row.sop_instance_uid,
                    outcome_unknown(row.last_error)))
        return batches

    def run_once(self) -> bool:
        """Send one batch of due exports; True when there was something to send."""
        batches = self._claim()
        self.sending = sum(len(items) for items in batches.values())
        try:
            for name, items in batches.items():
                destination = self.export_config.destinations.get(name)
                started = time.monotonic()
                if destination is None:
                    outcomes = [SendOutcome(False, f"destination {name!r} is no longer in node.yaml "
                                                   f"export.destinations") for _ in items]
                else:
                    outcomes = self._send(name, destination, items)
                seconds = (time.monotonic() - started) / max(len(items), 1)
                self._record(name, items, outcomes, seconds)
                self.sending -= len(items)
        finally:
            self.sending = 0
        return bool(batches)

    def _send(self, name: str, destination: Destination, items: list[_Claimed]) -> list[SendOutcome]:
        """Outcomes of one destination's batch: files that are missing fail, those the
        destination already holds (after an unknown outcome) are done, the rest are sent."""
        outcomes: dict[int, SendOutcome] = {}
        for item in items:
            if not item.path.is_file():
                outcomes[item.export_id] = SendOutcome(False, f"result file {item.path} is missing")
        uncertain = [i for i in items if i.unknown and i.export_id not in outcomes]
        if uncertain and not destination.verify_before_resend:
            log.warning("%s: resending %d object(s) whose last attempt may have arrived, without asking first "
                        "(verify_before_resend is false): they may be delivered twice", name, len(uncertain))
        elif uncertain:
            outcomes.update(self._verify(name, destination, uncertain))
        to_send = [i for i in items if i.export_id not in outcomes]
        if to_send:
            try:
                sent = self.sender(destination, [i.path for i in to_send], self.calling_ae_title)
            except Exception as exc:  # recorded on every row of the batch and retried with backoff
                log.exception("sending %d object(s) to %s raised", len(to_send), name)
                # it raised part-way: any object of the batch may have gone out
                failure = SendOutcome(False, f"{name}: {type(exc).__name__}: {exc}", unknown=True)
                sent = [failure] * len(to_send)
            if len(sent) != len(to_send):
                raise ExportError(f"{name}: the sender returned {len(sent)} outcomes for {len(to_send)} objects")
            outcomes.update({item.export_id: outcome for item, outcome in zip(to_send, sent)})
        return [outcomes[item.export_id] for item in items]

    def _verify(self, name: str, destination: Destination, items: list[_Claimed]) -> dict[int, SendOutcome]:
        """Ask the destination about objects whose last attempt may have arrived; the outcomes
        of those it holds (done, not resent).  The others are left to be sent; when the query
        failed the log says the resend may duplicate the object."""
        try:
            presences = self.verifier(destination, [i.path for i in items], self.calling_ae_title)
        except Exception as exc:  # a failed query must not block the export: resent, with a warning
            log.exception("asking %s whether it holds %d object(s) raised", name, len(items))
            presences = [Presence(None, f"{type(exc).__name__}: {exc}")] * len(items)
        if len(presences) != len(items):
            raise ExportError(f"{name}: the verifier returned {len(presences)} answers for {len(items)} objects")
        done: dict[int, SendOutcome] = {}
        for item, presence in zip(items, presences):
            if presence.held:
                log.info("%s %s: the last attempt arrived after all (%s); not sent again",
                         item.kind, item.sop_instance_uid, presence.detail)
                done[item.export_id] = SendOutcome(True, f"already held, not resent ({presence.detail})",
                                                   already_held=True)
            elif presence.held is None:
                log.warning("%s %s: could not ask %s whether the last attempt arrived (%s); resending, so the "
                            "destination may now hold it twice", item.kind, item.sop_instance_uid, name,
                            presence.detail)
            else:
                log.info("%s %s: not held by %s (%s); sending it again", item.kind, item.sop_instance_uid, name,
                         presence.detail)
        return done

    def _record(self, name: str, items: list[_Claimed], outcomes: list[SendOutcome], seconds: float) -> None:
        retry = self.export_config.retry
        with session_scope(self.factory) as session:
            for item, outcome in zip(items, outcomes):
                kind = item.kind
                row = session.get(Export, item.export_id)
                if row is None:  # deleted meanwhile (study purged); nothing to record
                    continue
                study_uid = row.job.study.study_instance_uid
                if outcome.ok:
                    row.state = ExportState.DONE
                    row.last_error = None
                    row.next_attempt_at = None
                    log.info("study %s: %s %s sent to %s (attempt %d, %s)", study_uid, kind, row.sop_instance_uid,
                             name, row.attempts, outcome.detail)
                    what = (f"{kind} already held by {name} from an earlier attempt, not resent" if outcome.already_held
                            else f"{kind} sent to {name}")
                    session.add(EventRecord(kind=EventKind.EXPORT_DONE, job_id=row.job_id,
                                            study_instance_uid=study_uid, sop_instance_uid=row.sop_instance_uid,
                                            message=f"{what} (attempt {row.attempts})"))
                elif row.attempts >= retry.max_attempts:
                    row.state = ExportState.FAILED
                    row.last_error = _error_text(outcome, item)
                    row.next_attempt_at = None
                    log.error("study %s: %s %s to %s failed for good after %d attempts: %s "
                              "(orthonode retry re-queues it)",
                              study_uid, kind, row.sop_instance_uid, name, row.attempts, outcome.detail)
                    session.add(EventRecord(kind=EventKind.EXPORT_FAILED, job_id=row.job_id,
                                            study_instance_uid=study_uid, sop_instance_uid=row.sop_instance_uid,
                                            message=f"{kind} to {name}: {outcome.detail}"))
                else:
                    delay = backoff_delay(row.attempts, retry)
                    row.state = ExportState.PENDING
                    row.last_error = _error_text(outcome, item)
                    row.next_attempt_at = utcnow() + timedelta(seconds=delay)
                    log.warning("study %s: %s %s to %s failed (attempt %d of %d): %s; next attempt in %.0f s",
                                study_uid, kind, row.sop_instance_uid, name, row.attempts, retry.max_attempts,
                                outcome.detail, delay)
                    session.add(EventRecord(kind=EventKind.EXPORT_RETRY, job_id=row.job_id,
                                            study_instance_uid=study_uid, sop_instance_uid=row.sop_instance_uid,
                                            message=f"{kind} to {name}: {outcome.detail}; retry in {delay:.0f} s"))
                if self.on_result is not None:
                    self.on_result(name, kind, outcome.ok, seconds)


@dataclass(frozen=True)
class _Claimed:
    """One export being sent: its row id, file, kind, SOP Instance UID, and whether an earlier
    attempt may have delivered it (so the destination is asked first)."""

    export_id: int
    path: Path
    kind: str
    sop_instance_uid: str
    unknown: bool


def _error_text(outcome: SendOutcome, item: _Claimed) -> str:
    """``last_error`` of a failed attempt: marked :data:`OUTCOME_UNKNOWN` when this attempt or an
    earlier one may have delivered the object (the mark stays until the export is done)."""
    if outcome.unknown or item.unknown:
        return OUTCOME_UNKNOWN + outcome.detail.removeprefix(OUTCOME_UNKNOWN)
    return outcome.detail


def due_in_seconds(row: Export, now: datetime | None = None) -> float | None:
    """Seconds until a pending export's next attempt (negative: overdue); None otherwise."""
    if row.state is not ExportState.PENDING or row.next_attempt_at is None:
        return None
    return (row.next_attempt_at - (now or utcnow())).total_seconds()
