"""Start-up recovery: instance rows committed in the last moments before a crash whose file
names did not survive it (see :func:`forget_rows_without_files`)."""
from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db import RECENT_INSTANCES_CHECKED, Study, forget_instances, newest_instances, session_scope
from dicom_node.storage import Storage

log = logging.getLogger(__name__)


def _studies_being_purged(connection: Connection, study_uids: set[str]) -> set[str]:
    """The studies among ``study_uids`` whose retention purge is marked and not finished
    (``studies.purge_started_at``, see :mod:`dicom_node.services.retention`): their files may be half
    deleted on purpose."""
    if not study_uids:
        return set()
    studies = Study.__table__
    return set(connection.scalars(
        select(studies.c.study_instance_uid)
        .where(studies.c.study_instance_uid.in_(study_uids), studies.c.purge_started_at.is_not(None))
    ))


def forget_rows_without_files(storage: Storage, session_factory: sessionmaker[Session],
                              newest: int = RECENT_INSTANCES_CHECKED, at_most: int = 8) -> int:
    """Start-up check: remove the instance rows, among the ``newest`` rows, whose file is
    missing from a folder that exists; returns how many were removed.

    A batch of new rows may commit while the folder entries of its files are still being
    fsynced (:func:`dicom_node.ingest.group_commit._may_commit_before_folder_sync`); if the machine stops in between, a
    row can survive its file's name.  Such an instance was never acknowledged (the answer
    waits for both), so its sender sends it again; its row must not make the study look
    complete meanwhile.  Only rows of handlers that were still waiting can be affected, at
    most one per open association (:class:`~dicom_node.ingest.group_commit.GroupRecorder`), hence only the newest rows are
    checked, and the file's folder exists (folders are made durable before a file is
    written in them).

    What the crash cannot explain is left alone, with a log line: a missing folder (storage
    not mounted, a study deleted by hand), more missing files than ``at_most`` (the
    listener's association limit), and the studies whose retention purge was interrupted
    (:mod:`dicom_node.services.retention` finishes those itself).

    Run it before the study assembler and the workers start (:class:`Listener` does it when
    it is created).  Only on SQLite: on PostgreSQL the commit waits for the folder fsync,
    so there is nothing to repair, and the newest rows may be another node's, whose files
    this node's storage does not hold.
    """
    with session_scope(session_factory) as session:
        connection = session.connection()
        if connection.dialect.name != "sqlite":
            return 0
        missing, unexplained = [], []
        for row in newest_instances(connection, newest):
            path = storage.resolve(row.path)
            if not path.is_file():
                (missing if path.parent.is_dir() else unexplained).append(row)
        purging = _studies_being_purged(connection, {r.study_instance_uid for r in missing})
        unexplained += [r for r in missing if r.study_instance_uid in purging]
        missing = [r for r in missing if r.study_instance_uid not in purging]
        if len(missing) > at_most:
            log.error(
                "%d of the newest %d instance rows name files that are missing from their folders under %s; a "
                "crash leaves at most %d (one per association): nothing is removed, check the storage",
                len(missing), newest, storage.root, at_most,
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
