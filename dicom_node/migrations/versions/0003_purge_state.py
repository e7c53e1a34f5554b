"""The retention purge's state on the study row instead of in audit-event messages.

A study being purged carries ``purge_started_at``, ``purge_reason`` and ``purge_age_days``
(the mark of the purge's first step); the row goes when the purge finishes, and the columns
are cleared when it gives up.  Purges that a node of an earlier revision marked and did not
finish are carried over from the events table, so the next run still finishes them.

Revision ID: 0003_purge_state
Revises: 0002_processes
Create Date: 2026-12-04
"""
from __future__ import annotations

import re

import sqlalchemy as sa
from alembic import op

from dicom_node.db import UTCDateTime

revision = "0003_purge_state"
down_revision = "0002_processes"
branch_labels = None
depends_on = None

#: how revisions 0001-0002 wrote a purge mark's message: ``<reason>; <age> days since the last activity ...``
_OLD_MARK = re.compile(r"^(?P<reason>.*?); (?P<age>[0-9]+(?:\.[0-9]+)?) days since the last activity")
_OLD_KINDS = ("study_purge_started", "study_purged", "study_purge_abandoned")


def upgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("purge_started_at", UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("purge_reason", sa.String(255), nullable=True))
        batch.add_column(sa.Column("purge_age_days", sa.Float(), nullable=True))
    _carry_over_unfinished_marks()


def _carry_over_unfinished_marks() -> None:
    """A study whose latest purge event is a mark (and that was first received before it) has an
    unfinished purge: set its columns from that event."""
    bind = op.get_bind()
    events = sa.table("events", sa.column("id"), sa.column("time", UTCDateTime()), sa.column("kind"),
                      sa.column("message"), sa.column("study_instance_uid"))
    studies = sa.table("studies", sa.column("study_instance_uid"), sa.column("first_received_at", UTCDateTime()),
                       sa.column("purge_started_at", UTCDateTime()), sa.column("purge_reason"),
                       sa.column("purge_age_days"))
    latest: dict[str, sa.Row] = {}
    for row in bind.execute(sa.select(events.c.time, events.c.kind, events.c.message, events.c.study_instance_uid)
                            .where(events.c.kind.in_(_OLD_KINDS)).order_by(events.c.id)):
        latest[row.study_instance_uid] = row
    for uid, row in latest.items():
        if row.kind != "study_purge_started":
            continue
        found = _OLD_MARK.match(row.message or "")
        reason, age = (found["reason"], float(found["age"])) if found else ((row.message or "")[:255], 0.0)
        bind.execute(studies.update()
                     .where(studies.c.study_instance_uid == uid, studies.c.first_received_at <= row.time)
                     .values(purge_started_at=row.time, purge_reason=reason[:255], purge_age_days=age))


def downgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.drop_column("purge_age_days")
        batch.drop_column("purge_reason")
        batch.drop_column("purge_started_at")
