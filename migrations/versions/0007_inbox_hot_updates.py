"""the inbox row updated in place by each stage: no index on the columns a stage changes, one
partial index on the unfinished events, room on each page for the new row versions

Every stage updates its event's row (stage, updated_at, what it found). An UPDATE that
changes no indexed column and finds room on the row's page is a HOT update: no new entry in
any of the table's indexes. The indexes on updated_at and state made every stage's update
write an entry into each of the six indexes. The sweeper and /metrics look for unfinished
events only: a partial index on them serves both.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 06:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

UNFINISHED = sa.text("state IN ('received', 'processing')")


def upgrade() -> None:
    op.drop_index("ix_webhook_events_updated_at", table_name="webhook_events")
    op.drop_index("ix_webhook_events_state", table_name="webhook_events")
    op.create_index(
        "ix_webhook_events_unfinished",
        "webhook_events",
        ["id"],
        postgresql_where=UNFINISHED,
        sqlite_where=UNFINISHED,
    )
    if op.get_bind().dialect.name == "postgresql":
        # Rows written from now on leave a fifth of each page free for their updates.
        op.execute("ALTER TABLE webhook_events SET (fillfactor = 80)")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE webhook_events RESET (fillfactor)")
    op.drop_index("ix_webhook_events_unfinished", table_name="webhook_events")
    op.create_index("ix_webhook_events_state", "webhook_events", ["state"])
    op.create_index("ix_webhook_events_updated_at", "webhook_events", ["updated_at"])
