"""The retention policy: whether one study may be purged now, and why (:func:`assess`)."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy.orm import Session

from dicom_node.config import RetentionSection
from dicom_node.db import ExportState, JobState, Study, StudyState

_OPEN_STUDY_STATES = frozenset({StudyState.RECEIVING, StudyState.COMPLETE, StudyState.PROCESSING})
_OPEN_JOB_STATES = frozenset({JobState.QUEUED, JobState.RUNNING})
_OPEN_EXPORT_STATES = frozenset({ExportState.PENDING, ExportState.SENDING})
_DAY = 86400.0

Category = Literal["delivered", "failed"]


@dataclass(frozen=True)
class Assessment:
    """What the retention policy says about one study at one moment."""

    study_id: int
    study_instance_uid: str
    #: may be purged now
    eligible: bool
    #: ``delivered`` (kept ``delivered_days``) or ``failed`` (kept ``failed_days``); None when
    #: open work keeps the study whatever its age
    category: Category | None
    #: why, in words: ``delivered``, ``processing failed``, ``export pending`` ...
    reason: str
    #: the study's last activity (the age counts from here)
    last_activity: datetime
    age_days: float
    #: when the study becomes eligible (None: open work)
    keep_until: datetime | None


def _latest(values: list[datetime | None]) -> datetime:
    present = [v for v in values if v is not None]
    return max(present)


def assess(session: Session, study: Study, policy: RetentionSection, now: datetime) -> Assessment:
    """Whether ``study`` may be purged at ``now`` under ``policy``, and why (reads its jobs and
    exports in ``session``)."""
    jobs = sorted(study.jobs, key=lambda j: j.id)
    exports = [e for j in jobs for e in j.exports]
    last = _latest([study.last_received_at, study.state_changed_at, *(j.finished_at for j in jobs),
                    *(j.created_at for j in jobs), *(e.updated_at for e in exports)])
    age_days = (now - last).total_seconds() / _DAY

    def result(category: Category | None, reason: str) -> Assessment:
        if category is None:
            return Assessment(study.id, study.study_instance_uid, False, None, reason, last, age_days, None)
        days = policy.delivered_days if category == "delivered" else policy.failed_days
        keep_until = last + timedelta(days=days)
        return Assessment(study.id, study.study_instance_uid, now >= keep_until, category, reason, last, age_days,
                          keep_until)

    if study.state in _OPEN_STUDY_STATES:
        return result(None, f"work pending: study {study.state.value}")
    open_jobs = [j for j in jobs if j.state in _OPEN_JOB_STATES]
    if open_jobs:
        return result(None, f"work pending: job {open_jobs[-1].id} {open_jobs[-1].state.value}")
    open_exports = [e for e in exports if e.state in _OPEN_EXPORT_STATES]
    if open_exports:
        e = open_exports[0]
        what = "retrying" if e.state is ExportState.PENDING and e.attempts > 0 else e.state.value
        return result(None, f"work pending: export {e.id} to {e.destination} {what}")
    current = next((j for j in reversed(jobs) if j.state is not JobState.SUPERSEDED), None)
    if current is None:
        return result("failed", "no job recorded")
    if study.state is StudyState.FAILED or current.state is JobState.FAILED:
        return result("failed", "processing failed")
    if study.state is StudyState.SKIPPED:
        return result("failed", "unsupported (nothing the node could process)")
    mine = list(current.exports)
    if not mine:
        return result("failed", "results not exported (no route matched)")
    if any(e.state is ExportState.FAILED for e in mine):
        return result("failed", "export failed")
    return result("delivered", "delivered")
