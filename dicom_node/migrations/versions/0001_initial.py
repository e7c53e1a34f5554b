"""Initial schema: studies, series, instances, jobs, exports, events.

Revision ID: 0001_initial
Revises:
Create Date: 2026-11-28
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from dicom_node.db import UTCDateTime

revision = "0001_initial"
down_revision = None
branch_labels = None
depends_on = None


def _state(table: str, name: str, *values: str) -> sa.Enum:
    # VARCHAR + CHECK on both databases (see dicom_node.db._enum); the CHECK's name follows
    # dicom_node.db.NAMING_CONVENTION
    return sa.Enum(*values, name=op.f(f"ck_{table}_{name}"), native_enum=False, create_constraint=True, length=16)


def upgrade() -> None:
    op.create_table(
        "studies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("patient_id_hash", sa.String(64), nullable=True),
        sa.Column("accession_number", sa.String(16), nullable=True),
        sa.Column("study_description", sa.String(64), nullable=True),
        sa.Column("calling_ae_title", sa.String(16), nullable=True),
        sa.Column("first_received_at", UTCDateTime(), nullable=False),
        sa.Column("last_received_at", UTCDateTime(), nullable=False),
        sa.Column(
            "state",
            _state("studies", "study_state", "receiving", "complete", "processing", "done", "failed", "skipped"),
            nullable=False,
        ),
        sa.Column("state_changed_at", UTCDateTime(), nullable=False),
        sa.UniqueConstraint("study_instance_uid", name=op.f("uq_studies_study_instance_uid")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_studies")),
    )
    op.create_index(op.f("ix_studies_state_last_received"), "studies", ["state", "last_received_at"])

    op.create_table(
        "series",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("series_instance_uid", sa.String(64), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"], name=op.f("fk_series_study_id_studies"), ondelete="CASCADE"),
        sa.Column("modality", sa.String(16), nullable=True),
        sa.Column("series_description", sa.String(64), nullable=True),
        sa.Column("series_number", sa.Integer(), nullable=True),
        sa.Column("first_received_at", UTCDateTime(), nullable=False),
        sa.Column("last_received_at", UTCDateTime(), nullable=False),
        sa.Column("instance_count", sa.Integer(), nullable=False),
        sa.UniqueConstraint("series_instance_uid", name=op.f("uq_series_series_instance_uid")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_series")),
    )
    op.create_index(op.f("ix_series_study_id"), "series", ["study_id"])

    op.create_table(
        "instances",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("transfer_syntax_uid", sa.String(64), nullable=False),
        sa.Column("series_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["series_id"], ["series.id"], name=op.f("fk_instances_series_id_series"), ondelete="CASCADE"),
        sa.Column("path", sa.String(255), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("received_at", UTCDateTime(), nullable=False),
        sa.Column("calling_ae_title", sa.String(16), nullable=True),
        sa.Column("peer_host", sa.String(255), nullable=True),
        sa.UniqueConstraint("sop_instance_uid", name=op.f("uq_instances_sop_instance_uid")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_instances")),
    )
    op.create_index(op.f("ix_instances_series_id"), "instances", ["series_id"])

    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"], name=op.f("fk_jobs_study_id_studies"), ondelete="CASCADE"),
        sa.Column("state", _state("jobs", "job_state", "queued", "running", "done", "failed", "superseded"), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=True),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.Column("heartbeat_at", UTCDateTime(), nullable=True),
        sa.Column("worker_id", sa.String(128), nullable=True),
        sa.Column("input_fingerprint", sa.String(64), nullable=False),
        sa.Column("step", sa.String(64), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("result_summary", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    )
    op.create_index(op.f("ix_jobs_state_created"), "jobs", ["state", "created_at"])
    op.create_index(op.f("ix_jobs_study_state"), "jobs", ["study_id", "state"])

    op.create_table(
        "exports",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_exports_job_id_jobs"), ondelete="CASCADE"),
        sa.Column("destination", sa.String(64), nullable=False),
        sa.Column("object_path", sa.String(255), nullable=False),
        sa.Column("object_kind", sa.String(16), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("state", _state("exports", "export_state", "pending", "sending", "done", "failed"), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", UTCDateTime(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.UniqueConstraint("job_id", "destination", "sop_instance_uid", name=op.f("uq_exports_job_destination_sop")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_exports")),
    )
    op.create_index(op.f("ix_exports_job_id"), "exports", ["job_id"])
    op.create_index(op.f("ix_exports_state_next_attempt"), "exports", ["state", "next_attempt_at"])

    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("time", UTCDateTime(), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("study_instance_uid", sa.String(64), nullable=True),
        sa.Column("series_instance_uid", sa.String(64), nullable=True),
        sa.Column("sop_instance_uid", sa.String(64), nullable=True),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("message", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
    )
    op.create_index(op.f("ix_events_time"), "events", ["time"])
    op.create_index(op.f("ix_events_study_time"), "events", ["study_instance_uid", "time"])


def downgrade() -> None:
    for table in ("events", "exports", "jobs", "instances", "series", "studies"):
        op.drop_table(table)
