"""The guard between the retention purge and the listener: a study's receives exclude its purge.

:class:`StudyGuard` in one process (SQLite), :class:`DatabaseStudyGuard` across processes on
PostgreSQL (advisory locks), :func:`study_guard_for` picks one.  The race it settles is
described in ``docs/retention.md``.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine

from dicom_node.cluster import AdvisoryLock, LockTimeout, is_postgresql, study_lock_key


class StudyBusyError(RuntimeError):
    """The exclusive guard of a study could not be taken in time (instances kept arriving)."""


class StudyGuard:
    """In-process reader/writer guard per Study Instance UID.

    ``receiving(uid)`` is shared: any number of associations may store instances of one study
    at once.  ``purging(uid)`` is exclusive: it waits until no receive of the study is in
    progress, and receives that start meanwhile wait until the purge is over.  A waiting purge
    has priority over new receives, so a steady stream of instances cannot starve it (the
    purge then re-checks, sees the fresh instance and leaves the study alone).

    Only studies in use have an entry, so the guard does not grow with the number of studies.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._receivers: dict[str, int] = {}
        self._purging: set[str] = set()
        self._waiting_purges: dict[str, int] = {}

    @contextmanager
    def receiving(self, study_uid: str) -> Iterator[None]:
        """Hold while writing one instance of ``study_uid`` and committing its row."""
        with self._cond:
            while study_uid in self._purging or self._waiting_purges.get(study_uid, 0):
                self._cond.wait()
            self._receivers[study_uid] = self._receivers.get(study_uid, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                left = self._receivers[study_uid] - 1
                if left:
                    self._receivers[study_uid] = left
                else:
                    del self._receivers[study_uid]
                self._cond.notify_all()

    @contextmanager
    def purging(self, study_uid: str, timeout: float | None = None) -> Iterator[None]:
        """Hold exclusively while purging ``study_uid``; :class:`StudyBusyError` when receives of
        the study still run after ``timeout`` seconds (``None``: wait as long as it takes)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._waiting_purges[study_uid] = self._waiting_purges.get(study_uid, 0) + 1
            try:
                while study_uid in self._purging or self._receivers.get(study_uid, 0):
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise StudyBusyError(f"study {study_uid}: instances were still being received after "
                                             f"{timeout:g} s; left for the next purge")
                    self._cond.wait(remaining)
                self._purging.add(study_uid)
            finally:
                left = self._waiting_purges[study_uid] - 1
                if left:
                    self._waiting_purges[study_uid] = left
                else:
                    del self._waiting_purges[study_uid]
                self._cond.notify_all()  # receivers waiting only for this waiting purge re-check
        try:
            yield
        finally:
            with self._cond:
                self._purging.discard(study_uid)
                self._cond.notify_all()

    def receivers(self, study_uid: str) -> int:
        """Receives of ``study_uid`` in progress now."""
        with self._cond:
            return self._receivers.get(study_uid, 0)

    def is_purging(self, study_uid: str) -> bool:
        with self._cond:
            return study_uid in self._purging


class DatabaseStudyGuard:
    """:class:`StudyGuard` across processes and hosts, for PostgreSQL: a receive holds the
    study's advisory lock shared, a purge holds it exclusively (:class:`dicom_node.cluster.AdvisoryLock`).

    A purge waiting for the lock makes new receives of the study wait behind it, as the
    in-process guard does, and the server drops a lock whose process died.  Each hold costs a
    pooled connection and two statements.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @contextmanager
    def receiving(self, study_uid: str) -> Iterator[None]:
        lock = AdvisoryLock(self.engine, study_lock_key(study_uid), shared=True)
        lock.acquire()
        try:
            yield
        finally:
            lock.release()

    @contextmanager
    def purging(self, study_uid: str, timeout: float | None = None) -> Iterator[None]:
        lock = AdvisoryLock(self.engine, study_lock_key(study_uid))
        try:
            lock.acquire(timeout)
        except LockTimeout:
            raise StudyBusyError(f"study {study_uid}: instances were still being received after {timeout:g} s; "
                                 f"left for the next purge") from None
        try:
            yield
        finally:
            lock.release()


def study_guard_for(engine: Engine) -> StudyGuard | DatabaseStudyGuard:
    """The guard a node on ``engine`` uses: across processes on PostgreSQL, in memory on SQLite
    (one process)."""
    return DatabaseStudyGuard(engine) if is_postgresql(engine) else StudyGuard()
