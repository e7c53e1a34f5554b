"""The node's data folder (``node.data_dir``): what lives where in it, and the lock on it.

::

    data_dir/
        orthonode.lock                       DataDirLock: the node (or ``orthonode purge``) using the folder (SQLite)
        orthonode-folder-id                  the folder's id, also kept in the database (shared folders)
        orthonode.sqlite (-wal, -shm)        the database, unless ``database.url`` names another
        instances/<study>/<series>/<sop>.dcm  received instances (:class:`dicom_node.storage.Storage`)
        results/<study>/job-<id>/            a job's result objects (:class:`dicom_node.services.jobs.Worker`)
        work/job-<id>/                       job snapshots left by earlier versions (the worker reads instances in place)

The purge (:mod:`dicom_node.services.retention`) deletes a study's ``results/<study>``, its jobs'
leftover ``work/job-<id>`` and its ``instances/<study>``.

On SQLite, one node per ``data_dir``: the running node holds an exclusive lock on ``orthonode.lock``
(:class:`DataDirLock`, ``flock``, released by the kernel when the process dies however it
dies); ``orthonode purge`` takes the same lock and refuses to delete while a node holds it.
On PostgreSQL several processes share the folder and the database's advisory locks take the
lock file's place (:mod:`dicom_node.cluster`).

This module imports nothing else of the node, so every other module can take the layout
from here.
"""
from __future__ import annotations

import errno
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

#: the storage root of the received instances
INSTANCES_DIR = "instances"
#: the jobs' result objects, one folder per study
RESULTS_DIR = "results"
#: job snapshot folders of earlier versions (the worker now reads the recorded files in place); the purge deletes them
WORK_DIR = "work"
#: the lock file a running node holds in its data directory
LOCK_FILE = "orthonode.lock"
#: the data folder's id, which the database keeps too (:func:`dicom_node.cluster.check_data_folder`)
IDENTITY_FILE = "orthonode-folder-id"
#: the SQLite database when ``database.url`` is empty
DATABASE_FILE = "orthonode.sqlite"


def job_folder(job_id: int) -> str:
    """The name of a job's folder under ``work/`` and under ``results/<study>/``."""
    return f"job-{job_id}"


@dataclass(frozen=True)
class DataLayout:
    """The paths of one data folder (nothing is created or checked here)."""

    root: Path

    @property
    def instances(self) -> Path:
        return self.root / INSTANCES_DIR

    @property
    def results(self) -> Path:
        return self.root / RESULTS_DIR

    @property
    def work(self) -> Path:
        return self.root / WORK_DIR

    @property
    def lock_file(self) -> Path:
        return self.root / LOCK_FILE

    @property
    def identity_file(self) -> Path:
        return self.root / IDENTITY_FILE

    @property
    def database(self) -> Path:
        return self.root / DATABASE_FILE

    def study_instances(self, study_uid: str) -> Path:
        return self.instances / study_uid

    def study_results(self, study_uid: str) -> Path:
        return self.results / study_uid

    def job_results(self, study_uid: str, job_id: int) -> Path:
        return self.study_results(study_uid) / job_folder(job_id)

    def job_work(self, job_id: int) -> Path:
        return self.work / job_folder(job_id)


# --------------------------------------------------------------------------- the data-dir lock


class DataDirLockedError(OSError):
    """Another process (a running node, or ``orthonode purge``) holds the data directory's lock."""


class DataDirLock:
    """An exclusive ``flock`` on ``data_dir/orthonode.lock`` held while a node serves the folder.

    The kernel drops the lock when its process ends, also on SIGKILL, so a stale file never
    blocks anyone; the pid written into it is only there to name the holder in messages.
    """

    def __init__(self, data_dir: Path) -> None:
        self.path = DataLayout(Path(data_dir)).lock_file
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self, purpose: str = "serving") -> None:
        """Take the lock or raise :class:`DataDirLockedError` naming the holder."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this object")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise DataDirLockedError(exc.errno, f"{self.path} is locked by {self.holder()}: another node "
                                                    f"or `orthonode purge` is using {self.path.parent}") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {purpose}\n".encode("ascii"))
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the descriptor drops the flock

    def locked_by_other(self) -> bool:
        """Whether another process holds the lock now (this one does not take it)."""
        if self._fd is not None or not self.path.exists():
            return False
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return True
            raise
        finally:
            os.close(fd)
        return False

    def holder(self) -> str:
        """``pid N (serving)`` as written by the holder, or ``another process`` when unreadable."""
        try:
            text = self.path.read_text(encoding="ascii").split()
        except (OSError, UnicodeDecodeError):
            return "another process"
        if len(text) >= 2 and text[0].isdigit():
            return f"pid {text[0]} ({' '.join(text[1:])})"
        return "another process"

    def __enter__(self) -> DataDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
