"""The sweeper: re-drives work that stopped making progress (a message lost between commit
and broker, a worker killed mid-stage or mid-batch). Beat runs it every few seconds."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from config import Settings
from models import BulkJob, BulkJobItem, EventState, WebhookEvent, on_commit, utcnow
from pipeline.runner import Enqueue


def stalled_events(session: Session, settings: Settings, limit: int = 500) -> list[WebhookEvent]:
    """Events stored or in progress that made no progress for a while (and are not waiting
    for a retry that is due later), oldest first."""
    cutoff = utcnow() - timedelta(seconds=settings.pipeline_stale_after_seconds)
    return list(
        session.scalars(
            select(WebhookEvent)
            .where(
                WebhookEvent.state.in_((EventState.RECEIVED, EventState.PROCESSING)),
                WebhookEvent.updated_at < cutoff,
                func.coalesce(WebhookEvent.retry_at, WebhookEvent.updated_at) < cutoff,
            )
            .order_by(WebhookEvent.updated_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
            .execution_options(populate_existing=True)
        )
    )


def redrive_stalled_events(session: Session, settings: Settings, enqueue: Enqueue) -> list[int]:
    """Re-enqueue stalled events from their current stage, after commit.

    A re-drive does not count towards SKILLPAY_PIPELINE_MAX_REDELIVERIES: an event may look
    stalled only because its message waits behind others, and a duplicate message is
    harmless. What counts is a message the broker hands out again because its worker died."""
    ids = []
    for event in stalled_events(session, settings):
        event.updated_at = utcnow()
        ids.append(event.id)
        on_commit(session, lambda e=event.id, s=event.stage: enqueue(e, s))
    return ids


def stalled_jobs(session: Session, settings: Settings) -> list[str]:
    """Bulk jobs queued or running whose items made no progress for a while."""
    cutoff = utcnow() - timedelta(seconds=settings.pipeline_stale_after_seconds)
    last_progress = (
        select(func.max(BulkJobItem.finished_at))
        .where(BulkJobItem.job_id == BulkJob.id)
        .scalar_subquery()
    )
    return list(
        session.scalars(
            select(BulkJob.id).where(
                BulkJob.state.in_(("queued", "running")),
                BulkJob.created_at < cutoff,
                func.coalesce(last_progress, BulkJob.created_at) < cutoff,
            )
        )
    )


def redrive_stalled_jobs(
    session: Session, settings: Settings, enqueue_job: Callable[[str], object]
) -> list[str]:
    """Re-enqueue stalled bulk jobs, after commit; a job resumes where it stopped."""
    ids = stalled_jobs(session, settings)
    for job_id in ids:
        on_commit(session, lambda j=job_id: enqueue_job(j))
    return ids
