"""Run one stage for one event: one transaction, idempotent, with its attempt recorded.

The event row is locked first; a stage that already ran (a duplicate message, a re-drive by
the sweeper racing the original) finds the event past it and does nothing.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from datetime import timedelta

import structlog
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from config import Settings
from models import (
    DeadLetter,
    EventState,
    StageAttempt,
    WebhookEvent,
    on_commit,
    session_scope,
    utcnow,
)
from pipeline.errors import InvalidTransition, NotFound, describe
from pipeline.stages import STAGE_NAMES, STAGES, next_stage

log = structlog.get_logger(__name__)

Enqueue = Callable[[int, str], object]
# The stage that changes the enrollment commits durably before anything is told about it.
DURABLE_STAGES = frozenset({"status_update"})


def lock_event(session: Session, event_id: int) -> WebhookEvent | None:
    return session.execute(
        select(WebhookEvent)
        .where(WebhookEvent.id == event_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).scalar_one_or_none()


def run_stage(stage: str, event_id: int, attempt: int, settings: Settings) -> str | None:
    """Run `stage` for the event if it is the event's next stage, and commit.

    Returns the stage to enqueue next, or None: the event is complete, or this stage had
    already run (a duplicate message), in which case whoever ran it enqueued what follows.
    """
    started = time.perf_counter()
    with session_scope() as session:
        event = lock_event(session, event_id)
        if event is None:
            log.warning("pipeline.event_missing", event_id=event_id, stage=stage)
            return None
        if event.state in (EventState.COMPLETED, EventState.DEAD) or event.stage != stage:
            return None
        if stage not in DURABLE_STAGES and session.bind.dialect.name == "postgresql":  # type: ignore[union-attr]
            # Losing this commit in a database crash loses only progress: the inbox row is
            # durable, stages are idempotent, and the sweeper re-drives the event. Not waiting
            # for the WAL flush saves a disk sync per hop.
            session.execute(text("SET LOCAL synchronous_commit = off"))
        event.state = EventState.PROCESSING
        STAGES[stage](session, event, settings)
        now = utcnow()
        following = next_stage(stage)
        if following is None:
            event.state = EventState.COMPLETED
            event.completed_at = now
        else:
            event.stage = following
        event.updated_at = now
        session.add(
            StageAttempt(
                event_id=event_id,
                stage=stage,
                attempt=attempt,
                outcome="ok",
                duration_ms=(time.perf_counter() - started) * 1000,
                created_at=now,
            )
        )
    return following


def record_failure(
    stage: str, event_id: int, attempt: int, exc: BaseException, *, final: bool
) -> None:
    """Record a failed attempt; on the final one, move the event to the dead-letter table.

    If the database itself is down this fails too, and the event stays where it was: the
    sweeper re-drives it once the database is back, so it is never lost.
    """
    code, message = describe(exc)
    with session_scope() as session:
        event = lock_event(session, event_id)
        if (
            event is None
            or event.state in (EventState.COMPLETED, EventState.DEAD)
            or event.stage != stage
        ):
            return
        now = utcnow()
        session.add(
            StageAttempt(
                event_id=event_id,
                stage=stage,
                attempt=attempt,
                outcome="failed" if final else "retry",
                error=message,
                created_at=now,
            )
        )
        event.updated_at = now
        if final:
            event.state = EventState.DEAD
            event.outcome = f"dead letter at {stage}: {code}"
            session.add(
                DeadLetter(
                    event_id=event_id,
                    stage=stage,
                    error_code=code,
                    error=message,
                    attempts=attempt,
                    created_at=now,
                )
            )


def backoff_seconds(retries: int, settings: Settings) -> float:
    """Exponential backoff with jitter: half fixed, half random, capped."""
    cap = min(
        settings.pipeline_retry_max_seconds, settings.pipeline_retry_base_seconds * 2**retries
    )
    return cap / 2 + random.uniform(0, cap / 2)


def replay(
    session: Session, dead_letter_id: int, enqueue: Enqueue, from_stage: str | None = None
) -> DeadLetter:
    """Send a dead event back into the pipeline, from its failed stage or an earlier one."""
    letter = session.get(DeadLetter, dead_letter_id)
    if letter is None:
        raise NotFound(f"dead letter {dead_letter_id} does not exist")
    stage = from_stage or letter.stage
    if stage not in STAGE_NAMES:
        raise InvalidTransition(f"unknown stage {stage!r}; stages are {', '.join(STAGE_NAMES)}")
    event = lock_event(session, letter.event_id)
    assert event is not None
    if event.state != EventState.DEAD:
        raise InvalidTransition(
            f"event {event.id} is {event.state}, not dead: it was replayed already"
        )
    now = utcnow()
    event.state = EventState.PROCESSING
    event.stage = stage
    event.updated_at = now
    event.outcome = None
    letter.replay_count += 1
    letter.replayed_at = now
    letter.resolved_at = now
    on_commit(session, lambda: enqueue(event.id, stage))
    return letter


def dead_letters(
    session: Session, *, include_replayed: bool = False, limit: int = 500, offset: int = 0
) -> list[tuple[DeadLetter, WebhookEvent]]:
    """Dead letters with their events, newest first; by default only those not yet replayed."""
    stmt = select(DeadLetter, WebhookEvent).join(
        WebhookEvent, WebhookEvent.id == DeadLetter.event_id
    )
    if not include_replayed:
        stmt = stmt.where(DeadLetter.resolved_at.is_(None))
    rows = session.execute(stmt.order_by(DeadLetter.id.desc()).offset(offset).limit(limit))
    return [(letter, event) for letter, event in rows]


def stalled_events(session: Session, settings: Settings, limit: int = 500) -> list[WebhookEvent]:
    """Events stored or in progress that made no progress for a while, oldest first."""
    cutoff = utcnow() - timedelta(seconds=settings.pipeline_stale_after_seconds)
    return list(
        session.scalars(
            select(WebhookEvent)
            .where(
                WebhookEvent.state.in_((EventState.RECEIVED, EventState.PROCESSING)),
                WebhookEvent.updated_at < cutoff,
            )
            .order_by(WebhookEvent.updated_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
            .execution_options(populate_existing=True)
        )
    )


def sweep(session: Session, settings: Settings, enqueue: Enqueue) -> list[int]:
    """Re-enqueue stalled events from their current stage (a lost message, a killed worker)."""
    ids = []
    for event in stalled_events(session, settings):
        event.updated_at = utcnow()
        ids.append(event.id)
        on_commit(session, lambda e=event.id, s=event.stage: enqueue(e, s))
    return ids
