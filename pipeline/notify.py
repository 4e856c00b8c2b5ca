"""Tell the student and the admins about a change: a row to catch up from, and a live push.

The rows are written in the same transaction as the change; the push to Redis pub/sub
(channels skillpay:user:<id> and skillpay:admins) happens after commit and is best effort:
a client that missed it reads GET /api/notifications?after=<id>.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import redis
import structlog
from sqlalchemy.orm import Session

from config import Settings
from models import Enrollment, EnrollmentHistory, Notification, on_commit, utcnow
from pipeline.state_machine import Transition

log = structlog.get_logger(__name__)

ADMINS_CHANNEL = "skillpay:admins"


def user_channel(user_id: int) -> str:
    return f"skillpay:user:{user_id}"


def notify(session: Session, settings: Settings, transitions: Iterable[Transition]) -> None:
    """Store the student's and the admins' notification of each change, and push them after
    commit. Transitions that changed nothing are passed over."""
    rows = [
        row
        for t in transitions
        if t.changed and t.enrollment is not None and t.history is not None
        for row in _rows(t.enrollment, t.history)
    ]
    if not rows:
        return
    session.add_all(rows)
    session.flush()
    on_commit(session, lambda: publish(settings.redis_url, rows))


def notify_news(
    session: Session,
    settings: Settings,
    enrollment: Enrollment,
    kind: str,
    details: dict[str, Any],
    *,
    student: bool = True,
) -> None:
    """News about an enrollment that is not a change of state: a partial refund (to the
    student and the admins), a flag for the admins alone (student=False)."""
    payload = {**_about(enrollment), **details, "at": utcnow().isoformat()}
    rows = [r for r in _pair(enrollment, kind, payload) if student or r.audience == "admins"]
    session.add_all(rows)
    session.flush()
    on_commit(session, lambda: publish(settings.redis_url, rows))


def _about(enrollment: Enrollment) -> dict[str, Any]:
    return {
        "enrollment_id": enrollment.id,
        "course_id": enrollment.course_id,
        "user_id": enrollment.user_id,
        "course_access": enrollment.course_access,
    }


def _rows(enrollment: Enrollment, history: EnrollmentHistory) -> list[Notification]:
    payload: dict[str, Any] = {
        **_about(enrollment),
        "from": history.from_state,
        "to": history.to_state,
        "reason": history.reason,
        "source": history.source,
        "at": history.created_at.isoformat(),
    }
    return _pair(enrollment, f"enrollment.{history.to_state}", payload)


def _pair(enrollment: Enrollment, kind: str, payload: dict[str, Any]) -> list[Notification]:
    """The student's row and the admins' row of the same news."""
    return [
        Notification(
            audience="student",
            user_id=enrollment.user_id,
            enrollment_id=enrollment.id,
            kind=kind,
            payload=payload,
        ),
        Notification(
            audience="admins", user_id=None, enrollment_id=enrollment.id, kind=kind, payload=payload
        ),
    ]


def publish(redis_url: str, rows: list[Notification]) -> None:
    """Push the rows to their channels; without a Redis URL they are only stored."""
    if not redis_url:
        return
    try:
        pipe = _redis(redis_url).pipeline(transaction=False)
        for row in rows:
            channel = ADMINS_CHANNEL if row.audience == "admins" else user_channel(row.user_id or 0)
            message = {"id": row.id, "kind": row.kind, **row.payload}
            pipe.publish(channel, json.dumps(message))
        pipe.execute()
    except Exception as exc:  # noqa: BLE001 - a missed push is caught up from the table
        log.warning("notification.publish_failed", error=type(exc).__name__)


_clients: dict[str, redis.Redis] = {}


def _redis(url: str) -> redis.Redis:
    if url not in _clients:
        _clients[url] = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    return _clients[url]
