"""the approval queue's SLA clock (enrollments.waiting_since); four-eyes approval requests;
stage attempts indexed by time for /metrics

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23 09:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.add_column(
        "enrollments", sa.Column("waiting_since", sa.DateTime(timezone=True), nullable=True)
    )
    # An enrollment waiting now has waited since its latest move into the queue.
    op.execute(
        """
        UPDATE enrollments SET waiting_since = COALESCE(
            (SELECT MAX(h.created_at) FROM enrollment_history h
              WHERE h.enrollment_id = enrollments.id AND h.to_state = 'pending_approval'),
            updated_at)
        WHERE state = 'pending_approval'
        """
    )
    op.create_index("ix_enrollments_state_waiting_since", "enrollments", ["state", "waiting_since"])
    op.create_index(op.f("ix_stage_attempts_created_at"), "stage_attempts", ["created_at"])
    op.create_table(
        "approval_requests",
        sa.Column("id", ID, nullable=False),
        sa.Column("enrollment_id", ID, nullable=False),
        sa.Column("amount_cents", sa.BigInteger(), nullable=False),
        sa.Column("requested_by", ID, nullable=False),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("confirmed_by", ID, nullable=True),
        sa.Column("confirmed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cancelled_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["enrollment_id"],
            ["enrollments.id"],
            name=op.f("fk_approval_requests_enrollment_id_enrollments"),
        ),
        sa.ForeignKeyConstraint(
            ["requested_by"], ["users.id"], name=op.f("fk_approval_requests_requested_by_users")
        ),
        sa.ForeignKeyConstraint(
            ["confirmed_by"], ["users.id"], name=op.f("fk_approval_requests_confirmed_by_users")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_approval_requests")),
    )
    op.create_index(
        op.f("ix_approval_requests_enrollment_id"), "approval_requests", ["enrollment_id"]
    )
    op.create_index(
        "uq_approval_requests_open",
        "approval_requests",
        ["enrollment_id"],
        unique=True,
        postgresql_where=sa.text("confirmed_at IS NULL AND cancelled_at IS NULL"),
        sqlite_where=sa.text("confirmed_at IS NULL AND cancelled_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index(
        "uq_approval_requests_open",
        table_name="approval_requests",
        postgresql_where=sa.text("confirmed_at IS NULL AND cancelled_at IS NULL"),
        sqlite_where=sa.text("confirmed_at IS NULL AND cancelled_at IS NULL"),
    )
    op.drop_index(op.f("ix_approval_requests_enrollment_id"), table_name="approval_requests")
    op.drop_table("approval_requests")
    op.drop_index(op.f("ix_stage_attempts_created_at"), table_name="stage_attempts")
    op.drop_index("ix_enrollments_state_waiting_since", table_name="enrollments")
    op.drop_column("enrollments", "waiting_since")
