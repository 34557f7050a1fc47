"""cluster mode: job lane and publication, role processes (issue 16)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 17:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("lane", sa.String(length=8), nullable=False, server_default="live")
        )
        batch_op.add_column(sa.Column("published_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(
            sa.Column("publish_count", sa.Integer(), nullable=False, server_default="0")
        )
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.alter_column("lane", server_default=None)
        batch_op.alter_column("publish_count", server_default=None)
    op.create_table(
        "cluster_member",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=160), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("host", sa.String(length=128), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(length=32), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stopped_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    with op.batch_alter_table("cluster_member", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_cluster_member_heartbeat_at"), ["heartbeat_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("cluster_member", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_cluster_member_heartbeat_at"))
    op.drop_table("cluster_member")
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.drop_column("publish_count")
        batch_op.drop_column("published_at")
        batch_op.drop_column("lane")
