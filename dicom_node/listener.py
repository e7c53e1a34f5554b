"""The node's DICOM listener: C-ECHO and C-STORE on one pynetdicom AE.

What happens to an association:

* **Called AE title** must be one of ``listener.ae_titles``; otherwise A-ASSOCIATE-RJ
  (rejected-permanent, service-user, *called AE title not recognised*).  The association is
  answered under the title it called.
* **Caller**: unless ``listener.allow_any_caller``, the calling AE title must be listed in
  ``listener.allowed_callers`` and, when that entry lists ``hosts`` (IP addresses or
  networks such as ``10.1.0.0/16``), the peer address must be one of them; otherwise
  A-ASSOCIATE-RJ (rejected-permanent, service-user, *calling AE title not recognised*; a
  wrong host is reported the same way, since the AE title and host together identify the
  caller).  The log line says which of the two failed.
* ``listener.max_associations``: one more is rejected by pynetdicom (rejected-transient,
  *local limit exceeded*).
* **Presentation contexts**: Verification, the ``accept_sop_classes`` and the
  ``ignore_sop_classes``, each with every transfer syntax pynetdicom knows, compressed ones
  included, because the node stores what it receives without decoding it.  **Any other SOP
  class is refused at negotiation** (its presentation context gets *abstract syntax not
  supported*), so a sender learns it before sending.  Instances of an ignored class are
  acknowledged with success and dropped with a log line.

The C-STORE handler (:func:`handle_store`, bound with its :class:`StoreReceiver`) maps every
failure to a specific DIMSE status (:class:`StoreStatus`) and logs the reason with the study,
series and SOP instance UIDs.  It answers success only after the file is fsynced and its
database row committed; then it calls ``on_instance_stored(study_uid, series_uid)``, which
must return quickly (the study assembler only restarts a timer there).
"""
from __future__ import annotations

import enum
import ipaddress
import logging
import ssl
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt, sop_class
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import ListenerSection, NodeConfig
from dicom_node.db import (
    Instance,
    ReceivedInstance,
    Series,
    SeriesStudyMismatchError,
    Study,
    add_event,
    hash_patient_id,
    record_instance,
    session_scope,
    utcnow,
)
from dicom_node.storage import (
    DuplicateConflictError,
    InsufficientStorageError,
    InvalidUIDError,
    Storage,
    StoredInstance,
    validate_uid,
)

log = logging.getLogger(__name__)

#: signature of the hook the study assembler provides
InstanceStoredCallback = Callable[[str, str], None]


class StoreStatus(enum.IntEnum):
    """The C-STORE statuses the node answers with (PS3.4 Annex B.2.3, PS3.7 Annex C)."""

    SUCCESS = 0x0000
    #: general failure "Duplicate SOP Instance": same UID, different bytes, reject_if_different;
    #: or the UID is already stored in another study/series
    DUPLICATE_SOP_INSTANCE = 0x0111
    #: general failure: a SOP class outside the configured lists (normally refused at negotiation)
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    #: out of resources: storing would go below ``storage.min_free_mb``
    OUT_OF_SPACE = 0xA700
    #: out of resources: the file could not be written (I/O error, permissions)
    STORAGE_WRITE_FAILED = 0xA701
    #: out of resources: the database is unavailable; nothing was kept, the sender may retry
    DATABASE_UNAVAILABLE = 0xA702
    #: the data set's SOP Class UID is not the presentation context's
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    #: cannot understand: a Study/Series/SOP Instance UID missing or not a valid UID
    INVALID_UIDS = 0xC210
    #: cannot understand: the data set could not be parsed
    UNPARSABLE_DATASET = 0xC211
    #: cannot understand: the data set's SOP Instance UID differs from the command's
    SOP_INSTANCE_UID_MISMATCH = 0xC212
    #: cannot understand: the series is recorded under another study
    SERIES_IN_OTHER_STUDY = 0xC213


# --------------------------------------------------------------------------- callers


@dataclass(frozen=True)
class Rejection:
    """An A-ASSOCIATE-RJ (result, source, diagnostic) and the reason for the log."""

    result: int
    source: int
    diagnostic: int
    reason: str


def _network(entry: str, where: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(entry, strict=False)
    except ValueError:
        raise ValueError(f"{where}: {entry!r} is not an IP address or network (host names are not resolved)") from None


def _peer_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class CallerPolicy:
    """Decides whether to accept an association: called title, calling title and peer host."""

    def __init__(self, listener: ListenerSection) -> None:
        self.ae_titles = frozenset(listener.ae_titles)
        self.allow_any_caller = listener.allow_any_caller
        self._callers: dict[str, list[Any] | None] = {}
        for i, caller in enumerate(listener.allowed_callers):
            where = f"listener.allowed_callers[{i}].hosts"
            nets = [_network(h, where) for h in caller.hosts]
            if caller.ae_title in self._callers:
                previous = self._callers[caller.ae_title]
                # one entry without hosts allows any host for that title
                self._callers[caller.ae_title] = None if previous is None or not nets else previous + nets
            else:
                self._callers[caller.ae_title] = nets or None

    def check(self, called_ae: str, calling_ae: str, host: str) -> Rejection | None:
        """``None`` to accept, or the rejection to send."""
        if called_ae not in self.ae_titles:
            return Rejection(0x01, 0x01, 0x07, f"called AE title {called_ae!r} is not one of {sorted(self.ae_titles)}")
        if self.allow_any_caller:
            return None
        if calling_ae not in self._callers:
            return Rejection(0x01, 0x01, 0x03, f"calling AE title {calling_ae!r} is not in listener.allowed_callers")
        nets = self._callers[calling_ae]
        if nets is None:
            return None
        address = _peer_address(host)
        if address is None or not any(address in net for net in nets):
            return Rejection(
                0x01, 0x01, 0x03, f"host {host} is not among the hosts allowed for calling AE title {calling_ae!r}"
            )
        return None


class _GatedACSE(ACSE):
    """pynetdicom's ACSE with the node's caller check in front of the negotiation."""

    def __init__(self, assoc: Association, policy: CallerPolicy) -> None:
        super().__init__(assoc)
        self._policy = policy

    def _negotiate_as_acceptor(self) -> None:
        request = self.requestor.primitive
        called = str(request.called_ae_title).strip()
        calling = str(request.calling_ae_title).strip()
        host = self.assoc.requestor.address
        rejection = self._policy.check(called, calling, host)
        if rejection is not None:
            log.warning("association from %s@%s to %s rejected: %s", calling, host, called, rejection.reason)
            self.requestor.ae_title = calling
            self.send_reject(rejection.result, rejection.source, rejection.diagnostic)
            evt.trigger(self.assoc, evt.EVT_REJECTED, {})
            self.assoc.kill()
            return
        # answer under the title that was called (the AE serves several)
        self.acceptor.ae_title = called
        super()._negotiate_as_acceptor()


class _GatedRequestHandler(RequestHandler):
    server: _NodeServer

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        assoc.acse = _GatedACSE(assoc, self.server.caller_policy)
        return assoc


class _NodeServer(ThreadedAssociationServer):
    def __init__(self, *args: Any, caller_policy: CallerPolicy, **kwargs: Any) -> None:
        self.caller_policy = caller_policy
        super().__init__(*args, request_handler=_GatedRequestHandler, **kwargs)


# --------------------------------------------------------------------------- C-STORE


def sop_class_uid(name_or_uid: str) -> UID:
    """A SOP class given in node.yaml as a pynetdicom name (``MRImageStorage``) or a UID."""
    found = getattr(sop_class, name_or_uid, None)
    if isinstance(found, UID):
        return found
    uid = UID(name_or_uid)
    if not uid.is_valid:
        raise ValueError(f"{name_or_uid!r} is neither a pynetdicom SOP class name nor a valid UID")
    return uid


_TAGS = [
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "PatientID",
    "PatientName",
    "AccessionNumber",
    "StudyDescription",
    "Modality",
    "SeriesDescription",
    "SeriesNumber",
]


def _text(ds: Any, keyword: str, limit: int) -> str | None:
    value = ds.get(keyword)
    if value is None or str(value) == "":
        return None
    return str(value)[:limit]


def _int(ds: Any, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


_PIXEL_TAGS = ["Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "NumberOfFrames", "PixelData"]


def pixel_data_problem(data: bytes) -> str | None:
    """Why the Pixel Data of an encoded data set is incomplete, or ``None`` when it is whole.

    pydicom reads an element cut short without complaint, so a file truncated inside its
    pixels would otherwise be acknowledged and stored.  Native pixel data must hold at least
    Rows x Columns x Samples x BitsAllocated/8 x Frames bytes; encapsulated (compressed) pixel
    data must end with its sequence delimiter.  A data set without Pixel Data is not judged here.
    """
    ds = dcmread(BytesIO(data), specific_tags=_PIXEL_TAGS)
    if "PixelData" not in ds:
        return None
    element = ds["PixelData"]
    if element.is_undefined_length:
        # the item and sequence delimiters of encapsulated data: FFFE,E0DD with a zero length
        delimiter = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
        if delimiter not in data[-4096:]:
            return "the encapsulated Pixel Data ends without its sequence delimiter (the data set is cut short)"
        return None
    try:
        expected = (
            int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1)
            * int(ds.BitsAllocated) * int(ds.get("NumberOfFrames", 1) or 1) // 8
        )
    except (AttributeError, TypeError, ValueError) as exc:
        return f"the image size attributes cannot be read: {exc}"
    found = len(element.value or b"")
    if found < expected:
        return f"Pixel Data holds {found} bytes where the image size needs {expected} (the data set is cut short)"
    return None


def _uid_value(ds: Any, keyword: str) -> object:
    """The element's value as a string only when it is encoded as UI: a UID sent with another
    VR (e.g. US, whose binary 1 would read as the valid-looking UID "1") stays a non-string and
    fails validation."""
    if keyword not in ds:
        return None
    element = ds.data_element(keyword)
    if element is None or element.value is None:
        return None
    return str(element.value) if element.VR == "UI" else element.value


#: what pydicom raises on a data set it cannot read (it is lenient: most damage still parses)
#: RecursionError: sequences nested a few hundred deep exhaust pydicom's recursive reader
_PARSE_ERRORS = (
    InvalidDicomError, ValueError, EOFError, OSError, KeyError, NotImplementedError, RecursionError, struct.error,
    zlib.error,
)


@dataclass
class _Incoming:
    """One received instance on its way through :class:`StoreReceiver`."""

    ds: Any
    study_uid: str
    series_uid: str
    sop_uid: str
    who: str
    transfer_syntax_uid: str = ""
    calling_ae_title: str = ""
    peer_host: str = ""

    @property
    def where(self) -> str:
        return f"study {self.study_uid}, series {self.series_uid}, SOP instance {self.sop_uid}"


class StoreReceiver:
    """Everything the C-STORE handler needs, and the handling itself, network-free.

    :meth:`receive` takes the file bytes as received plus the association facts and
    returns the DIMSE status; :func:`handle_store` only extracts those from the pynetdicom
    event.
    """

    def __init__(
        self,
        storage: Storage,
        session_factory: sessionmaker[Session],
        *,
        duplicate_policy: str,
        accept_sop_classes: Iterable[str],
        ignore_sop_classes: Iterable[str] = (),
        on_instance_stored: InstanceStoredCallback | None = None,
        log_phi: bool = False,
    ) -> None:
        self.storage = storage
        self.session_factory = session_factory
        self.duplicate_policy = duplicate_policy
        self.accept_sop_classes = frozenset(sop_class_uid(s) for s in accept_sop_classes)
        self.ignore_sop_classes = frozenset(sop_class_uid(s) for s in ignore_sop_classes)
        self.on_instance_stored = on_instance_stored
        self.log_phi = log_phi

    @classmethod
    def from_config(
        cls,
        config: NodeConfig,
        storage: Storage,
        session_factory: sessionmaker[Session],
        on_instance_stored: InstanceStoredCallback | None = None,
    ) -> StoreReceiver:
        listener = config.listener
        return cls(
            storage,
            session_factory,
            duplicate_policy=listener.duplicate_policy,
            accept_sop_classes=listener.accept_sop_classes,
            ignore_sop_classes=listener.ignore_sop_classes,
            on_instance_stored=on_instance_stored,
            log_phi=config.logging.log_phi,
        )

    def _event(self, kind: str, message: str, incoming: _Incoming) -> None:
        """Audit a refusal; a database failure here is logged, the status is already decided."""
        try:
            with session_scope(self.session_factory) as session:
                add_event(
                    session,
                    kind,
                    message,
                    study_instance_uid=incoming.study_uid,
                    series_instance_uid=incoming.series_uid,
                    sop_instance_uid=incoming.sop_uid,
                )
        except SQLAlchemyError as exc:
            log.error("could not record the %s event for %s: %s", kind, incoming.where, exc)

    def receive(
        self,
        data: bytes,
        *,
        context_sop_class_uid: str,
        transfer_syntax_uid: str,
        affected_sop_instance_uid: str,
        calling_ae_title: str,
        peer_host: str,
    ) -> int:
        """Store one instance and return the C-STORE status (see :class:`StoreStatus`).

        ``data`` is the complete file as received: preamble, file meta, encoded data set.
        """
        who = f"{calling_ae_title}@{peer_host}"
        context_class = UID(context_sop_class_uid)
        if context_class in self.ignore_sop_classes:
            log.info(
                "ignored SOP instance %s of %s from %s (listener.ignore_sop_classes)",
                affected_sop_instance_uid,
                context_class.name,
                who,
            )
            return StoreStatus.SUCCESS
        if context_class not in self.accept_sop_classes:
            log.warning(
                "refused SOP instance %s from %s: SOP class %s is not accepted",
                affected_sop_instance_uid,
                who,
                context_class,
            )
            return StoreStatus.SOP_CLASS_NOT_SUPPORTED

        incoming = self._parse(data, context_class, str(affected_sop_instance_uid), who)
        if isinstance(incoming, int):
            return incoming
        incoming.transfer_syntax_uid = str(transfer_syntax_uid)
        incoming.calling_ae_title = calling_ae_title
        incoming.peer_host = peer_host

        status = self._check_other_location(incoming)
        if status is not None:
            return status

        try:
            stored = self.storage.store(
                data, incoming.study_uid, incoming.series_uid, incoming.sop_uid, self.duplicate_policy  # type: ignore[arg-type]
            )
        except InsufficientStorageError as exc:
            log.error("refused %s from %s: out of space: %s", incoming.where, who, exc)
            return StoreStatus.OUT_OF_SPACE
        except DuplicateConflictError as exc:
            log.warning("refused %s from %s: %s", incoming.where, who, exc)
            self._event("duplicate_refused", f"from {who}; different content", incoming)
            return StoreStatus.DUPLICATE_SOP_INSTANCE
        except OSError as exc:
            log.error("refused %s from %s: writing the file failed: %s", incoming.where, who, exc)
            return StoreStatus.STORAGE_WRITE_FAILED
        return self._record(stored, incoming)

    def _parse(self, data: bytes, context_class: UID, affected_sop_uid: str, who: str) -> _Incoming | int:
        """The identifying attributes of the data set, checked; or the refusal status."""
        try:
            ds = dcmread(BytesIO(data), stop_before_pixels=True, specific_tags=_TAGS)
        except _PARSE_ERRORS as exc:
            log.warning("refused SOP instance %s from %s: the data set cannot be parsed: %s", affected_sop_uid, who, exc)
            return StoreStatus.UNPARSABLE_DATASET

        raw = {key: _uid_value(ds, key) for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")}
        try:
            uids = {key: validate_uid(key, value) for key, value in raw.items()}
        except InvalidUIDError as exc:
            log.warning(
                "refused SOP instance %s from %s (study %s, series %s): %s",
                affected_sop_uid,
                who,
                raw["StudyInstanceUID"],
                raw["SeriesInstanceUID"],
                exc,
            )
            return StoreStatus.INVALID_UIDS
        incoming = _Incoming(ds, uids["StudyInstanceUID"], uids["SeriesInstanceUID"], uids["SOPInstanceUID"], who)
        if incoming.sop_uid != affected_sop_uid.rstrip("\0 "):
            log.warning(
                "refused %s from %s: the command's Affected SOP Instance UID is %s", incoming.where, who, affected_sop_uid
            )
            return StoreStatus.SOP_INSTANCE_UID_MISMATCH
        try:
            problem = pixel_data_problem(data)
        except (*_PARSE_ERRORS, AttributeError, TypeError) as exc:
            problem = f"the pixel data cannot be parsed: {exc}"
        if problem is not None:
            log.warning("refused %s from %s: %s", incoming.where, who, problem)
            return StoreStatus.UNPARSABLE_DATASET
        dataset_class = str(ds.get("SOPClassUID", ""))
        if dataset_class != context_class:
            log.warning(
                "refused %s from %s: data set SOP Class UID %r differs from the presentation context's %s",
                incoming.where,
                who,
                dataset_class,
                context_class,
            )
            return StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
        return incoming

    def _check_other_location(self, incoming: _Incoming) -> int | None:
        """A SOP Instance UID already stored under another study or series: the file layout
        cannot see that conflict, so the database is asked.  Returns a final status, or
        ``None`` to go on storing (no conflict, or ``overwrite``, which moves the instance)."""
        where, who = incoming.where, incoming.who
        try:
            with session_scope(self.session_factory) as session:
                row = session.execute(
                    select(Series.series_instance_uid, Study.study_instance_uid)
                    .select_from(Instance)
                    .join(Series, Instance.series_id == Series.id)
                    .join(Study, Series.study_id == Study.id)
                    .where(Instance.sop_instance_uid == incoming.sop_uid)
                ).one_or_none()
        except SQLAlchemyError as exc:
            log.error("refused %s from %s: the database is unavailable: %s", where, who, exc)
            return StoreStatus.DATABASE_UNAVAILABLE
        if row is None or (row.series_instance_uid, row.study_instance_uid) == (incoming.series_uid, incoming.study_uid):
            return None
        moved = f"it is stored under study {row.study_instance_uid}, series {row.series_instance_uid}"
        if self.duplicate_policy == "keep_first":
            log.info("kept the first copy of %s from %s (duplicate_policy keep_first): %s", where, who, moved)
            self._event("duplicate_kept_first", f"from {who}; {moved}", incoming)
            return StoreStatus.SUCCESS
        if self.duplicate_policy == "reject_if_different":
            log.warning("refused %s from %s (duplicate_policy reject_if_different): %s", where, who, moved)
            self._event("duplicate_refused", f"from {who}; {moved}", incoming)
            return StoreStatus.DUPLICATE_SOP_INSTANCE
        log.info("%s from %s moves the instance (duplicate_policy overwrite): %s", where, who, moved)
        return None

    def _record(self, stored: StoredInstance, incoming: _Incoming) -> int:
        """Commit the rows, then finish the file; undo the file if the rows cannot be committed."""
        ds, where, who = incoming.ds, incoming.where, incoming.who
        patient_id = _text(ds, "PatientID", 64)
        info = ReceivedInstance(
            study_instance_uid=incoming.study_uid,
            series_instance_uid=incoming.series_uid,
            sop_instance_uid=incoming.sop_uid,
            sop_class_uid=str(ds.SOPClassUID),
            transfer_syntax_uid=incoming.transfer_syntax_uid,
            path=stored.relative_path,
            size_bytes=stored.size_bytes,
            sha256=stored.sha256,
            received_at=utcnow(),
            calling_ae_title=incoming.calling_ae_title or None,
            peer_host=incoming.peer_host or None,
            patient_id_hash=hash_patient_id(patient_id) if patient_id else None,
            accession_number=_text(ds, "AccessionNumber", 16),
            study_description=_text(ds, "StudyDescription", 64),
            modality=_text(ds, "Modality", 16),
            series_description=_text(ds, "SeriesDescription", 64),
            series_number=_int(ds, "SeriesNumber"),
        )
        try:
            with session_scope(self.session_factory) as session:
                result = record_instance(session, info, content_changed=stored.changed)
                previous_path, changed = result.previous_path, result.changed
        except SeriesStudyMismatchError as exc:
            stored.undo()
            log.warning("refused %s from %s: %s", where, who, exc)
            self._event("series_in_other_study", f"from {who}; {exc}", incoming)
            return StoreStatus.SERIES_IN_OTHER_STUDY
        except SQLAlchemyError as exc:
            stored.undo()
            log.error("refused %s from %s: the database is unavailable, the file was not kept: %s", where, who, exc)
            return StoreStatus.DATABASE_UNAVAILABLE
        except BaseException:
            stored.undo()
            raise
        stored.finalize()
        if previous_path is not None and previous_path != stored.relative_path:
            try:
                self.storage.remove(previous_path)
            except OSError as exc:
                log.warning("%s moved; its old file %s could not be removed: %s", where, previous_path, exc)

        phi = f", patient {ds.get('PatientName', '')!s} ({patient_id or ''})" if self.log_phi else ""
        log.info(
            "%s %s from %s, %s, %d bytes%s",
            stored.outcome.value,
            where,
            who,
            UID(incoming.transfer_syntax_uid).name,
            stored.size_bytes,
            phi,
        )
        if changed and self.on_instance_stored is not None:
            try:
                self.on_instance_stored(incoming.study_uid, incoming.series_uid)
            except Exception:  # noqa: BLE001 - the instance is committed; the hook must not fail the C-STORE
                log.exception("on_instance_stored failed for %s (the instance is stored and recorded)", where)
        return StoreStatus.SUCCESS


def handle_store(event: evt.Event, receiver: StoreReceiver) -> int:
    """pynetdicom ``EVT_C_STORE`` handler (an intervention event: the return is the status)."""
    requestor = event.assoc.requestor
    return receiver.receive(
        event.encoded_dataset(include_meta=True),
        context_sop_class_uid=event.context.abstract_syntax,
        transfer_syntax_uid=event.context.transfer_syntax,
        affected_sop_instance_uid=event.request.AffectedSOPInstanceUID,
        calling_ae_title=str(requestor.ae_title).strip(),
        peer_host=requestor.address,
    )


def handle_echo(event: evt.Event) -> int:
    """``EVT_C_ECHO``: success, logged at debug level."""
    log.debug("C-ECHO from %s@%s", event.assoc.requestor.ae_title, event.assoc.requestor.address)
    return 0x0000


# --------------------------------------------------------------------------- listener


def make_ssl_context(config: NodeConfig) -> ssl.SSLContext | None:
    """Server-side TLS context from ``listener.tls`` (``None`` when TLS is off)."""
    tls = config.listener.tls
    if not tls.enabled:
        return None
    from pathlib import Path

    def path(key: str) -> str:
        value = getattr(tls, key)
        resolved = config.resolve(Path(value))
        if not resolved.is_file():
            raise FileNotFoundError(f"listener.tls.{key}: {resolved} does not exist")
        return str(resolved)

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(path("certificate"), path("private_key"))
    if tls.require_client_certificate:
        if not tls.ca_certificates:
            raise ValueError("listener.tls.ca_certificates is required when require_client_certificate is true")
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.verify_mode = ssl.CERT_NONE
    if tls.ca_certificates:
        context.load_verify_locations(cafile=path("ca_certificates"))
    return context


class Listener:
    """The running DICOM listener of the node: ``start()``, ``stop()``, ``active_associations``."""

    def __init__(
        self,
        config: NodeConfig,
        storage: Storage,
        session_factory: sessionmaker[Session],
        on_instance_stored: InstanceStoredCallback | None = None,
        *,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.config = config
        self.receiver = StoreReceiver.from_config(config, storage, session_factory, on_instance_stored)
        self.caller_policy = CallerPolicy(config.listener)
        self._ssl_context = ssl_context if ssl_context is not None else make_ssl_context(config)
        self._server: _NodeServer | None = None
        self._thread: threading.Thread | None = None
        self._ae: AE | None = None

    def _make_ae(self) -> AE:
        listener = self.config.listener
        ae = AE(ae_title=listener.ae_titles[0])
        ae.maximum_associations = listener.max_associations
        ae.require_called_aet = True  # checked against the title the caller chose (see _GatedACSE)
        ae.require_calling_aet = []  # the CallerPolicy decides, with hosts
        ae.add_supported_context(sop_class.Verification)
        for name in (*listener.accept_sop_classes, *listener.ignore_sop_classes):
            ae.add_supported_context(sop_class_uid(name), ALL_TRANSFER_SYNTAXES)
        return ae

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) the listener is bound to."""
        if self._server is None:
            raise RuntimeError("the listener is not running")
        return self._server.server_address[:2]  # type: ignore[return-value]

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def active_associations(self) -> int:
        """Associations in progress (for /healthz)."""
        return len(self._server.active_associations) if self._server is not None else 0

    def start(self) -> None:
        """Bind and serve in a background thread; raises ``OSError`` if the port is taken."""
        if self._server is not None:
            raise RuntimeError("the listener is already running")
        listener = self.config.listener
        self.receiver.storage.remove_stale_temporaries()
        ae = self._make_ae()
        handlers = [
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, handle_store, [self.receiver]),
        ]
        server = ae.make_server(
            (listener.bind_address, listener.port),
            ae_title=listener.ae_titles[0],
            ssl_context=self._ssl_context,
            evt_handlers=handlers,
            server_class=_NodeServer,
            caller_policy=self.caller_policy,
        )
        ae._servers.append(server)  # as AE.start_server does, so ae.shutdown() finds it
        # the poll interval bounds how long stop() waits for the accept loop to notice
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="orthonode-listener", daemon=True
        )
        thread.start()
        self._ae, self._server, self._thread = ae, server, thread
        log.info(
            "listening on %s:%d as %s (TLS %s)",
            listener.bind_address,
            listener.port,
            ", ".join(listener.ae_titles),
            "on" if self._ssl_context else "off",
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, give running associations ``timeout`` seconds, then abort them."""
        server, thread = self._server, self._thread
        if server is None:
            return
        server.shutdown()
        deadline = time.monotonic() + timeout
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in server.active_associations:
            log.warning("aborting association from %s at shutdown", assoc.requestor.ae_title)
            assoc.abort()
        if thread is not None:
            thread.join(timeout=5)
        self._server = self._thread = self._ae = None
        log.info("listener stopped")

    def __enter__(self) -> Listener:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
