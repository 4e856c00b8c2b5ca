"""token expiry; when iKhokha was last asked about a payment

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 21:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Both nullable with no default: adding them rewrites nothing and locks only briefly.
    op.add_column("api_tokens", sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column(
        "payments", sa.Column("status_checked_at", sa.DateTime(timezone=True), nullable=True)
    )


def downgrade() -> None:
    op.drop_column("payments", "status_checked_at")
    op.drop_column("api_tokens", "expires_at")
