"""The node's database: what was received, which jobs ran on it, what was sent back.

Why one module of about 920 lines: the tables, their states, the audit event kinds and the
few statements every step shares (recording a received instance, the start-up check's
queries) are the schema the Alembic migrations must agree with, tested against it as one.

The tables follow the flow of a study through the node::

    studies 1--n series 1--n instances        (written by the listener)
    studies 1--n jobs 1--n exports             (written by assembly, the worker, export)
    events                                     (audit trail, written by everyone)

The schema is owned by Alembic (``dicom_node/migrations``): :func:`upgrade_database` creates
or upgrades it, and a test checks that these models and the migrations agree.  The same
models run on SQLite (the default, one file in ``data_dir``) and PostgreSQL.

Why the SQLite settings in :func:`make_engine`: WAL lets readers (the HTTP health page, the
assembler) run while the listener writes; ``synchronous=FULL`` makes a commit durable before
the listener answers a C-STORE with success; ``foreign_keys`` is off by default in SQLite;
and every transaction starts with ``BEGIN IMMEDIATE`` so that two writers queue on the busy
timeout instead of one failing with "database is locked" when it upgrades a read lock.

Timestamps are stored in UTC and always come back timezone-aware (:class:`UTCDateTime`),
also on SQLite, which has no timezone type.
"""
from __future__ import annotations

import enum
import hashlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Engine,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    Table,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker
from sqlalchemy.types import TypeDecorator

#: longest UID DICOM allows (PS3.5 9.1)
UID_LENGTH = 64
#: SQLite busy timeout: how long a writer waits for another writer before giving up
SQLITE_BUSY_TIMEOUT_MS = 30_000


def utcnow() -> datetime:
    """The current time, timezone-aware in UTC (what every timestamp column stores)."""
    return datetime.now(timezone.utc)


def hash_patient_id(patient_id: str) -> str:
    """SHA-256 (hex) of a Patient ID, so studies of one patient can be grouped without the ID.

    The database never holds the Patient ID itself: the instances on disk do, and the node
    copies patient data from them into its results.
    """
    return hashlib.sha256(patient_id.encode("utf-8")).hexdigest()


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC that always comes back timezone-aware.

    Naive datetimes are refused rather than guessed: a naive value is a bug in the caller.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"timestamp {value!r} has no timezone; use dicom_node.db.utcnow()")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:  # SQLite keeps no offset; everything written is UTC
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class StudyState(str, enum.Enum):
    """Where a study is in the node.

    ``receiving``: instances are arriving (any new instance puts a study back here).
    ``complete``: the quiet period passed; a job was queued for it.
    ``processing``: a job is running.  ``done`` / ``failed``: the latest job's outcome.
    ``skipped``: nothing the node can process (e.g. no usable series); kept for the record.
    """

    RECEIVING = "receiving"
    COMPLETE = "complete"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"


class JobState(str, enum.Enum):
    """A job's life: queued -> running -> done | failed; ``superseded`` when the study changed
    (new instances arrived) and a newer job replaces it."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SUPERSEDED = "superseded"


class ExportState(str, enum.Enum):
    """One object to one destination: pending -> sending -> done, or back to pending with a
    ``next_attempt_at`` after a failure, and ``failed`` once the attempts are used up."""

    PENDING = "pending"
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"


#: prefix of the events the listener writes for an association rejected at negotiation, followed
#: by the reason: ``called_ae_title``, ``calling_ae_title``, ``host`` or ``too_many_associations``
ASSOCIATION_REJECTED_PREFIX = "association_rejected_"


class EventKind(str, enum.Enum):
    """The kinds of the audit trail's events (``events.kind``; the values are what is stored).

    A ``str`` enum: a kind read back from the database is a plain string and compares equal to
    its member, and ``str()`` / formatting give the value.  The column stays a plain string, so
    a kind added later needs no migration.
    """

    # the listener and :func:`record_received`
    INSTANCE_STORED = "instance_stored"
    INSTANCE_REPLACED = "instance_replaced"
    INSTANCE_RESENT = "instance_resent"
    #: an instance row removed because its file is not there (see :func:`forget_instances`)
    INSTANCE_FORGOTTEN = "instance_forgotten"
    DUPLICATE_OTHER_ENCODING = "duplicate_other_encoding"
    DUPLICATE_REFUSED = "duplicate_refused"
    DUPLICATE_KEPT_FIRST = "duplicate_kept_first"
    SERIES_IN_OTHER_STUDY = "series_in_other_study"
    #: associations rejected at negotiation, by reason (:meth:`association_rejected`)
    ASSOCIATION_REJECTED_CALLED_AE_TITLE = ASSOCIATION_REJECTED_PREFIX + "called_ae_title"
    ASSOCIATION_REJECTED_CALLING_AE_TITLE = ASSOCIATION_REJECTED_PREFIX + "calling_ae_title"
    ASSOCIATION_REJECTED_HOST = ASSOCIATION_REJECTED_PREFIX + "host"
    ASSOCIATION_REJECTED_TOO_MANY_ASSOCIATIONS = ASSOCIATION_REJECTED_PREFIX + "too_many_associations"
    # jobs (:mod:`dicom_node.services.jobs`)
    JOB_QUEUED = "job_queued"
    JOB_REQUEUED = "job_requeued"
    JOB_STARTED = "job_started"
    JOB_DONE = "job_done"
    JOB_FAILED = "job_failed"
    # exports (:mod:`dicom_node.services.export`)
    EXPORT_REQUEUED = "export_requeued"
    EXPORT_RECOVERED = "export_recovered"
    EXPORT_DONE = "export_done"
    EXPORT_FAILED = "export_failed"
    EXPORT_RETRY = "export_retry"
    # retention (:mod:`dicom_node.services.retention`): the mark, the end, and a purge given up
    PURGE_STARTED = "study_purge_started"
    PURGED = "study_purged"
    PURGE_ABANDONED = "study_purge_abandoned"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def association_rejected(cls, reason: str) -> EventKind:
        """The kind of an association rejected at negotiation for ``reason`` (``host`` ...)."""
        return cls(ASSOCIATION_REJECTED_PREFIX + reason)


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    # Stored as VARCHAR + CHECK (not a native PostgreSQL enum) so adding a state is a plain
    # migration on both databases; the values, not the Python names, go into the column.
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda members: [m.value for m in members],
        validate_strings=True,
    )


#: deterministic constraint names, so later migrations can name what they alter (SQLite batch
#: mode and PostgreSQL both need the name); the initial revision spells the results out
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base of the node's tables."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime()}


class Study(Base):
    """One DICOM study, as far as it has been received."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), unique=True)
    #: :func:`hash_patient_id` of the Patient ID (never the ID itself)
    patient_id_hash: Mapped[str | None] = mapped_column(String(64))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    study_description: Mapped[str | None] = mapped_column(String(64))
    #: Calling AE title of the first association that sent this study (used by export routes)
    calling_ae_title: Mapped[str | None] = mapped_column(String(16))
    first_received_at: Mapped[datetime]
    last_received_at: Mapped[datetime]
    state: Mapped[StudyState] = mapped_column(_enum(StudyState, "study_state"), default=StudyState.RECEIVING)
    state_changed_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: the retention purge's state: set when a purge marks the study (step 1 of
    #: :class:`dicom_node.services.retention.Purger`), cleared when it gives up; the study's row is
    #: deleted when the purge finishes.  A set mark with the row still here is an unfinished
    #: purge: its files may be half deleted on purpose, and the next run finishes it.
    purge_started_at: Mapped[datetime | None]
    #: why the study is being purged (the policy's verdict), and its age in days at the mark
    purge_reason: Mapped[str | None] = mapped_column(String(255))
    purge_age_days: Mapped[float | None] = mapped_column(Float)

    series: Mapped[list[Series]] = relationship(back_populates="study", cascade="all, delete-orphan", passive_deletes=True)
    jobs: Mapped[list[Job]] = relationship(back_populates="study", cascade="all, delete-orphan", passive_deletes=True)

    __table_args__ = (
        # the assembler's query: studies in a state whose last instance is older than X
        Index("ix_studies_state_last_received", "state", "last_received_at"),
    )


class Series(Base):
    """One series of a study; ``instance_count`` counts distinct SOP Instance UIDs stored."""

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_description: Mapped[str | None] = mapped_column(String(64))
    series_number: Mapped[int | None] = mapped_column(Integer)
    first_received_at: Mapped[datetime]
    last_received_at: Mapped[datetime]
    instance_count: Mapped[int] = mapped_column(Integer, default=0)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(
        back_populates="series", cascade="all, delete-orphan", passive_deletes=True
    )


class Instance(Base):
    """One stored SOP instance: where its file is and what exactly was received."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    #: path of the file relative to the storage root (``<study>/<series>/<sop>.dcm``)
    path: Mapped[str] = mapped_column(String(255))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    #: SHA-256 (hex) of the file as stored: preamble, file meta and the data set as received
    sha256: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime]
    calling_ae_title: Mapped[str | None] = mapped_column(String(16))
    peer_host: Mapped[str | None] = mapped_column(String(255))

    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    """One processing run of a study, for one exact set of instances (``input_fingerprint``)."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"))
    state: Mapped[JobState] = mapped_column(_enum(JobState, "job_state"), default=JobState.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    #: refreshed by the worker while running; a stale heartbeat means the worker died
    heartbeat_at: Mapped[datetime | None]
    worker_id: Mapped[str | None] = mapped_column(String(128))
    #: :func:`input_fingerprint` of the study's instance UIDs when the job was queued
    input_fingerprint: Mapped[str] = mapped_column(String(64))
    #: the pipeline step running or last reached (free text, for the operator)
    step: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    result_summary: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    study: Mapped[Study] = relationship(back_populates="jobs")
    exports: Mapped[list[Export]] = relationship(back_populates="job", cascade="all, delete-orphan", passive_deletes=True)

    __table_args__ = (
        Index("ix_jobs_state_created", "state", "created_at"),  # the worker's queue
        Index("ix_jobs_study_state", "study_id", "state"),  # "does this study have an open job?"
    )


class Export(Base):
    """One result object to send to one destination, with its retry bookkeeping."""

    __tablename__ = "exports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    #: a key of ``export.destinations`` in node.yaml
    destination: Mapped[str] = mapped_column(String(64))
    #: the object's file, relative to the node's data directory
    object_path: Mapped[str] = mapped_column(String(255))
    #: what the object is, e.g. ``seg`` or ``sr``
    object_kind: Mapped[str] = mapped_column(String(16))
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    state: Mapped[ExportState] = mapped_column(_enum(ExportState, "export_state"), default=ExportState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    #: ``host:pid`` of the exporter sending it (state ``sending``); another exporter sends it
    #: again only when that process is gone
    sender_id: Mapped[str | None] = mapped_column(String(128))

    job: Mapped[Job] = relationship(back_populates="exports")

    __table_args__ = (
        UniqueConstraint("job_id", "destination", "sop_instance_uid", name="uq_exports_job_destination_sop"),
        Index("ix_exports_state_next_attempt", "state", "next_attempt_at"),  # the sender's queue
    )


class EventRecord(Base):
    """One line of the audit trail.

    References are UIDs and ids by value, not foreign keys, so the trail outlives the rows it
    talks about (a purged study keeps its history).
    """

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    time: Mapped[datetime] = mapped_column(default=utcnow)
    #: short machine-readable kind (:class:`EventKind`), e.g. ``instance_stored``, ``job_failed``
    kind: Mapped[str] = mapped_column(String(64))
    study_instance_uid: Mapped[str | None] = mapped_column(String(UID_LENGTH))
    series_instance_uid: Mapped[str | None] = mapped_column(String(UID_LENGTH))
    sop_instance_uid: Mapped[str | None] = mapped_column(String(UID_LENGTH))
    job_id: Mapped[int | None] = mapped_column(Integer)
    message: Mapped[str] = mapped_column(Text, default="")

    __table_args__ = (
        Index("ix_events_time", "time"),
        Index("ix_events_study_time", "study_instance_uid", "time"),
    )


class ProcessRecord(Base):
    """One running ``orthonode serve`` process: what it runs and when it last said so.

    Several processes (on several hosts) may share one PostgreSQL database and one data
    folder; each registers here at start-up, refreshes ``heartbeat_at`` while it runs and
    removes its row when it stops (:mod:`dicom_node.cluster`).  A row whose heartbeat is old
    belongs to a process that died.
    """

    __tablename__ = "processes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: ``host:pid``, the prefix of the worker ids of its jobs and the sender id of its exports
    process_id: Mapped[str] = mapped_column(String(128), unique=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    #: comma-separated roles, e.g. ``listener`` or ``listener,worker,exporter``
    roles: Mapped[str] = mapped_column(String(64))
    #: the torch device its workers use (None without the worker role)
    device: Mapped[str | None] = mapped_column(String(32))
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)


class Setting(Base):
    """Facts every process of one database shares, e.g. the identity of its data folder."""

    __tablename__ = "settings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


def input_fingerprint(sop_instance_uids: Iterable[str]) -> str:
    """SHA-256 of the sorted, distinct SOP Instance UIDs of a study.

    A job records it when queued; a study whose fingerprint changed since has new instances
    and its job is superseded.  Order of arrival does not matter.
    """
    digest = hashlib.sha256()
    for uid in sorted(set(sop_instance_uids)):
        digest.update(uid.encode("ascii"))
        digest.update(b"\n")
    return digest.hexdigest()


# --------------------------------------------------------------------------- engine/session


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # autocommit at the driver level; transactions are begun explicitly in _sqlite_on_begin
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute("PRAGMA synchronous = FULL")
        mode = cursor.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    finally:
        cursor.close()
    if str(mode).lower() not in ("wal", "memory"):
        raise RuntimeError(f"SQLite refused WAL journal mode (got {mode!r}); is the database on a network filesystem?")


def _sqlite_on_begin(connection: Any) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str, *, echo: bool = False) -> Engine:
    """An engine for ``url`` with the node's settings.

    SQLite: the folder of the database file is created if missing; WAL, foreign keys,
    ``synchronous=FULL``, a 30 s busy timeout and ``BEGIN IMMEDIATE`` transactions (see the
    module docstring).  PostgreSQL (``postgresql+psycopg2://...``): connections are checked
    before use so a restarted server does not fail the first C-STORE after it.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            parsed,
            echo=echo,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
        )
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
        return engine
    return create_engine(parsed, echo=echo, pool_pre_ping=True)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded objects usable after commit (``expire_on_commit=False``),
    which is what the listener and workers want: they commit and then log what they wrote."""
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One transaction: commit on success, roll back and re-raise on any error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


#: the advisory lock key (class, object) held while the schema is migrated (PostgreSQL)
MIGRATION_LOCK = {"c": 0x4F4E0001, "o": 1}

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def alembic_config(engine_or_url: Engine | str) -> Any:
    """An Alembic ``Config`` for the node's migrations, driven from code (no alembic.ini).

    The engine travels in ``config.attributes`` rather than as a URL string in the ini
    options, so passwords with ``%`` and the SQLite settings of :func:`make_engine` survive.
    """
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    engine = make_engine(engine_or_url) if isinstance(engine_or_url, str) else engine_or_url
    config.attributes["engine"] = engine
    return config


def upgrade_database(engine_or_url: Engine | str, revision: str = "head") -> None:
    """Create the schema or bring it up to ``revision`` (idempotent; run at node start-up).

    On PostgreSQL several processes may start at once: the migration runs under an advisory
    lock, so one of them migrates and the others then find the schema at ``revision``.
    """
    from alembic import command

    config = alembic_config(engine_or_url)
    engine: Engine = config.attributes["engine"]
    try:
        if engine.dialect.name == "postgresql":
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
                connection.execute(text("SELECT pg_advisory_lock(:c, :o)"), MIGRATION_LOCK)
                try:
                    command.upgrade(config, revision)
                finally:
                    connection.execute(text("SELECT pg_advisory_unlock(:c, :o)"), MIGRATION_LOCK)
        else:
            command.upgrade(config, revision)
    finally:
        if isinstance(engine_or_url, str):
            engine.dispose()


def current_revision(engine: Engine) -> str | None:
    """The Alembic revision the database is at (``None``: never migrated)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


# --------------------------------------------------------------------------- receiving


class SeriesStudyMismatchError(ValueError):
    """A Series Instance UID already recorded under another Study Instance UID."""

    def __init__(self, series_uid: str, recorded_study_uid: str, received_study_uid: str) -> None:
        self.series_uid = series_uid
        self.recorded_study_uid = recorded_study_uid
        self.received_study_uid = received_study_uid
        super().__init__(
            f"series {series_uid} is recorded under study {recorded_study_uid} but arrived with study {received_study_uid}"
        )


@dataclass(frozen=True)
class ReceivedInstance:
    """What the listener knows about one stored instance; the input of :func:`record_instance`."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    #: relative to the storage root
    path: str
    size_bytes: int
    sha256: str
    received_at: datetime
    calling_ae_title: str | None = None
    peer_host: str | None = None
    patient_id_hash: str | None = None
    accession_number: str | None = None
    study_description: str | None = None
    modality: str | None = None
    series_description: str | None = None
    series_number: int | None = None


@dataclass(frozen=True)
class RecordResult:
    """What :func:`record_received` (or :func:`record_instance`) did."""

    #: id of the instance row (the existing one when nothing was written)
    instance_id: int
    #: a row was inserted (a new SOP Instance UID for the database)
    inserted: bool
    #: the study/series/instance rows changed (new instance, or new content / location)
    changed: bool
    #: the instance's previous file when it moved to another series (the caller removes it)
    previous_path: str | None
    #: ``(study, series)`` UIDs the instance is recorded under when it arrived under another
    #: series and moving was not allowed (``move=False``): then nothing was written
    stored_elsewhere: tuple[str, str] | None = None


_STUDIES = Study.__table__
_SERIES = Series.__table__
_INSTANCES = Instance.__table__
_EVENTS = EventRecord.__table__


def _insert_ignoring_conflict(connection: Connection, table: Table, key: str, values: dict[str, Any]) -> None:
    """``INSERT ... ON CONFLICT (key) DO NOTHING``: two associations (or two node processes on
    PostgreSQL) may create the same study or series at the same moment; the loser then simply
    finds the winner's row."""
    dialect = connection.dialect.name
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    elif dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert  # type: ignore[assignment]
    else:
        raise NotImplementedError(f"database dialect {dialect!r} is not supported (use SQLite or PostgreSQL)")
    connection.execute(insert(table).values(**values).on_conflict_do_nothing(index_elements=[key]))


# The hot path's statements are built once: building a statement and its cache key on every
# call costs more Python time than SQLite takes to run it.  Bind names differ from the column
# names, which UPDATE ... VALUES reserves.
_SELECT_CURRENT = (
    select(_INSTANCES.c.id, _INSTANCES.c.series_id, _INSTANCES.c.path, _SERIES.c.series_instance_uid,
           _STUDIES.c.study_instance_uid)
    .select_from(
        _INSTANCES.join(_SERIES, _INSTANCES.c.series_id == _SERIES.c.id).join(_STUDIES, _SERIES.c.study_id == _STUDIES.c.id)
    )
    .where(_INSTANCES.c.sop_instance_uid == bindparam("b_sop"))
)
# the series with its study's UID and state: for every instance after a series' first, this one
# statement answers both "is the series under this study?" and "is the study receiving?"
_SELECT_SERIES = (
    select(_SERIES.c.id, _SERIES.c.study_id, _STUDIES.c.study_instance_uid, _STUDIES.c.state.label("study_state"))
    .select_from(_SERIES.join(_STUDIES, _SERIES.c.study_id == _STUDIES.c.id))
    .where(_SERIES.c.series_instance_uid == bindparam("b_series"))
)
_SELECT_STUDY = select(_STUDIES.c.id, _STUDIES.c.state).where(_STUDIES.c.study_instance_uid == bindparam("b_study"))
_INSERT_INSTANCE = insert(_INSTANCES)
_UPDATE_INSTANCE = update(_INSTANCES).where(_INSTANCES.c.id == bindparam("b_id"))
_UPDATE_SERIES = (
    update(_SERIES)
    .where(_SERIES.c.id == bindparam("b_id"))
    .values(instance_count=_SERIES.c.instance_count + bindparam("b_delta", type_=Integer),
            last_received_at=bindparam("b_now", type_=UTCDateTime()))
)
_UPDATE_STUDY_TIME = (
    update(_STUDIES)
    .where(_STUDIES.c.id == bindparam("b_id"))
    .values(last_received_at=bindparam("b_now", type_=UTCDateTime()))
)
_UPDATE_STUDY_RECEIVING = (
    update(_STUDIES)
    .where(_STUDIES.c.id == bindparam("b_id"))
    .values(last_received_at=bindparam("b_now", type_=UTCDateTime()), state=StudyState.RECEIVING,
            state_changed_at=bindparam("b_now", type_=UTCDateTime()))
)
_INSERT_EVENT = insert(_EVENTS)


def _series_row(connection: Connection, series_uid: str) -> Any:
    return connection.execute(_SELECT_SERIES, {"b_series": series_uid}).first()


def _check_series_study(info: ReceivedInstance, series: Any) -> None:
    if series is not None and series.study_instance_uid != info.study_instance_uid:
        raise SeriesStudyMismatchError(info.series_instance_uid, series.study_instance_uid, info.study_instance_uid)


def _study_for_new_series(connection: Connection, info: ReceivedInstance) -> tuple[int, StudyState]:
    """``(id, state)`` of the instance's study, the row created first when the study is new."""
    now = info.received_at
    study = connection.execute(_SELECT_STUDY, {"b_study": info.study_instance_uid}).first()
    if study is None:
        _insert_ignoring_conflict(
            connection,
            _STUDIES,
            "study_instance_uid",
            dict(
                study_instance_uid=info.study_instance_uid,
                patient_id_hash=info.patient_id_hash,
                accession_number=info.accession_number,
                study_description=info.study_description,
                calling_ae_title=info.calling_ae_title,
                first_received_at=now,
                last_received_at=now,
                state=StudyState.RECEIVING,
                state_changed_at=now,
            ),
        )
        study = connection.execute(_SELECT_STUDY, {"b_study": info.study_instance_uid}).one()
    return study.id, study.state


def record_received(
    connection: Connection, info: ReceivedInstance, *, content_changed: bool = True, move: bool = True
) -> RecordResult:
    """Upsert the study, series and instance rows of a stored instance and add its event.

    The listener's hot path: SQLAlchemy Core statements on ``connection`` inside the caller's
    transaction (the caller commits, possibly together with other instances).  Every check
    runs before the first write, so a refusal leaves the transaction as it was and other
    instances of the same transaction are not affected:

    * the series is recorded under another study: :class:`SeriesStudyMismatchError`;
    * the SOP Instance UID is recorded under another series and ``move`` is false: nothing is
      written and :attr:`RecordResult.stored_elsewhere` says where it is (the caller applies
      its duplicate policy).  With ``move`` the instance moves: the counts follow and
      :attr:`RecordResult.previous_path` names the old file.

    ``content_changed`` is false when storage found the same bytes already in place (or
    kept the first copy): an existing row is then left as it is, so a resend does not make
    a finished study "receiving" again; a missing row (the node stopped between writing the
    file and committing) is still inserted.  A new or changed instance puts its study back
    in ``receiving``.
    """
    now = info.received_at
    current = connection.execute(_SELECT_CURRENT, {"b_sop": info.sop_instance_uid}).first()
    series = _series_row(connection, info.series_instance_uid)
    _check_series_study(info, series)
    elsewhere = current is not None and (current.study_instance_uid, current.series_instance_uid) != (
        info.study_instance_uid,
        info.series_instance_uid,
    )
    if elsewhere and not move:
        return RecordResult(
            current.id, False, False, None, stored_elsewhere=(current.study_instance_uid, current.series_instance_uid)
        )

    if series is not None:  # recorded under this study (checked above): its study came with it
        study_id, study_state = series.study_id, series.study_state
    else:
        study_id, study_state = _study_for_new_series(connection, info)
        _insert_ignoring_conflict(
            connection,
            _SERIES,
            "series_instance_uid",
            dict(
                series_instance_uid=info.series_instance_uid,
                study_id=study_id,
                modality=info.modality,
                series_description=info.series_description,
                series_number=info.series_number,
                first_received_at=now,
                last_received_at=now,
                instance_count=0,
            ),
        )
        series = _series_row(connection, info.series_instance_uid)
        _check_series_study(info, series)  # another writer may have created it under another study

    inserted = current is None
    previous_path: str | None = None
    changed = inserted or content_changed
    if not changed:
        instance_id = current.id
    else:
        fields = dict(
            sop_class_uid=info.sop_class_uid,
            transfer_syntax_uid=info.transfer_syntax_uid,
            path=info.path,
            size_bytes=info.size_bytes,
            sha256=info.sha256,
            received_at=now,
            calling_ae_title=info.calling_ae_title,
            peer_host=info.peer_host,
            series_id=series.id,
        )
        if current is None:
            instance_id = connection.execute(
                _INSERT_INSTANCE, dict(fields, sop_instance_uid=info.sop_instance_uid)
            ).inserted_primary_key[0]
            count_change = 1
        else:
            instance_id = current.id
            count_change = 0
            if current.series_id != series.id:
                connection.execute(_UPDATE_SERIES, {"b_id": current.series_id, "b_delta": -1, "b_now": now})
                count_change = 1
            if current.path != info.path:
                previous_path = current.path
            connection.execute(_UPDATE_INSTANCE.values(**fields), {"b_id": current.id})
        connection.execute(_UPDATE_SERIES, {"b_id": series.id, "b_delta": count_change, "b_now": now})
        receiving = study_state is StudyState.RECEIVING
        connection.execute(_UPDATE_STUDY_TIME if receiving else _UPDATE_STUDY_RECEIVING, {"b_id": study_id, "b_now": now})
    connection.execute(
        _INSERT_EVENT,
        dict(
            time=now,
            kind=(EventKind.INSTANCE_STORED if inserted
                  else EventKind.INSTANCE_REPLACED if changed else EventKind.INSTANCE_RESENT),
            study_instance_uid=info.study_instance_uid,
            series_instance_uid=info.series_instance_uid,
            sop_instance_uid=info.sop_instance_uid,
            job_id=None,
            message=f"from {info.calling_ae_title or '?'}@{info.peer_host or '?'}, {info.size_bytes} bytes",
        ),
    )
    return RecordResult(instance_id=instance_id, inserted=inserted, changed=changed, previous_path=previous_path)


def record_instance(session: Session, info: ReceivedInstance, *, content_changed: bool = True) -> RecordResult:
    """:func:`record_received` in an ORM session's transaction (the instance moves when it
    arrives under another series).  The caller commits.

    The session's identity map is not told about the Core statements: objects it loaded
    before may be stale, so load rows after this call rather than before.
    """
    return record_received(session.connection(), info, content_changed=content_changed, move=True)


def add_event(session: Session, kind: EventKind, message: str = "", **refs: Any) -> EventRecord:
    """Append an audit event; ``refs``: study_instance_uid, series_instance_uid, sop_instance_uid, job_id."""
    record = EventRecord(time=utcnow(), kind=kind, message=message, **refs)
    session.add(record)
    return record


# --------------------------------------------------------------------------- recovery

#: how many of the newest instance rows :func:`newest_instances` returns for the start-up check
#: of :meth:`dicom_node.ingest.StoreReceiver.forget_rows_without_files`; the rows that can
#: lack their file after a crash are those of handlers still waiting for their folder fsync,
#: at most one per open association (``listener.max_associations``), so this leaves a wide
#: margin at the cost of a thousand ``stat`` calls at start-up
RECENT_INSTANCES_CHECKED = 1024


@dataclass(frozen=True)
class RecordedFile:
    """An instance row's id, UIDs and file path (relative to the storage root)."""

    instance_id: int
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    path: str


_SELECT_NEWEST = (
    select(_INSTANCES.c.id, _STUDIES.c.study_instance_uid, _SERIES.c.series_instance_uid,
           _INSTANCES.c.sop_instance_uid, _INSTANCES.c.path)
    .select_from(
        _INSTANCES.join(_SERIES, _INSTANCES.c.series_id == _SERIES.c.id).join(_STUDIES, _SERIES.c.study_id == _STUDIES.c.id)
    )
    .order_by(_INSTANCES.c.id.desc())
    .limit(bindparam("b_limit"))
)


def newest_instances(connection: Connection, limit: int = RECENT_INSTANCES_CHECKED) -> list[RecordedFile]:
    """The ``limit`` instance rows inserted last (highest ids first)."""
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    return [RecordedFile(*row) for row in connection.execute(_SELECT_NEWEST, {"b_limit": limit})]


def forget_instances(connection: Connection, instances: Iterable[RecordedFile], reason: str) -> int:
    """Delete instance rows whose file is not there, inside the caller's transaction; returns
    how many rows were deleted.

    The series' ``instance_count`` is set to the rows it still has; a series left without
    instances is deleted, and so is a study left without series and without jobs (both were
    created for the forgotten instances).  Each forgotten instance gets an
    :attr:`EventKind.INSTANCE_FORGOTTEN` event with ``reason``; its earlier ``instance_stored``
    event stays in the audit trail.  A row already gone is skipped.
    """
    deleted = 0
    for item in instances:
        row = connection.execute(
            select(_INSTANCES.c.series_id).where(_INSTANCES.c.id == item.instance_id)
        ).first()
        if row is None:
            continue
        series_id = row.series_id
        connection.execute(delete(_INSTANCES).where(_INSTANCES.c.id == item.instance_id))
        deleted += 1
        remaining = connection.execute(
            select(func.count()).select_from(_INSTANCES).where(_INSTANCES.c.series_id == series_id)
        ).scalar_one()
        if remaining:
            connection.execute(update(_SERIES).where(_SERIES.c.id == series_id).values(instance_count=remaining))
        else:
            study_id = connection.execute(select(_SERIES.c.study_id).where(_SERIES.c.id == series_id)).scalar_one()
            connection.execute(delete(_SERIES).where(_SERIES.c.id == series_id))
            other_series = connection.execute(
                select(func.count()).select_from(_SERIES).where(_SERIES.c.study_id == study_id)
            ).scalar_one()
            jobs = connection.execute(
                select(func.count()).select_from(Job.__table__).where(Job.__table__.c.study_id == study_id)
            ).scalar_one()
            if not other_series and not jobs:
                connection.execute(delete(_STUDIES).where(_STUDIES.c.id == study_id))
        connection.execute(
            _INSERT_EVENT,
            dict(
                time=utcnow(),
                kind=EventKind.INSTANCE_FORGOTTEN,
                study_instance_uid=item.study_instance_uid,
                series_instance_uid=item.series_instance_uid,
                sop_instance_uid=item.sop_instance_uid,
                job_id=None,
                message=f"{item.path}: {reason}",
            ),
        )
    return deleted
