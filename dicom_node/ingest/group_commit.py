"""Group commit: the rows of stored instances, several per transaction when they arrive
together, each handler answered only once its own row and folder entry are durable."""
from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db import (
    ReceivedInstance,
    RecordedFile,
    RecordResult,
    SeriesStudyMismatchError,
    forget_instances,
    record_received,
    session_scope,
)
from dicom_node.storage import StoredInstance, sync_directories

log = logging.getLogger(__name__)

#: most instances committed in one database transaction by :class:`GroupRecorder`
GROUP_COMMIT_MAX = 64


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
