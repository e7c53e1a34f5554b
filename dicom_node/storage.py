"""Durable storage of received instances, byte for byte as they arrived.

Layout: ``<root>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``.

A C-STORE is acknowledged only after its file is on disk for good, so :meth:`Storage.store`
writes to a temporary file in the target folder (same filesystem), ``fsync``\\ s it, puts it in
place atomically and ``fsync``\\ s the folder.  Nothing is decoded or re-encoded: a JPEG 2000
instance stays the JPEG 2000 bytes the sender encoded, and the SHA-256 computed while
writing is the checksum of exactly those bytes.

The UIDs become path components, so each one is checked against the DICOM UID grammar
(digits and dots, at most 64 characters) before it touches the filesystem: ``..``, ``/`` or
an empty component cannot reach ``open``.

Files are created ``0o640`` and folders ``0o750``: received images are patient data and are
not world-readable whatever the process umask is.

A repeated SOP Instance UID follows the configured :data:`DuplicatePolicy`.  The caller
records the instance in the database after :meth:`Storage.store` returned and then calls
:meth:`StoredInstance.finalize`, or :meth:`StoredInstance.undo` if the database failed, which
removes a new file or puts back the file an overwrite replaced.  So an instance is visible
either with its row or not at all.
"""
from __future__ import annotations

import enum
import hashlib
import logging
import os
import re
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

log = logging.getLogger(__name__)

DuplicatePolicy = Literal["keep_first", "overwrite", "reject_if_different"]
DUPLICATE_POLICIES: tuple[str, ...] = ("keep_first", "overwrite", "reject_if_different")

#: a DICOM UID (PS3.5 9.1): dot-separated numeric components, 64 characters at most
UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
UID_MAX_LENGTH = 64

FILE_MODE = 0o640
DIR_MODE = 0o750
_CHUNK = 1 << 20
_TEMP_PREFIX = ".incoming-"
_BACKUP_PREFIX = ".replaced-"
_MIB = 1024 * 1024


class StorageError(Exception):
    """Base class of the storage errors; the listener maps each subclass to a DIMSE status."""


class InvalidUIDError(StorageError, ValueError):
    """A UID that is not a valid DICOM UID (and so cannot be a path component)."""

    def __init__(self, name: str, value: object) -> None:
        self.name = name
        self.value = value
        super().__init__(
            f"{name} {value!r} is not a valid DICOM UID (digits and dots, at most {UID_MAX_LENGTH} characters)"
        )


class InsufficientStorageError(StorageError):
    """Storing would leave less free space than the configured reserve (``storage.min_free_mb``)."""

    def __init__(self, root: Path, free_bytes: int, needed_bytes: int, reserve_bytes: int) -> None:
        self.root = root
        self.free_bytes = free_bytes
        self.needed_bytes = needed_bytes
        self.reserve_bytes = reserve_bytes
        super().__init__(
            f"{root}: {free_bytes // _MIB} MiB free, storing {needed_bytes} bytes would go below the "
            f"reserve of {reserve_bytes // _MIB} MiB (storage.min_free_mb)"
        )


class DuplicateConflictError(StorageError):
    """Under ``reject_if_different``: the SOP Instance UID is stored already with other bytes."""

    def __init__(self, path: Path, existing_sha256: str, new_sha256: str) -> None:
        self.path = path
        self.existing_sha256 = existing_sha256
        self.new_sha256 = new_sha256
        super().__init__(
            f"{path} exists with different content (stored sha256 {existing_sha256[:12]}..., "
            f"received {new_sha256[:12]}...); duplicate_policy is reject_if_different"
        )


class Outcome(str, enum.Enum):
    """What :meth:`Storage.store` did with the received bytes."""

    #: a new file
    CREATED = "created"
    #: ``overwrite``: the file existed and now holds the received bytes
    OVERWRITTEN = "overwritten"
    #: the file existed with the same bytes (any policy); nothing changed
    IDENTICAL = "identical"
    #: ``keep_first``: the file existed with other bytes and was kept; the received bytes were dropped
    KEPT_EXISTING = "kept_existing"


def validate_uid(name: str, value: object) -> str:
    """Return ``value`` if it is a valid DICOM UID, else raise :class:`InvalidUIDError` naming ``name``."""
    if not isinstance(value, str) or len(value) > UID_MAX_LENGTH or not UID_RE.match(value):
        raise InvalidUIDError(name, value)
    return value


@dataclass
class StoredInstance:
    """The result of :meth:`Storage.store`; finish it with :meth:`finalize` or :meth:`undo`."""

    outcome: Outcome
    path: Path
    #: path relative to the storage root, with ``/`` separators (what the database records)
    relative_path: str
    size_bytes: int
    #: SHA-256 (hex) of the file now in place (for KEPT_EXISTING: of the kept file)
    sha256: str
    #: SHA-256 of the bytes that were received (differs from ``sha256`` only for KEPT_EXISTING)
    received_sha256: str
    _backup: Path | None = field(default=None, repr=False)
    _finished: bool = field(default=False, repr=False)
    #: the folder entry of a new or replaced file still waits for its folder fsync
    #: (``store(..., sync_directory=False)``); see :meth:`sync_directory`
    directory_pending: bool = field(default=False)

    def sync_directory(self) -> None:
        """Make the file's folder entry durable, when :meth:`Storage.store` left that to the
        caller.  Callers that store several instances at once use :func:`sync_directories`,
        which fsyncs each folder once."""
        if self.directory_pending:
            fsync_directory(self.path.parent)
            self.directory_pending = False

    @property
    def finished(self) -> bool:
        """Whether :meth:`finalize` or :meth:`undo` ran."""
        return self._finished

    @property
    def changed(self) -> bool:
        """Whether the file on disk changed (a new file or an overwrite)."""
        return self.outcome in (Outcome.CREATED, Outcome.OVERWRITTEN)

    def finalize(self) -> None:
        """The instance is recorded: drop the copy an overwrite kept for :meth:`undo`."""
        if self._finished:
            return
        self._finished = True
        if self._backup is not None:
            _unlink_quietly(self._backup)
            self._backup = None

    def undo(self) -> None:
        """Recording failed: remove a new file, or put back the file an overwrite replaced."""
        if self._finished:
            raise RuntimeError(f"{self.path}: undo() after finalize() or a previous undo()")
        self._finished = True
        if self.outcome is Outcome.CREATED:
            _unlink_quietly(self.path)
            fsync_directory(self.path.parent)
        elif self.outcome is Outcome.OVERWRITTEN and self._backup is not None:
            os.replace(self._backup, self.path)
            fsync_directory(self.path.parent)
            self._backup = None


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def fsync_directory(path: Path) -> None:
    """Make the entries created, renamed or removed in the folder ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_directories(stored: Iterable[StoredInstance]) -> None:
    """Fsync the folders of instances stored with ``sync_directory=False``, each folder once.

    One folder fsync makes every entry created in it before the call durable, so instances
    of one series received at the same moment share it.  Raises :class:`OSError`.
    """
    pending = [s for s in stored if s.directory_pending]
    for folder in dict.fromkeys(s.path.parent for s in pending):
        fsync_directory(folder)
    for s in pending:
        s.directory_pending = False


def _write_all(fd: int, chunk: bytes | memoryview) -> None:
    """``os.write`` until the whole chunk is written (a write may take only part of it)."""
    view = memoryview(chunk)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _chunks(data: bytes | bytearray | memoryview | BinaryIO | Iterable[bytes]) -> Iterable[bytes | memoryview]:
    if isinstance(data, (bytes, bytearray, memoryview)):
        view = memoryview(data).cast("B")
        for start in range(0, len(view), _CHUNK):
            yield view[start : start + _CHUNK]  # a view, not a copy
    elif hasattr(data, "read"):
        while chunk := data.read(_CHUNK):  # type: ignore[union-attr]
            yield chunk
    else:
        yield from data  # type: ignore[misc]


class Storage:
    """Received instances under ``root``, with a free-space reserve of ``min_free_mb``."""

    def __init__(self, root: str | Path, min_free_mb: int) -> None:
        if min_free_mb < 0:
            raise ValueError(f"min_free_mb must be >= 0, got {min_free_mb}")
        self.root = Path(root).resolve()
        self.min_free_mb = int(min_free_mb)
        self.root.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        #: folders this process found or made durably (a study and series folder is reused by
        #: every instance of the series, so its existence is not checked again each time)
        self._known_dirs: set[Path] = set()

    @property
    def reserve_bytes(self) -> int:
        return self.min_free_mb * _MIB

    def free_bytes(self) -> int:
        """Free bytes on the filesystem of ``root`` available to this process."""
        return shutil.disk_usage(self.root).free

    def check_free_space(self, needed_bytes: int) -> None:
        """Raise :class:`InsufficientStorageError` unless ``needed_bytes`` fit above the reserve."""
        free = self.free_bytes()
        if free - needed_bytes < self.reserve_bytes:
            raise InsufficientStorageError(self.root, free, needed_bytes, self.reserve_bytes)

    def relative_path(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        """``<study>/<series>/<sop>.dcm`` after validating the three UIDs."""
        validate_uid("StudyInstanceUID", study_uid)
        validate_uid("SeriesInstanceUID", series_uid)
        validate_uid("SOPInstanceUID", sop_uid)
        return f"{study_uid}/{series_uid}/{sop_uid}.dcm"

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Absolute path of an instance (the UIDs are validated, so it is always under ``root``)."""
        return self.root / self.relative_path(study_uid, series_uid, sop_uid)

    def resolve(self, relative_path: str) -> Path:
        """Absolute path of a path the database recorded; refuses anything outside ``root``."""
        path = (self.root / relative_path).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"{relative_path!r} is outside the storage root {self.root}")
        return path

    def _make_dirs(self, folder: Path) -> None:
        if folder in self._known_dirs:
            return
        # mkdir one level at a time so each new folder gets DIR_MODE (parents= would use the
        # umask for intermediate folders) and its parent is fsynced (the new entry is durable)
        missing = []
        current = folder
        while not current.exists():
            missing.append(current)
            current = current.parent
        for path in reversed(missing):
            try:
                path.mkdir(mode=DIR_MODE)
            except FileExistsError:
                continue  # another association created it in the meantime
            os.chmod(path, DIR_MODE)
            fsync_directory(path.parent)
        self._known_dirs.add(folder)

    def store(
        self,
        data: bytes | bytearray | memoryview | BinaryIO | Iterable[bytes],
        study_uid: str,
        series_uid: str,
        sop_uid: str,
        policy: DuplicatePolicy,
        size_hint: int | None = None,
        *,
        sync_directory: bool = True,
    ) -> StoredInstance:
        """Write one instance durably and return what happened.

        ``data`` is the complete file as received (preamble, file meta, data set), as bytes,
        a binary file object or an iterable of chunks; it is written unchanged.
        ``size_hint`` (the size when ``data`` is not bytes) makes the free-space check exact
        before anything is written; the check is repeated with the real size before the file
        is put in place.

        With ``sync_directory=False`` the new folder entry (rename or link) is not fsynced here:
        the file's bytes are durable but its name is not until the caller runs
        :func:`sync_directories` (or :meth:`StoredInstance.sync_directory`), which it must do
        before it acknowledges the instance; the listener does it once per folder for all
        instances it commits together.

        Raises :class:`InvalidUIDError`, :class:`InsufficientStorageError`,
        :class:`DuplicateConflictError` (``reject_if_different``) or :class:`OSError`; on any
        of them nothing is left behind.
        """
        if policy not in DUPLICATE_POLICIES:
            raise ValueError(f"duplicate policy {policy!r} is not one of {', '.join(DUPLICATE_POLICIES)}")
        relative = self.relative_path(study_uid, series_uid, sop_uid)
        target = self.root / relative
        if isinstance(data, (bytes, bytearray, memoryview)):
            size_hint = len(data)
        self.check_free_space(size_hint or 0)

        self._make_dirs(target.parent)
        temp = target.parent / f"{_TEMP_PREFIX}{sop_uid}.{os.getpid()}.{time.monotonic_ns()}"
        digest = hashlib.sha256()
        size = 0
        try:
            try:
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
            except FileNotFoundError:
                # a known folder was removed behind this process's back: make it again
                self._known_dirs.discard(target.parent)
                self._make_dirs(target.parent)
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
            try:  # plain os.write: a received instance is one buffer, a file object would copy it
                os.fchmod(fd, FILE_MODE)  # independent of the umask
                for chunk in _chunks(data):
                    _write_all(fd, chunk)
                    digest.update(chunk)
                    size += len(chunk)
                os.fsync(fd)
            finally:
                os.close(fd)
            received_sha = digest.hexdigest()
            if size_hint is None or size > size_hint:
                self.check_free_space(0)  # the file now occupies its space; the reserve must still hold
            return self._place(temp, target, relative, size, received_sha, policy, sync_directory)
        finally:
            _unlink_quietly(temp)  # gone already when placed (rename), or dropped

    def _place(
        self,
        temp: Path,
        target: Path,
        relative: str,
        size: int,
        received_sha: str,
        policy: DuplicatePolicy,
        sync_directory: bool,
    ) -> StoredInstance:
        def result(outcome: Outcome, sha: str, size_bytes: int, backup: Path | None = None) -> StoredInstance:
            stored = StoredInstance(outcome, target, relative, size_bytes, sha, received_sha, _backup=backup)
            if outcome in (Outcome.CREATED, Outcome.OVERWRITTEN):
                stored.directory_pending = True
                if sync_directory:
                    stored.sync_directory()
            return stored

        if policy == "overwrite":
            if target.exists():
                existing_sha = _file_sha256(target)
                if existing_sha == received_sha:
                    return result(Outcome.IDENTICAL, received_sha, size)
                # keep the old file under another name until the caller finalizes or undoes
                backup = target.parent / f"{_BACKUP_PREFIX}{target.name}.{time.monotonic_ns()}"
                os.link(target, backup)
                os.replace(temp, target)
                return result(Outcome.OVERWRITTEN, received_sha, size, backup)
            os.replace(temp, target)
            return result(Outcome.CREATED, received_sha, size)

        # keep_first / reject_if_different: link() creates the name only if it does not exist,
        # atomically, so two associations storing the same UID cannot both "create" it
        try:
            os.link(temp, target)
        except FileExistsError:
            existing_sha = _file_sha256(target)
            if existing_sha == received_sha:
                return result(Outcome.IDENTICAL, received_sha, size)
            if policy == "keep_first":
                return result(Outcome.KEPT_EXISTING, existing_sha, target.stat().st_size)
            raise DuplicateConflictError(target, existing_sha, received_sha) from None
        return result(Outcome.CREATED, received_sha, size)

    def remove(self, relative_path: str) -> None:
        """Delete a stored file (e.g. the old location of an instance that moved series)."""
        path = self.resolve(relative_path)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        fsync_directory(path.parent)

    def remove_stale_temporaries(self, older_than_seconds: float = 3600.0) -> int:
        """Delete temporary and backup files left by a crash mid-write; returns how many.

        Run at start-up: a file still named ``.incoming-*`` was never acknowledged to its
        sender, who will send it again.
        """
        cutoff = time.time() - older_than_seconds
        removed = 0
        for pattern in (f"*/*/{_TEMP_PREFIX}*", f"*/*/{_BACKUP_PREFIX}*"):
            for path in self.root.glob(pattern):
                try:
                    if path.stat().st_mtime < cutoff:
                        path.unlink()
                        removed += 1
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    log.warning("could not remove stale temporary file %s: %s", path, exc)
        if removed:
            log.info("removed %d stale temporary file(s) under %s", removed, self.root)
        return removed
