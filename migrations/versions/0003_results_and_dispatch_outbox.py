"""results, emitted objects and dispatch outbox

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 20:46:37.075484
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "result",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("series_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("predicted_class", sa.String(length=32), nullable=True),
        sa.Column("probability", sa.Float(), nullable=True),
        sa.Column("decision_value", sa.Float(), nullable=True),
        sa.Column("prediction_id", sa.Integer(), nullable=True),
        sa.Column("model_sha256", sa.String(length=64), nullable=True),
        sa.Column("model_name", sa.String(length=128), nullable=True),
        sa.Column("model_synthetic", sa.Boolean(), nullable=False),
        sa.Column("model_label", sa.Text(), nullable=True),
        sa.Column("qc_outcome", sa.String(length=8), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("qc_checks", sa.JSON(), nullable=False),
        sa.Column("volumes", sa.JSON(), nullable=False),
        sa.Column("contributions", sa.JSON(), nullable=False),
        sa.Column("software_version", sa.String(length=32), nullable=False),
        sa.Column("current", sa.Boolean(), nullable=False),
        sa.Column("job_started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("processing_seconds", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["job.id"],
        ),
        sa.ForeignKeyConstraint(
            ["prediction_id"],
            ["prediction.id"],
        ),
        sa.ForeignKeyConstraint(
            ["series_id"],
            ["series.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("job_id"),
    )
    with op.batch_alter_table("result", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_result_created_at"), ["created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_result_current"), ["current"], unique=False)
        batch_op.create_index(batch_op.f("ix_result_model_sha256"), ["model_sha256"], unique=False)
        batch_op.create_index(batch_op.f("ix_result_series_id"), ["series_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_result_status"), ["status"], unique=False)

    op.create_table(
        "emitted_object",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("result_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["result_id"],
            ["result.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("sop_instance_uid"),
    )
    with op.batch_alter_table("emitted_object", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_emitted_object_result_id"), ["result_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_emitted_object_study_uid"), ["study_uid"], unique=False
        )

    op.create_table(
        "outbox",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("object_id", sa.Integer(), nullable=False),
        sa.Column("destination", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["object_id"],
            ["emitted_object.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.create_index("ix_outbox_due", ["state", "next_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_outbox_object_id"), ["object_id"], unique=False)
        batch_op.create_index(
            "uq_outbox_object_destination", ["object_id", "destination"], unique=True
        )


def downgrade() -> None:

    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.drop_index("uq_outbox_object_destination")
        batch_op.drop_index(batch_op.f("ix_outbox_object_id"))
        batch_op.drop_index("ix_outbox_due")

    op.drop_table("outbox")
    with op.batch_alter_table("emitted_object", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_emitted_object_study_uid"))
        batch_op.drop_index(batch_op.f("ix_emitted_object_result_id"))

    op.drop_table("emitted_object")
    with op.batch_alter_table("result", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_result_status"))
        batch_op.drop_index(batch_op.f("ix_result_series_id"))
        batch_op.drop_index(batch_op.f("ix_result_model_sha256"))
        batch_op.drop_index(batch_op.f("ix_result_current"))
        batch_op.drop_index(batch_op.f("ix_result_created_at"))

    op.drop_table("result")
