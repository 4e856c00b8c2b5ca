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
from sqlalchemy import Table
from sqlalchemy.orm import Session

from config import Settings
from models import Enrollment, EnrollmentHistory, Notification, on_commit, utcnow
from models.db import insert_many
from pipeline.state_machine import Transition

log = structlog.get_logger(__name__)
_NOTIFICATIONS: Table = Notification.__table__  # type: ignore[assignment]

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
    _store(session, settings, rows)


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
    rows = [r for r in _pair(enrollment, kind, payload) if student or r["audience"] == "admins"]
    _store(session, settings, rows)


def _store(session: Session, settings: Settings, rows: list[dict[str, Any]]) -> None:
    """Insert the rows in one statement, and push them once the transaction commits."""
    if not rows:
        return
    for row, row_id in zip(rows, insert_many(session, _NOTIFICATIONS, rows), strict=True):
        row["id"] = row_id
    on_commit(session, lambda: publish(settings.redis_url, rows))


def _about(enrollment: Enrollment) -> dict[str, Any]:
    return {
        "enrollment_id": enrollment.id,
        "course_id": enrollment.course_id,
        "user_id": enrollment.user_id,
        "course_access": enrollment.course_access,
    }


def _rows(enrollment: Enrollment, history: EnrollmentHistory) -> list[dict[str, Any]]:
    payload: dict[str, Any] = {
        **_about(enrollment),
        "from": history.from_state,
        "to": history.to_state,
        "reason": history.reason,
        "source": history.source,
        "at": history.created_at.isoformat(),
    }
    return _pair(enrollment, f"enrollment.{history.to_state}", payload)


def _pair(enrollment: Enrollment, kind: str, payload: dict[str, Any]) -> list[dict[str, Any]]:
    """The student's row and the admins' row of the same news (notifications columns)."""
    return [
        {
            "audience": audience,
            "user_id": user_id,
            "enrollment_id": enrollment.id,
            "kind": kind,
            "payload": payload,
        }
        for audience, user_id in (("student", enrollment.user_id), ("admins", None))
    ]


# One round trip and one reply for a whole batch of pushes (a bulk approval makes thousands):
# ARGV is channel, message, channel, message, ...
_PUBLISH_ALL = """
for i = 1, #ARGV, 2 do
  redis.call('PUBLISH', ARGV[i], ARGV[i + 1])
end
return #ARGV / 2
"""


def publish(redis_url: str, rows: list[dict[str, Any]]) -> None:
    """Push the stored rows to their channels; without a Redis URL they are only stored."""
    if not redis_url:
        return
    args: list[str] = []
    for row in rows:
        channel = (
            ADMINS_CHANNEL if row["audience"] == "admins" else user_channel(row["user_id"] or 0)
        )
        args += (channel, json.dumps({"id": row["id"], "kind": row["kind"], **row["payload"]}))
    try:
        _redis(redis_url).eval(_PUBLISH_ALL, 0, *args)
    except Exception as exc:  # noqa: BLE001 - a missed push is caught up from the table
        log.warning("notification.publish_failed", error=type(exc).__name__)


_clients: dict[str, redis.Redis] = {}


def _redis(url: str) -> redis.Redis:
    if url not in _clients:
        _clients[url] = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    return _clients[url]
