"""Several ``orthonode serve`` processes on one database: roles, the process registry, the
shared data folder, and PostgreSQL's advisory locks.

A process runs one or more roles (``--role`` or ``node.role``):

* ``listener``: the C-STORE listener, study assembly and the retention schedule;
* ``worker``: the job workers (``jobs.workers`` threads, on ``jobs.device``);
* ``exporter``: the export sender.

``all`` (the default) is the three in one process, as a single node runs.  Any number of
processes of each role may run on any hosts that share ``node.data_dir`` (a POSIX folder: NFS
or similar) and one PostgreSQL ``database.url``; PostgreSQL coordinates them: jobs and exports
are claimed with ``SELECT ... FOR UPDATE SKIP LOCKED``, the purge and the receives of one study
exclude each other through advisory locks, and one purge runs at a time.  SQLite is for one
process running every role.  How to deploy it is in ``docs/deploy.md``.

Every process registers in the ``processes`` table (:class:`ProcessRegistry`) and refreshes its
heartbeat; an export left ``sending`` by a process that is gone is sent again by another
exporter, a running job of a dead worker is queued again by the job lease
(:mod:`dicom_node.services.jobs`).  The data folder carries an identity file whose id the database
keeps (:func:`check_data_folder`), so a process whose folder is not the shared one is refused
before it writes anything.

This module imports only :mod:`dicom_node.db`, :mod:`dicom_node.layout`,
:mod:`dicom_node.roles` and :mod:`dicom_node.services.base`.
"""
from __future__ import annotations

import logging
import os
import socket
import uuid
import zlib
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import delete, select, text, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db import MIGRATION_LOCK, ProcessRecord, Setting, session_scope, utcnow
from dicom_node.layout import DataLayout
from dicom_node.roles import ALL, ROLES, describe_roles
from dicom_node.services.base import BackgroundService

log = logging.getLogger(__name__)

#: how often a process refreshes its row in ``processes``
PROCESS_HEARTBEAT_SECONDS = 5.0
#: a process whose heartbeat is older than this is taken for dead
PROCESS_LEASE_SECONDS = 30.0
#: the ``settings`` key of the data folder's identity
DATA_FOLDER_KEY = "data_folder_id"

# advisory lock keys: (class, object) pairs of 32-bit integers, the class names what is locked
_LOCK_CLASS_NODE = MIGRATION_LOCK["c"]  # node-wide locks, the object says which (1: the migration)
_LOCK_CLASS_STUDY = 0x4F4E0002  # one study, the object is a hash of its UID
RETENTION_RUN_LOCK = (_LOCK_CLASS_NODE, 2)


class ClusterError(RuntimeError):
    """A process cannot start in this configuration; the message says why and what to do."""


def process_id() -> str:
    """``host:pid`` of this process (the prefix of its workers' ids)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def is_postgresql(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


def pid_alive(pid: int) -> bool:
    """Whether a process with ``pid`` runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@dataclass(frozen=True)
class ProcessInfo:
    """A row of ``processes`` as the operator sees it."""

    process_id: str
    host: str
    pid: int
    roles: str
    device: str | None
    started_at: datetime
    heartbeat_at: datetime

    def alive(self, now: datetime) -> bool:
        """Heartbeat within the lease and, on this host, a process with that pid.  A row with
        this process's own pid is this process: :class:`ProcessRegistry` replaces the row of an
        earlier life of the same pid before anything asks."""
        if now - self.heartbeat_at > timedelta(seconds=PROCESS_LEASE_SECONDS):
            return False
        if self.host == socket.gethostname() and self.pid != os.getpid():
            return pid_alive(self.pid)
        return True


def _info(row: ProcessRecord) -> ProcessInfo:
    return ProcessInfo(row.process_id, row.host, row.pid, row.roles, row.device, row.started_at, row.heartbeat_at)


def processes(session: Session) -> list[ProcessInfo]:
    """Every registered process, oldest first."""
    return [_info(r) for r in session.scalars(select(ProcessRecord).order_by(ProcessRecord.started_at))]


def live_process_ids(session: Session, now: datetime | None = None) -> set[str]:
    """``host:pid`` of the registered processes that are alive."""
    now = now or utcnow()
    return {p.process_id for p in processes(session) if p.alive(now)}


class ProcessRegistry(BackgroundService):
    """This process's row in ``processes``: inserted at :meth:`start`, its heartbeat refreshed
    every :data:`PROCESS_HEARTBEAT_SECONDS`, deleted at :meth:`stop`.  Rows of processes that
    died (stale heartbeat) are removed by whichever process starts next."""

    stop_timeout = 10.0
    already_started_message = "the process registry is already started"

    def __init__(self, factory: sessionmaker[Session], roles: Iterable[str], device: str | None = None) -> None:
        super().__init__("orthonode-process-heartbeat")
        self.factory = factory
        self.roles = tuple(roles)
        self.device = device
        self.process_id = process_id()

    def _starting(self) -> None:
        now = utcnow()
        with session_scope(self.factory) as session:
            gone = [p.process_id for p in processes(session) if not p.alive(now) or p.process_id == self.process_id]
            if gone:
                session.execute(delete(ProcessRecord).where(ProcessRecord.process_id.in_(gone)))
                log.info("removed the registration of %d process(es) that are gone: %s", len(gone), ", ".join(gone))
        with session_scope(self.factory) as session:
            host, _, pid = self.process_id.rpartition(":")
            session.add(ProcessRecord(process_id=self.process_id, host=host, pid=int(pid),
                                      roles=",".join(self.roles), device=self.device, started_at=now,
                                      heartbeat_at=now))

    def _tick(self) -> bool:
        with session_scope(self.factory) as session:
            found = session.execute(update(ProcessRecord).where(ProcessRecord.process_id == self.process_id)
                                    .values(heartbeat_at=utcnow())).rowcount
            if not found:  # removed by another process that took us for dead (a long pause): back in
                now = utcnow()
                host, _, pid = self.process_id.rpartition(":")
                session.add(ProcessRecord(process_id=self.process_id, host=host, pid=int(pid),
                                          roles=",".join(self.roles), device=self.device, started_at=now,
                                          heartbeat_at=now))
                log.warning("this process's registration was gone (taken for dead?); registered again")
        return False

    def _wait_seconds(self) -> float:
        return PROCESS_HEARTBEAT_SECONDS

    def _tick_failed(self) -> None:
        log.exception("process heartbeat failed; trying again in %.0f s", PROCESS_HEARTBEAT_SECONDS)

    def stop(self, timeout: float | None = None) -> None:
        was_running = self.alive
        super().stop(timeout)
        if not was_running:
            return
        try:
            with session_scope(self.factory) as session:
                session.execute(delete(ProcessRecord).where(ProcessRecord.process_id == self.process_id))
        except Exception:  # the database may be down at shutdown; the row then goes stale
            log.exception("could not remove this process's registration")


# --------------------------------------------------------------------------- start-up checks


def check_roles_for_database(database_url: str, roles: Iterable[str]) -> None:
    """Roles in separate processes need PostgreSQL: on SQLite only ``all`` is accepted (checked
    from the configuration alone, before anything is created)."""
    roles = tuple(roles)
    if database_url.startswith("sqlite") and set(roles) != set(ROLES):
        raise ClusterError(
            f"role {describe_roles(roles)!r} needs PostgreSQL: SQLite is for one process that runs every role "
            f"(role {ALL!r}); set database.url to a PostgreSQL database to run roles in separate processes")


def check_single_sqlite_process(engine: Engine, factory: sessionmaker[Session]) -> None:
    """On SQLite, refuse to start beside another live process registered on the same database."""
    if is_postgresql(engine):
        return
    now = utcnow()
    with session_scope(factory) as session:
        others = [p for p in processes(session) if p.alive(now) and p.process_id != process_id()]
    if others:
        names = ", ".join(f"{p.process_id} ({p.roles})" for p in others)
        raise ClusterError(f"another process is serving this SQLite database: {names}; SQLite is for one process "
                           f"(use PostgreSQL, database.url, to run several)")


def _read_identity(path: Path) -> str | None:
    try:
        value = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ClusterError(f"cannot read the data folder's identity file {path}: {exc}") from None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise ClusterError(f"{path} does not hold a data folder id (a UUID): {value[:60]!r}") from None


def _write_identity(path: Path) -> str:
    """Create the identity file (exclusively: of two processes creating it at once, one wins)."""
    value = str(uuid.uuid4())
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    except FileExistsError:
        found = _read_identity(path)
        if found is None:
            raise ClusterError(f"{path} appeared and vanished while it was created") from None
        return found
    try:
        os.write(fd, f"{value}\n".encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return value


def check_data_folder(factory: sessionmaker[Session], data_dir: Path) -> str:
    """The data folder's id, checked against the one the database keeps; returns it.

    The first process of a database writes ``data_dir/orthonode-folder-id`` and records its
    id; every later process must find the same id in its own ``data_dir``.  A folder without
    the file, or with another id, is not the shared folder (not mounted, or another node's):
    :class:`ClusterError` says so before anything is written there.
    """
    path = DataLayout(data_dir).identity_file
    with session_scope(factory) as session:
        recorded = session.get(Setting, DATA_FOLDER_KEY)
        recorded_id = recorded.value if recorded is not None else None
    found = _read_identity(path)
    if recorded_id is None:
        found = found or _write_identity(path)
        with session_scope(factory) as session:
            _insert_setting(session, DATA_FOLDER_KEY, found)
        with session_scope(factory) as session:
            recorded_id = session.get(Setting, DATA_FOLDER_KEY).value  # type: ignore[union-attr]
    if found is None:
        raise ClusterError(
            f"data folder {data_dir} is not the one this database's processes share: it has no {path.name} "
            f"(the database expects folder id {recorded_id}); mount the shared data folder at node.data_dir")
    if found != recorded_id:
        raise ClusterError(
            f"data folder {data_dir} is not the one this database's processes share: its id is {found}, the "
            f"database expects {recorded_id}; mount the shared data folder at node.data_dir, or give this "
            f"folder its own database")
    return found


def _insert_setting(session: Session, key: str, value: str) -> None:
    """Insert ``key`` unless another process was first (the first value stays)."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
    session.execute(insert(Setting).values(key=key, value=value).on_conflict_do_nothing(index_elements=["key"]))


# --------------------------------------------------------------------------- advisory locks


def study_lock_key(study_uid: str) -> tuple[int, int]:
    """The advisory lock key of one study (a 32-bit hash of its UID; a collision only makes two
    studies wait for each other)."""
    objid = zlib.crc32(study_uid.encode("ascii", "replace"))
    return _LOCK_CLASS_STUDY, objid - (1 << 32) if objid >= (1 << 31) else objid


class LockTimeout(Exception):
    """An advisory lock was not granted within its timeout."""


def _lock_not_available(exc: OperationalError) -> bool:
    return getattr(exc.orig, "pgcode", None) == "55P03"  # lock_not_available (lock_timeout expired)


class AdvisoryLock:
    """A PostgreSQL session-level advisory lock on a connection of its own.

    ``shared`` locks of one key coexist; an exclusive one waits for them and, while it waits,
    makes new shared requests wait behind it (PostgreSQL's lock queue), so a stream of shared
    holders cannot starve it.  The server drops the lock when the connection ends, also when
    its process is killed.
    """

    def __init__(self, engine: Engine, key: tuple[int, int], *, shared: bool = False) -> None:
        self.engine = engine
        self.key = key
        self.shared = shared
        self._connection: Connection | None = None

    def acquire(self, timeout: float | None = None) -> None:
        """Wait for the lock (``timeout`` seconds at most; None: as long as it takes), or raise
        :class:`LockTimeout`.  ``timeout=0`` tries once."""
        if self._connection is not None:
            raise RuntimeError("the advisory lock is already held by this object")
        suffix = "_shared" if self.shared else ""
        connection = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        params = {"c": self.key[0], "o": self.key[1]}
        try:
            if timeout is not None and timeout <= 0:
                got = connection.execute(text(f"SELECT pg_try_advisory_lock{suffix}(:c, :o)"), params).scalar()
                if not got:
                    raise LockTimeout(f"advisory lock {self.key} is held by another session")
            else:
                limit = "0" if timeout is None else f"{max(int(timeout * 1000), 1)}ms"
                connection.execute(text("SELECT set_config('lock_timeout', :t, false)"), {"t": limit})
                try:
                    connection.execute(text(f"SELECT pg_advisory_lock{suffix}(:c, :o)"), params)
                except OperationalError as exc:
                    if _lock_not_available(exc):
                        raise LockTimeout(f"advisory lock {self.key} was not granted within {timeout:g} s") from None
                    raise
                finally:
                    if not connection.invalidated:
                        connection.execute(text("SELECT set_config('lock_timeout', '0', false)"))
        except BaseException:
            connection.close()
            raise
        self._connection = connection

    def release(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        suffix = "_shared" if self.shared else ""
        try:
            connection.execute(text(f"SELECT pg_advisory_unlock{suffix}(:c, :o)"),
                               {"c": self.key[0], "o": self.key[1]})
        finally:
            connection.close()  # back to the pool; a broken connection is discarded, the lock with it

    @property
    def held(self) -> bool:
        return self._connection is not None

    def __enter__(self) -> AdvisoryLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextmanager
def holding(engine: Engine, key: tuple[int, int], timeout: float | None = None) -> Iterator[bool]:
    """Hold ``key`` exclusively, waiting up to ``timeout`` seconds (None: as long as it takes;
    0: not at all); yields False, holding nothing, when another session kept it."""
    lock = AdvisoryLock(engine, key)
    try:
        lock.acquire(timeout)
    except LockTimeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def try_exclusive(engine: Engine, key: tuple[int, int]) -> AbstractContextManager[bool]:
    """Hold ``key`` exclusively if nobody else does (yields True), else yield False at once."""
    return holding(engine, key, timeout=0)
