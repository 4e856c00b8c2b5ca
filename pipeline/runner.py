"""Run one stage for one event: one transaction, idempotent, with its attempt recorded; on
failure, record the attempt, and on the last one, write the dead letter.

The event row is locked first; a stage that already ran (a duplicate message, a re-drive by
the sweeper racing the original) finds the event past it and does nothing.
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta

import structlog
from sqlalchemy import Insert, Select, Table, Update, bindparam, func, select
from sqlalchemy.orm import Session

from config import Settings
from models import (
    DeadLetter,
    Enrollment,
    EventState,
    Payment,
    StageAttempt,
    WebhookEvent,
    session_scope,
    utcnow,
)
from pipeline.errors import describe
from pipeline.notify import notify_news
from pipeline.stages import STAGE_OUTPUTS, STAGES, EventRow, StageContext, next_stage

log = structlog.get_logger(__name__)

Enqueue = Callable[[int, str], object]
# The stage that changes the enrollment commits durably before anything is told about it.
DURABLE_STAGES = frozenset({"status_update"})


# An event's enrollment, once known: found by the lookup stage, or through the payment that
# detection found. Select it from with_event_payment(...).
EVENT_ENROLLMENT_ID = func.coalesce(WebhookEvent.enrollment_id, Payment.enrollment_id)


def with_event_payment(stmt: Select) -> Select:
    """stmt, over webhook_events, joined to the payment detection found (if any)."""
    return stmt.select_from(WebhookEvent).outerjoin(Payment, Payment.id == WebhookEvent.payment_id)


def lock_event(session: Session, event_id: int) -> WebhookEvent | None:
    return session.execute(
        select(WebhookEvent)
        .where(WebhookEvent.id == event_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).scalar_one_or_none()


_EVENTS: Table = WebhookEvent.__table__  # type: ignore[assignment]
_ATTEMPTS: Table = StageAttempt.__table__  # type: ignore[assignment]
_EVENT_COLUMNS = tuple(column.name for column in _EVENTS.columns)


@functools.cache
def _lock_statement(postgresql: bool, durable: bool) -> Select:
    """The event's row, locked. A stage that need not commit durably switches
    synchronous_commit off for its transaction in the same statement: losing such a commit
    in a database crash loses only progress (the inbox row is durable, stages are idempotent,
    and the sweeper re-drives the event), and not waiting for the WAL flush saves a disk sync
    per hop. Built once each way; the event id is bound per call."""
    stmt = select(*_EVENTS.columns).where(_EVENTS.c.id == bindparam("event_id")).with_for_update()
    if postgresql and not durable:
        stmt = stmt.add_columns(func.set_config("synchronous_commit", "off", True))
    return stmt


def _lock_for_stage(session: Session, event_id: int, durable: bool) -> EventRow | None:
    postgresql = session.get_bind().dialect.name == "postgresql"
    row = session.execute(_lock_statement(postgresql, durable), {"event_id": event_id}).first()
    if row is None:
        return None
    return EventRow(**dict(zip(_EVENT_COLUMNS, row, strict=False)))


# Always written when a stage completes, whatever it found.
_PROGRESS = ("state", "stage", "updated_at", "completed_at", "redeliveries", "retry_at")
_ATTEMPT = ("event_id", "stage", "attempt", "outcome", "duration_ms", "created_at")


@functools.cache
def _progress_statement(postgresql: bool, columns: tuple[str, ...]) -> tuple[Update, Insert | None]:
    """The UPDATE of the event's `columns` and the INSERT of the attempt row; on PostgreSQL
    one statement (the INSERT as a CTE of the UPDATE). Built once per set of columns a stage
    writes; the values are bound per call (the attempt's under `attempt_` names)."""
    update_event = (
        _EVENTS.update()
        .where(_EVENTS.c.id == bindparam("event_id"))
        .values({name: bindparam(name, type_=_EVENTS.c[name].type) for name in columns})
    )
    insert_attempt = _ATTEMPTS.insert().values(
        {name: bindparam(f"attempt_{name}", type_=_ATTEMPTS.c[name].type) for name in _ATTEMPT}
    )
    if postgresql:
        return update_event.add_cte(insert_attempt.cte("attempt")), None
    return update_event, insert_attempt


def _save_progress(session: Session, event: EventRow, before: dict, attempt: dict) -> None:
    """Write what the stage changed on its event, and its attempt record."""
    changed = tuple(name for name in STAGE_OUTPUTS if getattr(event, name) != before[name])
    postgresql = session.get_bind().dialect.name == "postgresql"
    update_event, insert_attempt = _progress_statement(postgresql, changed + _PROGRESS)
    params = {name: getattr(event, name) for name in changed + _PROGRESS}
    params |= {f"attempt_{name}": attempt[name] for name in _ATTEMPT}
    params["event_id"] = event.id
    session.execute(update_event, params)
    if insert_attempt is not None:
        session.execute(insert_attempt, params)


def run_stage(
    stage: str, event_id: int, attempt: int, ctx: StageContext, *, redelivered: bool = False
) -> str | None:
    """Run `stage` for the event if it is the event's next stage, and commit.

    Returns the stage to enqueue next, or None: the event is complete, or this stage had
    already run (a duplicate message), in which case whoever ran it enqueued what follows;
    unless this message is a redelivery: its first holder may have died between its commit
    and sending the next message, so the event's current stage is sent again (a duplicate
    finds its stage done and does nothing).

    The event row is read and written with SQL expressions, not the ORM: a stage is three
    statements of its own (lock, save progress, commit) around what its body does.
    """
    started = time.perf_counter()
    spec = STAGES[stage]
    if spec.fetch is not None:
        ctx = replace(ctx, fetched=spec.fetch(event_id, ctx))
    with session_scope() as session:
        event = _lock_for_stage(session, event_id, durable=stage in DURABLE_STAGES)
        if event is None:
            log.warning("pipeline.event_missing", event_id=event_id, stage=stage)
            return None
        if event.state in (EventState.COMPLETED, EventState.DEAD):
            return None
        if event.stage != stage:
            return event.stage if redelivered else None
        before = {name: getattr(event, name) for name in STAGE_OUTPUTS}
        spec.run(session, event, ctx)
        now = utcnow()
        following = next_stage(stage)
        event.state = EventState.PROCESSING if following else EventState.COMPLETED
        event.completed_at = None if following else now
        event.stage = following or stage
        event.updated_at = now
        event.redeliveries = 0
        event.retry_at = None
        _save_progress(
            session,
            event,
            before,
            {
                "event_id": event_id,
                "stage": stage,
                "attempt": attempt,
                "outcome": "ok",
                "duration_ms": (time.perf_counter() - started) * 1000,
                "created_at": now,
            },
        )
    return following


def record_failure(
    stage: str,
    event_id: int,
    attempt: int,
    exc: BaseException,
    settings: Settings,
    *,
    final: bool,
    retry_in: float = 0.0,
) -> None:
    """Record a failed attempt; on the final one, move the event to the dead-letter table.
    Otherwise the retry is due in `retry_in` seconds, and the sweeper leaves it until then.

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
            bury(session, settings, event, code, message, attempts=attempt)
        else:
            event.retry_at = now + timedelta(seconds=retry_in)


def bury(
    session: Session,
    settings: Settings,
    event: WebhookEvent,
    code: str,
    message: str,
    attempts: int,
) -> None:
    """Move the event to the dead-letter table at its current stage (replayable). When its
    enrollment is known the admins are told: it needs attention, and nobody waits silently."""
    now = utcnow()
    event.state = EventState.DEAD
    event.outcome = f"dead letter at {event.stage}: {code}"
    event.updated_at = now
    event.retry_at = None
    letter = DeadLetter(
        event_id=event.id,
        stage=event.stage,
        error_code=code,
        error=message,
        attempts=attempts,
        created_at=now,
    )
    session.add(letter)
    session.flush()
    log.error("pipeline.dead_letter", event_id=event.id, stage=event.stage, error_code=code)
    enrollment_id = session.scalar(
        with_event_payment(select(EVENT_ENROLLMENT_ID)).where(WebhookEvent.id == event.id)
    )
    enrollment = session.get(Enrollment, enrollment_id) if enrollment_id is not None else None
    if enrollment is not None:
        notify_news(
            session,
            settings,
            enrollment,
            "enrollment.needs_attention",
            {"dead_letter_id": letter.id, "stage": letter.stage, "error": message[:300]},
            student=False,
        )


def count_redelivery(session: Session, event: WebhookEvent, settings: Settings) -> bool:
    """Count one more delivery of the event's current stage by the broker after a worker
    died holding it. Past SKILLPAY_PIPELINE_MAX_REDELIVERIES the event is dead-lettered and
    False is returned: a message that kills every worker that takes it stops being handed
    out (on both brokers; RabbitMQ's own delivery limit is only a backstop)."""
    event.redeliveries += 1
    event.updated_at = utcnow()
    if event.redeliveries <= settings.pipeline_max_redeliveries:
        return True
    bury(
        session,
        settings,
        event,
        "redelivery_limit",
        f"the {event.stage} stage was handed out {event.redeliveries} times without "
        "finishing: each time the worker running it died or lost its broker connection",
        attempts=event.redeliveries,
    )
    return False


def note_redelivery(stage: str, event_id: int, settings: Settings) -> bool:
    """A message for `stage` came back from the broker (its worker died holding it): count
    it, in a transaction of its own, before the stage runs again. False: do not run it."""
    with session_scope() as session:
        event = lock_event(session, event_id)
        if (
            event is None
            or event.state not in (EventState.RECEIVED, EventState.PROCESSING)
            or event.stage != stage
        ):
            return True  # run_stage sorts out what this message means now
        return count_redelivery(session, event, settings)


def backoff_seconds(retries: int, settings: Settings) -> float:
    """Exponential backoff with jitter: half fixed, half random, capped."""
    cap = min(
        settings.pipeline_retry_max_seconds, settings.pipeline_retry_base_seconds * 2**retries
    )
    return cap / 2 + random.uniform(0, cap / 2)
