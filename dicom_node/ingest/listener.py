"""The running DICOM listener: one pynetdicom AE serving C-ECHO and C-STORE, with TLS."""
from __future__ import annotations

import logging
import ssl
import threading
import time
from pathlib import Path

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt, sop_class
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import NodeConfig
from dicom_node.db import RECENT_INSTANCES_CHECKED, EventKind, add_event, session_scope
from dicom_node.ingest.association import CallerPolicy, _NodeServer
from dicom_node.ingest.checks import sop_class_uid
from dicom_node.ingest.receiver import (
    AssociationHolds,
    InstanceStoredCallback,
    StoreReceiver,
    handle_connection_closed,
    handle_echo,
    handle_store,
)
from dicom_node.services.retention import StudyGuard
from dicom_node.storage import Storage

log = logging.getLogger(__name__)

#: largest P-DATA PDU the listener accepts (bytes).  pynetdicom's default (16 KiB) cuts a
#: 128 KiB image into eight PDUs, each decoded and queued in Python; 4 MiB takes most images
#: in one, and the memory is the data set's anyway (it is held whole before it is stored).
MAXIMUM_PDU_SIZE = 4 * 1024 * 1024


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
