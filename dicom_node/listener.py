"""The node's DICOM listener: C-ECHO and C-STORE on one pynetdicom AE.

The association policy (called and calling AE titles, hosts, the association limit), the
C-STORE checks and their DIMSE statuses, durable storage with group commit, and start-up
recovery of rows without files.  What happens to an association and an instance, and why, is
in ``docs/ingest.md``.
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
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import nullcontext
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt, sop_class
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer
from sqlalchemy import select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import ListenerSection, NodeConfig
from dicom_node.db import (
    RECENT_INSTANCES_CHECKED,
    EventKind,
    ReceivedInstance,
    RecordedFile,
    RecordResult,
    SeriesStudyMismatchError,
    Study,
    add_event,
    forget_instances,
    newest_instances,
    hash_patient_id,
    record_received,
    session_scope,
    utcnow,
)
from dicom_node.services.retention import StudyGuard
from dicom_node.storage import (
    DuplicateConflictError,
    InsufficientStorageError,
    InvalidUIDError,
    Storage,
    StoredInstance,
    sync_directories,
    validate_uid,
)
from inference.series import expected_pixel_bytes

log = logging.getLogger(__name__)

#: signature of the hook the study assembler provides
InstanceStoredCallback = Callable[[str, str], None]
#: ``(reason, message)`` of an association rejected at negotiation (see :class:`Rejection`)
AssociationRejectedCallback = Callable[[str, str], None]

#: largest P-DATA PDU the listener accepts (bytes).  pynetdicom's default (16 KiB) cuts a
#: 128 KiB image into eight PDUs, each decoded and queued in Python; 4 MiB takes most images
#: in one, and the memory is the data set's anyway (it is held whole before it is stored).
MAXIMUM_PDU_SIZE = 4 * 1024 * 1024
#: most instances committed in one database transaction by :class:`GroupRecorder`
GROUP_COMMIT_MAX = 64


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
    #: general failure "Processing failure": an unexpected error in the node (logged with its
    #: traceback); nothing of the instance was kept.  Never the answer to any known input
    PROCESSING_FAILURE = 0x0110


# --------------------------------------------------------------------------- callers


@dataclass(frozen=True)
class Rejection:
    """An A-ASSOCIATE-RJ (result, source, diagnostic), the reason for the log, and ``kind``,
    the short reason counted in /metrics (``called_ae_title``, ``calling_ae_title``, ``host``
    or ``too_many_associations``)."""

    result: int
    source: int
    diagnostic: int
    reason: str
    kind: str


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
            return Rejection(
                0x01, 0x01, 0x07, f"called AE title {called_ae!r} is not one of {sorted(self.ae_titles)}", "called_ae_title"
            )
        if self.allow_any_caller:
            return None
        if calling_ae not in self._callers:
            return Rejection(
                0x01, 0x01, 0x03, f"calling AE title {calling_ae!r} is not in listener.allowed_callers", "calling_ae_title"
            )
        nets = self._callers[calling_ae]
        if nets is None:
            return None
        address = _peer_address(host)
        if address is None or not any(address in net for net in nets):
            return Rejection(
                0x01,
                0x01,
                0x03,
                f"host {host} is not among the hosts allowed for calling AE title {calling_ae!r}",
                "host",
            )
        return None


class _GatedACSE(ACSE):
    """pynetdicom's ACSE with the node's caller check and association limit in front of the
    negotiation, so every rejection is logged and reported the same way."""

    def __init__(self, assoc: Association, policy: CallerPolicy, on_rejected: AssociationRejectedCallback | None) -> None:
        super().__init__(assoc)
        self._policy = policy
        self._on_rejected = on_rejected

    def _over_limit(self) -> Rejection | None:
        # the same test pynetdicom makes after this check (this association is among the active)
        limit = self.assoc.ae.maximum_associations
        active = sum(1 for a in self.assoc.ae.active_associations if a.is_acceptor)
        if active > limit:
            return Rejection(
                0x02, 0x03, 0x02, f"{active - 1} associations are open, listener.max_associations is {limit}",
                "too_many_associations",
            )
        return None

    def _negotiate_as_acceptor(self) -> None:
        request = self.requestor.primitive
        called = str(request.called_ae_title).strip()
        calling = str(request.calling_ae_title).strip()
        host = self.assoc.requestor.address
        rejection = self._policy.check(called, calling, host) or self._over_limit()
        if rejection is not None:
            log.warning("association from %s@%s to %s rejected: %s", calling, host, called, rejection.reason)
            if self._on_rejected is not None:
                self._on_rejected(rejection.kind, f"{calling}@{host} to {called}: {rejection.reason}")
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
        assoc.acse = _GatedACSE(assoc, self.server.caller_policy, self.server.on_rejected)
        return assoc


class _NodeServer(ThreadedAssociationServer):
    def __init__(
        self,
        *args: Any,
        caller_policy: CallerPolicy,
        on_rejected: AssociationRejectedCallback | None = None,
        **kwargs: Any,
    ) -> None:
        self.caller_policy = caller_policy
        self.on_rejected = on_rejected
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


def pixel_data_problem(ds: Any, data: bytes) -> str | None:
    """Why the Pixel Data of an encoded data set is incomplete, or ``None`` when it is whole.

    ``ds`` is ``data`` read with at least the tags of :data:`_PIXEL_TAGS` (the receiver reads
    them in its one header parse).

    pydicom reads an element cut short without complaint, so a file truncated inside its
    pixels would otherwise be acknowledged and stored.  Native pixel data must hold at least
    Rows x Columns x Samples x BitsAllocated/8 x Frames bytes; encapsulated (compressed) pixel
    data must end with its sequence delimiter.  A data set without Pixel Data is not judged here.
    """
    if "PixelData" not in ds:
        return None
    element = ds["PixelData"]
    if element.is_undefined_length:
        # the item and sequence delimiters of encapsulated data: FFFE,E0DD with a zero length
        delimiter = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
        if delimiter not in data[-4096:]:
            return "the encapsulated Pixel Data ends without its sequence delimiter (the data set is cut short)"
        return None
    expected = expected_pixel_bytes(ds)
    if expected is None:
        return "the image size attributes (Rows, Columns, Bits Allocated, Samples per Pixel, Number of Frames) cannot be read"
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


@dataclass
class _Pending:
    """One instance waiting in :class:`GroupRecorder` for its row to be committed."""

    info: ReceivedInstance
    stored: StoredInstance
    move: bool
    result: RecordResult | None = None
    error: BaseException | None = None
    done: bool = False


class GroupRecorder:
    """Commits the rows of stored instances, several per transaction when they arrive together.

    Group commit without a thread of its own: the first handler to arrive becomes the leader
    and commits every instance queued at that moment (up to ``max_batch``) in one transaction,
    after one fsync per folder for their new file names; handlers arriving meanwhile queue up
    and the next leader takes them all.  :meth:`record` returns only once the caller's own row
    is committed (or raises why it is not), so the C-STORE is still acknowledged only after
    its data is durable.  With a single sender each batch holds one instance and this is the
    plain one-transaction-per-instance path.

    The folder fsyncs run on a helper thread while the leader executes the statements and
    commits, so the folder fsync and the database's own sync overlap; every handler of the
    batch still waits for both.  Once its rows are committed the leader hands the lead on and
    only then waits for its folder fsync, so the next batch's statements run meanwhile.  A
    batch that *updates* a row for a file whose folder entry is pending (an overwrite, a move)
    commits only after the fsync, so an acknowledged row is never replaced by one naming a
    file that could be lost (see :func:`_may_commit_before_folder_sync`).  Rows committed ahead
    of their folder fsync belong to the handlers still waiting, at most one per open
    association, hence the newest rows: the start-up check
    (:meth:`StoreReceiver.forget_rows_without_files`) looks at those.
    """

    def __init__(self, session_factory: sessionmaker[Session], max_batch: int = GROUP_COMMIT_MAX) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.session_factory = session_factory
        self.max_batch = max_batch
        self._cond = threading.Condition()
        self._queue: list[_Pending] = []
        self._leading = False
        self._syncer: ThreadPoolExecutor | None = None
        #: transactions committed and instances in them (for tests and diagnostics)
        self.batches = 0
        self.instances = 0

    def record(self, info: ReceivedInstance, stored: StoredInstance, *, move: bool) -> RecordResult:
        """Record one instance (see :func:`dicom_node.db.record_received` for ``move``).

        Raises :class:`SeriesStudyMismatchError`, :class:`sqlalchemy.exc.SQLAlchemyError`
        (nothing of this instance was committed) or :class:`OSError` (a folder fsync failed).
        """
        item = _Pending(info, stored, move)
        with self._cond:
            self._queue.append(item)
            while not item.done:
                if self._leading or not self._queue:  # an empty queue: this item is in a batch in flight
                    self._cond.wait()
                    continue
                self._leading = True
                batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
                self._cond.release()
                leading = True
                try:
                    sync = self._commit(batch)
                    if sync is not None:
                        # committed; the next batch may start while this one's folder fsync ends
                        with self._cond:
                            self._leading = leading = False
                            self._cond.notify_all()
                        self._finish(batch, sync)
                except BaseException as exc:
                    for p in batch:
                        if p.result is None and p.error is None:
                            p.error = exc
                    raise
                finally:
                    self._cond.acquire()
                    if leading:
                        self._leading = False
                    for p in batch:
                        p.done = True
                    self._cond.notify_all()
        if item.error is not None:
            raise item.error
        assert item.result is not None
        return item.result

    def close(self) -> None:
        """Stop the folder-fsync helper thread (a later :meth:`record` starts it again)."""
        with self._cond:
            syncer, self._syncer = self._syncer, None
        if syncer is not None:
            syncer.shutdown(wait=True)

    def _commit(self, batch: list[_Pending]) -> Future[None] | None:
        """Commit the batch (one by one if together fails); returns the folder fsync still to
        wait for (:meth:`_finish`) when the rows committed before it, else ``None``."""
        try:
            return self._commit_together(batch)
        except (SQLAlchemyError, OSError) as exc:
            if len(batch) == 1:
                batch[0].result, batch[0].error = None, exc
                return None
            log.warning("committing %d instances together failed (%s); committing them one by one", len(batch), exc)
        for p in batch:  # one instance's failure must not refuse the others
            p.result = p.error = None
            try:
                sync = self._commit_together([p])
                if sync is not None:
                    self._finish([p], sync)
            except (SQLAlchemyError, OSError) as exc:
                p.result, p.error = None, exc
        return None

    def _commit_together(self, batch: list[_Pending]) -> Future[None] | None:
        """One transaction for the batch; sets each item's result or error.  Returns the folder
        fsync to wait for when the rows were allowed to commit before it
        (:func:`_may_commit_before_folder_sync`), else ``None`` (the fsync is done)."""
        pending = [p.stored for p in batch if p.stored.directory_pending]
        sync = None
        if pending:
            with self._cond:
                if self._syncer is None:
                    self._syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="orthonode-fsync")
                syncer = self._syncer
            sync = syncer.submit(sync_directories, pending)
        outcomes: list[RecordResult | SeriesStudyMismatchError] = []
        early = False
        try:
            with session_scope(self.session_factory) as session:
                connection = session.connection()
                for p in batch:
                    try:
                        outcomes.append(record_received(connection, p.info, content_changed=p.stored.changed, move=p.move))
                    except SeriesStudyMismatchError as exc:  # raised before it wrote anything
                        outcomes.append(exc)
                early = sync is not None and _may_commit_before_folder_sync(batch, outcomes, connection.dialect.name)
                if sync is not None and not early:
                    sync.result()  # the folder entries are durable before the rows naming them commit
        except BaseException:
            if sync is not None:
                wait([sync])
            raise
        self.batches += 1
        self.instances += len(batch)
        for p, outcome in zip(batch, outcomes):
            if isinstance(outcome, SeriesStudyMismatchError):
                p.error = outcome
            else:
                p.result = outcome
        return sync if early else None

    def _finish(self, batch: list[_Pending], sync: Future[None]) -> None:
        """Wait for the folder fsync of a batch whose rows are committed: no success goes back
        before the folder entries are durable.  If it failed, the rows of the instances whose
        entry was pending are removed again and those instances get the error."""
        try:
            sync.result()
        except OSError as exc:
            failed = [p for p in batch if p.result is not None and p.stored.directory_pending]
            self._forget_committed(failed)
            for p in failed:
                p.result, p.error = None, exc

    def _forget_committed(self, failed: list[_Pending]) -> None:
        """Rows committed before their folder fsync, which then failed: remove them, so that
        the state is as before (the handlers refuse the instances and remove their files; a
        resend stores them again).  If the database fails here too, the rows stay: the start-up
        check (:meth:`StoreReceiver.forget_rows_without_files`) removes them if their files are
        gone."""
        forget = [
            RecordedFile(p.result.instance_id, p.info.study_instance_uid, p.info.series_instance_uid,
                         p.info.sop_instance_uid, p.info.path)
            for p in failed
            if p.result is not None and p.result.inserted
        ]
        if not forget:
            return
        try:
            with session_scope(self.session_factory) as session:
                forget_instances(session.connection(), forget, "the folder fsync failed after the row was committed; "
                                 "the instance was refused")
        except SQLAlchemyError as exc:
            log.error("the folder fsync failed after %d row(s) were committed, and removing them failed too: %s",
                      len(forget), exc)


def _studies_being_purged(connection: Connection, study_uids: set[str]) -> set[str]:
    """The studies among ``study_uids`` whose retention purge is marked and not finished
    (``studies.purge_started_at``, see :mod:`dicom_node.retention`): their files may be half
    deleted on purpose."""
    if not study_uids:
        return set()
    studies = Study.__table__
    return set(connection.scalars(
        select(studies.c.study_instance_uid)
        .where(studies.c.study_instance_uid.in_(study_uids), studies.c.purge_started_at.is_not(None))
    ))


def _may_commit_before_folder_sync(
    batch: list[_Pending], outcomes: list[RecordResult | SeriesStudyMismatchError], dialect: str
) -> bool:
    """Whether a batch's rows may commit while its folder entries are still being fsynced.

    The commit's own fsync (SQLite's WAL) then overlaps the folder fsyncs instead of following
    them; the handlers still answer only after both.  It is safe when every instance whose
    folder entry is pending is a *new* row: if the node stops (power loss) between the commit
    and the end of the folder fsync, such a row may name a file whose entry was lost, and it
    was never acknowledged, so the start-up check removes it and nothing else is touched.  A
    row that was updated (an overwrite, a move to another series) described an acknowledged
    instance before; it must not name a file that could vanish, so such a batch commits after
    the fsync, as before.  The file itself is whole whatever happens: its data were fsynced
    before its name was made (see :meth:`dicom_node.storage.Storage.store`).

    Only on SQLite, the database of one node process: the start-up check looks at the newest
    rows, which are then this node's last batch.  Several nodes may share a PostgreSQL
    database, where the newest rows need not be this node's, so there the commit keeps
    waiting for the folder fsync.
    """
    if dialect != "sqlite":
        return False
    for p, outcome in zip(batch, outcomes):
        if p.stored.directory_pending and isinstance(outcome, RecordResult) and not outcome.inserted:
            return False
    return True


#: elements whose values follow from the encoding, not from the instance: the pixel data, their
#: planar arrangement, the lossy-compression flags and trailing padding; the file meta group and
#: group lengths are left out separately
_ENCODING_TAGS = frozenset({0x7FE00010, 0x00280006, 0x00282110, 0x00282112, 0x00282114, 0xFFFCFFFC})


def same_instance_content(stored: Path, data: bytes) -> bool:
    """True when ``data`` (a received file) holds the instance stored in ``stored`` in another
    encoding: every data element but those of :data:`_ENCODING_TAGS` equal, and the decoded pixels
    equal (a lossless re-encoding).  Anything that cannot be read or decoded counts as different.

    Only the rare path of a refused duplicate pays for this (two full parses and pixel decodes).
    """
    import numpy as np

    def content(ds: Any) -> tuple[dict[int, Any], Any]:
        elements = {
            int(e.tag): e.value for e in ds
            if int(e.tag) not in _ENCODING_TAGS and e.tag.group != 0x0002 and e.tag.element != 0x0000
        }
        return elements, np.asarray(ds.pixel_array) if "PixelData" in ds else None

    try:
        old_elements, old_pixels = content(dcmread(stored))
        new_elements, new_pixels = content(dcmread(BytesIO(data)))
        if old_elements != new_elements:
            return False
    except Exception as exc:  # noqa: BLE001 - pydicom and the pixel decoders raise many kinds on damaged data
        log.info("comparing a duplicate with %s: not comparable (%s: %s)", stored.name, type(exc).__name__, exc)
        return False
    if old_pixels is None or new_pixels is None:
        return old_pixels is None and new_pixels is None
    return old_pixels.shape == new_pixels.shape and bool(np.array_equal(old_pixels, new_pixels))


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
        self.recorder = GroupRecorder(session_factory)
        self.holds: AssociationHolds | None = None
        #: shared per-study guard against the retention purge (:class:`dicom_node.retention.StudyGuard`):
        #: a study is never purged between writing an instance's file and committing its row
        self.study_guard: StudyGuard | None = None

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

    def _event(self, kind: EventKind, message: str, incoming: _Incoming) -> None:
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

    def close(self) -> None:
        """Release the recorder's helper thread (the listener calls it when it stops)."""
        self.recorder.close()

    def forget_rows_without_files(self, newest: int = RECENT_INSTANCES_CHECKED, at_most: int = 8) -> int:
        """Start-up check: remove the instance rows, among the ``newest`` rows, whose file is
        missing from a folder that exists; returns how many were removed.

        A batch of new rows may commit while the folder entries of its files are still being
        fsynced (:func:`_may_commit_before_folder_sync`); if the machine stops in between, a
        row can survive its file's name.  Such an instance was never acknowledged (the answer
        waits for both), so its sender sends it again; its row must not make the study look
        complete meanwhile.  Only rows of handlers that were still waiting can be affected, at
        most one per open association (:class:`GroupRecorder`), hence only the newest rows are
        checked, and the file's folder exists (folders are made durable before a file is
        written in them).

        What the crash cannot explain is left alone, with a log line: a missing folder (storage
        not mounted, a study deleted by hand), more missing files than ``at_most`` (the
        listener's association limit), and the studies whose retention purge was interrupted
        (:mod:`dicom_node.retention` finishes those itself).

        Run it before the study assembler and the workers start (:class:`Listener` does it when
        it is created).  Only on SQLite: on PostgreSQL the commit waits for the folder fsync,
        so there is nothing to repair, and the newest rows may be another node's, whose files
        this node's storage does not hold.
        """
        with session_scope(self.session_factory) as session:
            connection = session.connection()
            if connection.dialect.name != "sqlite":
                return 0
            missing, unexplained = [], []
            for row in newest_instances(connection, newest):
                path = self.storage.resolve(row.path)
                if not path.is_file():
                    (missing if path.parent.is_dir() else unexplained).append(row)
            purging = _studies_being_purged(connection, {r.study_instance_uid for r in missing})
            unexplained += [r for r in missing if r.study_instance_uid in purging]
            missing = [r for r in missing if r.study_instance_uid not in purging]
            if len(missing) > at_most:
                log.error(
                    "%d of the newest %d instance rows name files that are missing from their folders under %s; a "
                    "crash leaves at most %d (one per association): nothing is removed, check the storage",
                    len(missing), newest, self.storage.root, at_most,
                )
                return 0
            if missing:
                forget_instances(
                    connection, missing, "the file is missing at start-up: the row was committed in the last moments "
                    "before the node stopped and the instance was never acknowledged",
                )
        for r in unexplained:
            log.warning("the file %s of SOP instance %s is missing at start-up; its row is kept (its folder is "
                        "missing too, or the study's purge was interrupted)", r.path, r.sop_instance_uid)
        for r in missing:
            log.warning(
                "forgot study %s, series %s, SOP instance %s: its file %s is missing at start-up (recorded in the "
                "last moments before the node stopped and never acknowledged: the sender sends it again)",
                r.study_instance_uid, r.series_instance_uid, r.sop_instance_uid, r.path,
            )
        return len(missing)

    def receive(
        self,
        data: bytes,
        *,
        context_sop_class_uid: str,
        transfer_syntax_uid: str,
        affected_sop_instance_uid: str,
        calling_ae_title: str,
        peer_host: str,
        association: object | None = None,
    ) -> int:
        """Store one instance and return the C-STORE status (see :class:`StoreStatus`).

        ``data`` is the complete file as received: preamble, file meta, encoded data set.
        ``association`` (the pynetdicom association) lets :attr:`holds` hold the study in the
        assembler while that association is open.
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
        if self.holds is not None and association is not None:
            # before the instance is recorded, so that the assembler never sees it unheld
            self.holds.add(association, incoming.study_uid)

        guard = self.study_guard.receiving(incoming.study_uid) if self.study_guard is not None else nullcontext()
        with guard:
            return self._store_and_record(data, incoming)

    def _store_and_record(self, data: bytes, incoming: _Incoming) -> int:
        """Write the file, commit its rows; the C-STORE status."""
        who = incoming.who
        try:
            # the folder entry is made durable by the recorder, once per folder and batch
            stored = self.storage.store(
                data,
                incoming.study_uid,
                incoming.series_uid,
                incoming.sop_uid,
                self.duplicate_policy,  # type: ignore[arg-type]
                sync_directory=False,
            )
        except InsufficientStorageError as exc:
            log.error("refused %s from %s: out of space: %s", incoming.where, who, exc)
            return StoreStatus.OUT_OF_SPACE
        except DuplicateConflictError as exc:
            if same_instance_content(exc.path, data):
                # the same instance in another encoding (a PACS re-sending it compressed or not):
                # nothing differs but the bytes, so the first copy stays and the sender succeeds
                log.info(
                    "%s from %s: already stored in another encoding with the same header and pixels; "
                    "kept the first copy (%s)", incoming.where, who, exc.path.name,
                )
                self._event(EventKind.DUPLICATE_OTHER_ENCODING, f"from {who}; same header and pixels, kept", incoming)
                return StoreStatus.SUCCESS
            log.warning("refused %s from %s: %s", incoming.where, who, exc)
            self._event(EventKind.DUPLICATE_REFUSED, f"from {who}; different content", incoming)
            return StoreStatus.DUPLICATE_SOP_INSTANCE
        except OSError as exc:
            log.error("refused %s from %s: writing the file failed: %s", incoming.where, who, exc)
            return StoreStatus.STORAGE_WRITE_FAILED
        try:
            return self._record(stored, incoming)
        except BaseException:
            if not stored.finished:  # an error before the rows were committed: no file without its row
                stored.undo()
            raise

    def _parse(self, data: bytes, context_class: UID, affected_sop_uid: str, who: str) -> _Incoming | int:
        """The identifying attributes of the data set, checked; or the refusal status.

        One parse reads the identifying attributes and the image size attributes with the
        Pixel Data element (to see whether it is cut short); nothing else is decoded."""
        try:
            ds = dcmread(BytesIO(data), specific_tags=_TAGS + _PIXEL_TAGS)
        except _PARSE_ERRORS as exc:
            log.warning("refused SOP instance %s from %s: the data set cannot be parsed: %s", affected_sop_uid, who, exc)
            return StoreStatus.UNPARSABLE_DATASET
        # pydicom converts a value on first access: convert those read here at once, so that a
        # value it cannot convert (an unknown VR, a length that fits no value) refuses the data
        # set now, with its tag named, instead of raising later while the file is recorded
        for tag in list(ds.keys()):
            try:
                ds[tag]
            except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds here
                log.warning(
                    "refused SOP instance %s from %s: the data set cannot be parsed: the value of %s cannot be read: %s",
                    affected_sop_uid, who, tag, exc,
                )
                return StoreStatus.UNPARSABLE_DATASET
        if len(ds) == 0:
            # an empty data set; pydicom also returns no elements at all (with a warning) when a
            # data set ends inside its encapsulated pixel data: unparsable, not merely without UIDs
            log.warning(
                "refused SOP instance %s from %s: the data set holds no data element that could be read (it is "
                "empty, or cut short inside its encapsulated pixel data)", affected_sop_uid, who,
            )
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
            problem = pixel_data_problem(ds, data)
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

    def _stored_elsewhere(self, stored: StoredInstance, incoming: _Incoming, location: tuple[str, str]) -> int:
        """The SOP Instance UID is recorded under another study or series and the policy does
        not move it (``keep_first``, ``reject_if_different``): the file layout cannot see that
        conflict, the database did.  The file just written is dropped; returns the status."""
        where, who = incoming.where, incoming.who
        stored.undo()
        study_uid, series_uid = location
        moved = f"it is stored under study {study_uid}, series {series_uid}"
        if self.duplicate_policy == "keep_first":
            log.info("kept the first copy of %s from %s (duplicate_policy keep_first): %s", where, who, moved)
            self._event(EventKind.DUPLICATE_KEPT_FIRST, f"from {who}; {moved}", incoming)
            return StoreStatus.SUCCESS
        log.warning("refused %s from %s (duplicate_policy reject_if_different): %s", where, who, moved)
        self._event(EventKind.DUPLICATE_REFUSED, f"from {who}; {moved}", incoming)
        return StoreStatus.DUPLICATE_SOP_INSTANCE

    def _record(self, stored: StoredInstance, incoming: _Incoming) -> int:
        """Commit the rows (with the folder fsync), then finish the file; undo the file if the
        rows cannot be committed."""
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
            result = self.recorder.record(info, stored, move=self.duplicate_policy == "overwrite")
        except SeriesStudyMismatchError as exc:
            stored.undo()
            log.warning("refused %s from %s: %s", where, who, exc)
            self._event(EventKind.SERIES_IN_OTHER_STUDY, f"from {who}; {exc}", incoming)
            return StoreStatus.SERIES_IN_OTHER_STUDY
        except SQLAlchemyError as exc:
            stored.undo()
            log.error("refused %s from %s: the database is unavailable, the file was not kept: %s", where, who, exc)
            return StoreStatus.DATABASE_UNAVAILABLE
        except OSError as exc:
            stored.undo()
            log.error("refused %s from %s: making the file's folder entry durable failed: %s", where, who, exc)
            return StoreStatus.STORAGE_WRITE_FAILED
        except BaseException:
            stored.undo()
            raise
        if result.stored_elsewhere is not None:
            return self._stored_elsewhere(stored, incoming, result.stored_elsewhere)
        previous_path, changed = result.previous_path, result.changed
        if previous_path is not None:
            log.info("%s from %s moves the instance (duplicate_policy overwrite) from %s", where, who, previous_path)
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


class AssociationHolds:
    """The studies each open association has delivered to, held in the study assembler.

    A study is not queued while an association that sent part of it is still open (a sender
    that pauses longer than the quiet period would otherwise get a partial study processed).
    ``hold(study_uid)`` is called on an association's first instance of a study and
    ``release(study_uid)`` once per held study when the connection closes, however it ends
    (release, abort, network error).
    """

    def __init__(self, hold: Callable[[str], None], release: Callable[[str], None]) -> None:
        self._hold = hold
        self._release = release
        self._lock = threading.Lock()
        self._open: dict[int, set[str]] = {}

    def add(self, association: object, study_uid: str) -> None:
        key = id(association)
        with self._lock:
            studies = self._open.setdefault(key, set())
            if study_uid in studies:
                return
            studies.add(study_uid)
        self._hold(study_uid)

    def close(self, association: object) -> None:
        with self._lock:
            studies = self._open.pop(id(association), set())
        for study_uid in sorted(studies):
            try:
                self._release(study_uid)
            except Exception:  # noqa: BLE001 - a failed release must not stop the others; the forced limit still applies
                log.exception("releasing study %s after its association closed failed", study_uid)

    def open_studies(self) -> int:
        """Studies held by open associations (for tests and status)."""
        with self._lock:
            return sum(len(s) for s in self._open.values())


def handle_store(event: evt.Event, receiver: StoreReceiver) -> int:
    """pynetdicom ``EVT_C_STORE`` handler (an intervention event: the return is the status)."""
    requestor = event.assoc.requestor
    try:
        return receiver.receive(
            event.encoded_dataset(include_meta=True),
            context_sop_class_uid=event.context.abstract_syntax,
            transfer_syntax_uid=event.context.transfer_syntax,
            affected_sop_instance_uid=event.request.AffectedSOPInstanceUID,
            calling_ae_title=str(requestor.ae_title).strip(),
            peer_host=requestor.address,
            association=event.assoc,
        )
    except Exception:  # noqa: BLE001 - a bug must not pass for "cannot understand" (pynetdicom's 0xC211)
        log.exception(
            "refused SOP instance %s from %s@%s: unexpected error in the node (nothing was kept)",
            event.request.AffectedSOPInstanceUID, str(requestor.ae_title).strip(), requestor.address,
        )
        return StoreStatus.PROCESSING_FAILURE


def handle_connection_closed(event: evt.Event, holds: AssociationHolds) -> None:
    """``EVT_CONN_CLOSE``: release the studies the association held, however it ended."""
    holds.close(event.assoc)


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
    """The running DICOM listener of the node: ``start()``, ``stop()``, ``active_associations``.

    Creating it runs the start-up check :meth:`check_rows_without_files` unless ``check_rows`` is
    false, so the database is migrated and reachable by then.  ``study_guard`` is the retention
    purge's per-study guard, held shared around each instance's file write and row commit.
    """

    def __init__(
        self,
        config: NodeConfig,
        storage: Storage,
        session_factory: sessionmaker[Session],
        on_instance_stored: InstanceStoredCallback | None = None,
        *,
        ssl_context: ssl.SSLContext | None = None,
        study_holds: AssociationHolds | None = None,
        study_guard: StudyGuard | None = None,
        check_rows: bool = True,
    ) -> None:
        self.config = config
        self.receiver = StoreReceiver.from_config(config, storage, session_factory, on_instance_stored)
        self.receiver.holds = study_holds
        self.receiver.study_guard = study_guard
        if check_rows:
            self.check_rows_without_files()
        self.caller_policy = CallerPolicy(config.listener)
        self._ssl_context = ssl_context if ssl_context is not None else make_ssl_context(config)
        self._server: _NodeServer | None = None
        self._thread: threading.Thread | None = None
        self._ae: AE | None = None

    def check_rows_without_files(self) -> int:
        """The start-up check :meth:`StoreReceiver.forget_rows_without_files`, sized by the
        listener's association limit.  Run it before anything reads the database (the study
        assembler, the workers): rows committed just before a crash may lack their file.  The
        node runs it itself, after taking the data folder's lock and finishing interrupted purges
        (it creates its listener with ``check_rows=False``)."""
        limit = self.config.listener.max_associations
        return self.receiver.forget_rows_without_files(max(RECENT_INSTANCES_CHECKED, 2 * limit), at_most=limit)

    def _make_ae(self) -> AE:
        listener = self.config.listener
        ae = AE(ae_title=listener.ae_titles[0])
        ae.maximum_associations = listener.max_associations
        ae.maximum_pdu_size = MAXIMUM_PDU_SIZE
        ae.require_called_aet = True  # checked against the title the caller chose (see _GatedACSE)
        ae.require_calling_aet = []  # the CallerPolicy decides, with hosts
        ae.add_supported_context(sop_class.Verification)
        for name in (*listener.accept_sop_classes, *listener.ignore_sop_classes):
            ae.add_supported_context(sop_class_uid(name), ALL_TRANSFER_SYNTAXES)
        return ae

    def _association_rejected(self, reason: str, message: str) -> None:
        """Audit a rejection at negotiation as ``association_rejected_<reason>``: /metrics counts
        it by reason (``orthonode_rejections_total``), and the trail says who tried.  A database
        failure is logged; the rejection itself is already decided."""
        try:
            with session_scope(self.receiver.session_factory) as session:
                add_event(session, EventKind.association_rejected(reason), message)
        except SQLAlchemyError as exc:
            log.error("could not record the rejection of an association (%s): %s", message, exc)

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
        if self.receiver.holds is not None:
            handlers.append((evt.EVT_CONN_CLOSE, handle_connection_closed, [self.receiver.holds]))
        server = ae.make_server(
            (listener.bind_address, listener.port),
            ae_title=listener.ae_titles[0],
            ssl_context=self._ssl_context,
            evt_handlers=handlers,
            server_class=_NodeServer,
            caller_policy=self.caller_policy,
            on_rejected=self._association_rejected,
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
        self.receiver.close()
        self._server = self._thread = self._ae = None
        log.info("listener stopped")

    def __enter__(self) -> Listener:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
