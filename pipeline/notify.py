"""Tell the student and the admins about a change: a row to catch up from, and a live push.

The row is written in the same transaction as the change; the push to Redis pub/sub
(channels skillpay:user:<id> and skillpay:admins) happens after commit and is best effort:
a client that missed it reads GET /api/notifications?after=<id>.
"""

from __future__ import annotations

import json
from typing import Any

import structlog
from sqlalchemy.orm import Session

from config import get_settings
from models import Enrollment, EnrollmentHistory, Notification, on_commit

log = structlog.get_logger(__name__)

ADMINS_CHANNEL = "skillpay:admins"


def user_channel(user_id: int) -> str:
    return f"skillpay:user:{user_id}"


def notify_transition(
    session: Session, enrollment: Enrollment, history: EnrollmentHistory
) -> list[Notification]:
    """Write the student's and the admins' notifications of one state change."""
    rows = _rows(enrollment, history)
    _store_and_push(session, rows)
    return rows


def notify_transitions(session: Session, transitions: list[Any]) -> None:
    """notify_transition() for many changes (bulk approval), flushed and pushed together."""
    _store_and_push(session, [row for t in transitions for row in _rows(t.enrollment, t.history)])


def _store_and_push(session: Session, rows: list[Notification]) -> None:
    if not rows:
        return
    session.add_all(rows)
    session.flush()
    on_commit(session, lambda: publish(rows))


def _rows(enrollment: Enrollment, history: EnrollmentHistory) -> list[Notification]:
    payload: dict[str, Any] = {
        "enrollment_id": enrollment.id,
        "course_id": enrollment.course_id,
        "user_id": enrollment.user_id,
        "from": history.from_state,
        "to": history.to_state,
        "course_access": enrollment.course_access,
        "reason": history.reason,
        "source": history.source,
        "at": history.created_at.isoformat(),
    }
    kind = f"enrollment.{history.to_state}"
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


def publish(rows: list[Notification]) -> None:
    url = get_settings().redis_url
    if not url:
        return
    try:
        client = _redis(url)
        pipe = client.pipeline(transaction=False)
        for row in rows:
            channel = ADMINS_CHANNEL if row.audience == "admins" else user_channel(row.user_id or 0)
            message = {"id": row.id, "kind": row.kind, **row.payload}
            pipe.publish(channel, json.dumps(message))
        pipe.execute()
    except Exception as exc:  # noqa: BLE001 - a missed push is caught up from the table
        log.warning("notification.publish_failed", error=type(exc).__name__)


_clients: dict[str, Any] = {}


def _redis(url: str) -> Any:
    import redis

    if url not in _clients:
        _clients[url] = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    return _clients[url]
