"""Dead letters: events the pipeline could not complete, listed, and sent back in."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session, joinedload

from models import DeadLetter, EventState, WebhookEvent, on_commit, utcnow
from pipeline.errors import InvalidTransition, NotFound
from pipeline.runner import EVENT_ENROLLMENT_ID, Enqueue, lock_event, with_event_payment
from pipeline.stages import STAGE_NAMES


def replay_dead_letter(
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
    event.redeliveries = 0
    event.retry_at = None
    letter.replay_count += 1
    letter.replayed_at = now
    letter.resolved_at = now
    on_commit(session, lambda: enqueue(event.id, stage))
    return letter


def list_dead_letters(
    session: Session, *, include_replayed: bool = False, limit: int = 500, offset: int = 0
) -> list[DeadLetter]:
    """Dead letters with their events loaded, newest first; by default only those not yet
    replayed."""
    stmt = select(DeadLetter).options(joinedload(DeadLetter.event))
    if not include_replayed:
        stmt = stmt.where(DeadLetter.resolved_at.is_(None))
    return list(session.scalars(stmt.order_by(DeadLetter.id.desc()).offset(offset).limit(limit)))


def open_letters_by_enrollment(
    session: Session, *, limit: int = 100, offset: int = 0
) -> list[tuple[DeadLetter, int]]:
    """Dead letters not yet replayed whose enrollment is known (the event reached it, or
    found its payment), oldest first: each needs an admin's attention."""
    rows = session.execute(
        with_event_payment(select(DeadLetter, EVENT_ENROLLMENT_ID))
        .join(DeadLetter, DeadLetter.event_id == WebhookEvent.id)
        .where(DeadLetter.resolved_at.is_(None), EVENT_ENROLLMENT_ID.is_not(None))
        .options(joinedload(DeadLetter.event))
        .order_by(DeadLetter.created_at, DeadLetter.id)
        .offset(offset)
        .limit(limit)
    )
    return [(letter, enrollment) for letter, enrollment in rows]
