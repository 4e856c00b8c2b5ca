"""refunds; flags for admins; reconciliation runs and findings; bank statements and their lines

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23 01:11:06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "reconciliation_runs",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("trigger", sa.String(length=16), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("checked", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reconciliation_runs")),
    )
    op.create_index(
        op.f("ix_reconciliation_runs_started_at"),
        "reconciliation_runs",
        ["started_at"],
        unique=False,
    )
    op.create_table(
        "bank_statements",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("filename", sa.String(length=200), nullable=False),
        sa.Column("format", sa.String(length=8), nullable=False),
        sa.Column(
            "imported_by", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("imported_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("line_count", sa.Integer(), nullable=False),
        sa.Column("already_imported", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["imported_by"], ["users.id"], name=op.f("fk_bank_statements_imported_by_users")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bank_statements")),
        sa.UniqueConstraint("sha256", name=op.f("uq_bank_statements_sha256")),
    )
    op.create_table(
        "enrollment_flags",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "enrollment_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("source", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("cleared_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "cleared_by", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("note", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["cleared_by"], ["users.id"], name=op.f("fk_enrollment_flags_cleared_by_users")
        ),
        sa.ForeignKeyConstraint(
            ["enrollment_id"],
            ["enrollments.id"],
            name=op.f("fk_enrollment_flags_enrollment_id_enrollments"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_enrollment_flags")),
    )
    op.create_index(
        op.f("ix_enrollment_flags_enrollment_id"),
        "enrollment_flags",
        ["enrollment_id"],
        unique=False,
    )
    op.create_index(
        "uq_enrollment_flags_open",
        "enrollment_flags",
        ["enrollment_id", "kind"],
        unique=True,
        postgresql_where=sa.text("cleared_at IS NULL"),
        sqlite_where=sa.text("cleared_at IS NULL"),
    )
    op.create_table(
        "reconciliation_findings",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("run_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column(
            "enrollment_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("payment_id", sa.String(length=36), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["enrollment_id"],
            ["enrollments.id"],
            name=op.f("fk_reconciliation_findings_enrollment_id_enrollments"),
        ),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["reconciliation_runs.id"],
            name=op.f("fk_reconciliation_findings_run_id_reconciliation_runs"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reconciliation_findings")),
    )
    op.create_index(
        op.f("ix_reconciliation_findings_run_id"),
        "reconciliation_findings",
        ["run_id"],
        unique=False,
    )
    op.create_table(
        "statement_lines",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "statement_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("line_no", sa.Integer(), nullable=False),
        sa.Column("booked_on", sa.Date(), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("amount_cents", sa.BigInteger(), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("reference", sa.String(length=16), nullable=True),
        sa.Column("match", sa.String(length=16), nullable=False),
        sa.Column(
            "enrollment_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column(
            "confirmed_by", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("confirmed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("job_id", sa.String(length=36), nullable=True),
        sa.ForeignKeyConstraint(
            ["confirmed_by"], ["users.id"], name=op.f("fk_statement_lines_confirmed_by_users")
        ),
        sa.ForeignKeyConstraint(
            ["enrollment_id"],
            ["enrollments.id"],
            name=op.f("fk_statement_lines_enrollment_id_enrollments"),
        ),
        sa.ForeignKeyConstraint(
            ["statement_id"],
            ["bank_statements.id"],
            name=op.f("fk_statement_lines_statement_id_bank_statements"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_statement_lines")),
        sa.UniqueConstraint("fingerprint", name=op.f("uq_statement_lines_fingerprint")),
    )
    op.create_index(
        op.f("ix_statement_lines_enrollment_id"), "statement_lines", ["enrollment_id"], unique=False
    )
    op.create_index(
        op.f("ix_statement_lines_statement_id"), "statement_lines", ["statement_id"], unique=False
    )
    op.create_index(
        "uq_statement_lines_exact_enrollment",
        "statement_lines",
        ["enrollment_id"],
        unique=True,
        postgresql_where=sa.text("match = 'exact'"),
        sqlite_where=sa.text("match = 'exact'"),
    )
    op.create_table(
        "refunds",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column(
            "enrollment_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("payment_id", sa.String(length=36), nullable=False),
        sa.Column("amount_cents", sa.Integer(), nullable=False),
        sa.Column("is_full", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("mode", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("gateway_reference", sa.String(length=128), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column(
            "admin_user_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("idempotency_key", sa.String(length=128), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["admin_user_id"], ["users.id"], name=op.f("fk_refunds_admin_user_id_users")
        ),
        sa.ForeignKeyConstraint(
            ["enrollment_id"], ["enrollments.id"], name=op.f("fk_refunds_enrollment_id_enrollments")
        ),
        sa.ForeignKeyConstraint(
            ["payment_id"], ["payments.id"], name=op.f("fk_refunds_payment_id_payments")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_refunds")),
        sa.UniqueConstraint(
            "admin_user_id", "idempotency_key", name=op.f("uq_refunds_admin_user_id")
        ),
    )
    op.create_index(op.f("ix_refunds_admin_user_id"), "refunds", ["admin_user_id"], unique=False)
    op.create_index(op.f("ix_refunds_enrollment_id"), "refunds", ["enrollment_id"], unique=False)
    op.create_index(op.f("ix_refunds_payment_id"), "refunds", ["payment_id"], unique=False)
    op.create_index(
        "uq_refunds_full_per_payment",
        "refunds",
        ["payment_id"],
        unique=True,
        postgresql_where=sa.text("is_full AND state <> 'failed'"),
        sqlite_where=sa.text("is_full AND state <> 'failed'"),
    )
    op.add_column("payments", sa.Column("reconciled_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("payments", "reconciled_at")
    op.drop_index(
        "uq_refunds_full_per_payment",
        table_name="refunds",
        postgresql_where=sa.text("is_full AND state <> 'failed'"),
        sqlite_where=sa.text("is_full AND state <> 'failed'"),
    )
    op.drop_index(op.f("ix_refunds_payment_id"), table_name="refunds")
    op.drop_index(op.f("ix_refunds_enrollment_id"), table_name="refunds")
    op.drop_index(op.f("ix_refunds_admin_user_id"), table_name="refunds")
    op.drop_table("refunds")
    op.drop_index(
        "uq_statement_lines_exact_enrollment",
        table_name="statement_lines",
        postgresql_where=sa.text("match = 'exact'"),
        sqlite_where=sa.text("match = 'exact'"),
    )
    op.drop_index(op.f("ix_statement_lines_statement_id"), table_name="statement_lines")
    op.drop_index(op.f("ix_statement_lines_enrollment_id"), table_name="statement_lines")
    op.drop_table("statement_lines")
    op.drop_index(op.f("ix_reconciliation_findings_run_id"), table_name="reconciliation_findings")
    op.drop_table("reconciliation_findings")
    op.drop_index(
        "uq_enrollment_flags_open",
        table_name="enrollment_flags",
        postgresql_where=sa.text("cleared_at IS NULL"),
        sqlite_where=sa.text("cleared_at IS NULL"),
    )
    op.drop_index(op.f("ix_enrollment_flags_enrollment_id"), table_name="enrollment_flags")
    op.drop_table("enrollment_flags")
    op.drop_table("bank_statements")
    op.drop_index(op.f("ix_reconciliation_runs_started_at"), table_name="reconciliation_runs")
    op.drop_table("reconciliation_runs")
