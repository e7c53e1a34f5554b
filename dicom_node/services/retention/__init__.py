"""Retention: deleting old studies (instance files, result files, rows) so ``data_dir`` stays bounded.

The policy (:mod:`~dicom_node.services.retention.policy`), the purge of one study in three
crash-safe steps (:mod:`~dicom_node.services.retention.purge`), the guard between purge and
listener (:mod:`~dicom_node.services.retention.guard`), the scheduled runner
(:mod:`~dicom_node.services.retention.schedule`) and ``orthonode purge``
(:mod:`~dicom_node.services.retention.command`).  The rules, the steps and the race are described
in ``docs/retention.md``.
"""
from dicom_node.services.retention.files import remove_tree, tree_size
from dicom_node.services.retention.guard import DatabaseStudyGuard, StudyBusyError, StudyGuard, study_guard_for
from dicom_node.services.retention.policy import Assessment, assess
from dicom_node.services.retention.purge import Candidate, PurgedStudy, PurgeReport, Purger
from dicom_node.services.retention.schedule import RetentionRunner

__all__ = [
    "StudyBusyError",
    "StudyGuard",
    "DatabaseStudyGuard",
    "study_guard_for",
    "Assessment",
    "assess",
    "tree_size",
    "remove_tree",
    "Candidate",
    "PurgedStudy",
    "PurgeReport",
    "Purger",
    "RetentionRunner",
]
