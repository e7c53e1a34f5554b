"""One C-STORE, network-free: :class:`StoreReceiver` takes the file bytes and the association
facts and returns the DIMSE status; the pynetdicom event handlers only extract those."""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from pydicom import dcmread
from pydicom.uid import UID
from pynetdicom import evt
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import NodeConfig
from dicom_node.db import (
    RECENT_INSTANCES_CHECKED,
    EventKind,
    ReceivedInstance,
    SeriesStudyMismatchError,
    add_event,
    hash_patient_id,
    session_scope,
    utcnow,
)
from dicom_node.ingest.checks import (
    HEADER_TAGS,
    PARSE_ERRORS,
    PIXEL_TAGS,
    int_value,
    pixel_data_problem,
    same_instance_content,
    sop_class_uid,
    text_value,
    uid_value,
)
from dicom_node.ingest.group_commit import GroupRecorder
from dicom_node.ingest.recovery import forget_rows_without_files
from dicom_node.ingest.status import StoreStatus
from dicom_node.services.retention import StudyGuard
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
        self.recorder = GroupRecorder(session_factory)
        self.holds: AssociationHolds | None = None
        #: shared per-study guard against the retention purge (:class:`dicom_node.services.retention.StudyGuard`):
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
        """The start-up check of :func:`dicom_node.ingest.recovery.forget_rows_without_files` on
        this receiver's storage and database."""
        return forget_rows_without_files(self.storage, self.session_factory, newest, at_most)

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
        finally:
            if not stored.finished:  # refused or failed before the rows were committed: no file without its row
                stored.undo()

    def _parse(self, data: bytes, context_class: UID, affected_sop_uid: str, who: str) -> _Incoming | int:
        """The identifying attributes of the data set, checked; or the refusal status.

        One parse reads the identifying attributes and the image size attributes with the
        Pixel Data element (to see whether it is cut short); nothing else is decoded."""
        try:
            ds = dcmread(BytesIO(data), specific_tags=HEADER_TAGS + PIXEL_TAGS)
        except PARSE_ERRORS as exc:
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

        raw = {key: uid_value(ds, key) for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")}
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
        except (*PARSE_ERRORS, AttributeError, TypeError) as exc:
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
        conflict, the database did.  The file just written is dropped (by the caller, which
        undoes every file not finalised); returns the status."""
        where, who = incoming.where, incoming.who
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
        """Commit the rows (with the folder fsync), then finish the file; the status.  A file not
        finalised here (the rows were refused or not committed) is undone by the caller."""
        ds, where, who = incoming.ds, incoming.where, incoming.who
        patient_id = text_value(ds, "PatientID", 64)
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
            accession_number=text_value(ds, "AccessionNumber", 16),
            study_description=text_value(ds, "StudyDescription", 64),
            modality=text_value(ds, "Modality", 16),
            series_description=text_value(ds, "SeriesDescription", 64),
            series_number=int_value(ds, "SeriesNumber"),
        )
        try:
            result = self.recorder.record(info, stored, move=self.duplicate_policy == "overwrite")
        except SeriesStudyMismatchError as exc:
            log.warning("refused %s from %s: %s", where, who, exc)
            self._event(EventKind.SERIES_IN_OTHER_STUDY, f"from {who}; {exc}", incoming)
            return StoreStatus.SERIES_IN_OTHER_STUDY
        except SQLAlchemyError as exc:
            log.error("refused %s from %s: the database is unavailable, the file was not kept: %s", where, who, exc)
            return StoreStatus.DATABASE_UNAVAILABLE
        except OSError as exc:
            log.error("refused %s from %s: making the file's folder entry durable failed: %s", where, who, exc)
            return StoreStatus.STORAGE_WRITE_FAILED
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
