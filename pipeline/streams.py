"""What the live stream needs from the database: one-use tickets, and the notifications a
subscriber is owed (the stored rows are the truth; Redis pub/sub only says "look now")."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from models import Notification, StreamTicket, User, utcnow
from pipeline.accounts import hash_token

TICKET_PREFIX = "st_"
ADMINS = "admins"


def audience_of(user: User) -> str:
    """The stream a user reads: the admins' channel, or their own."""
    return ADMINS if user.is_admin else f"user:{user.id}"


def issue_ticket(session: Session, user: User, ttl: timedelta) -> str:
    """A ticket for one connection, valid for `ttl`; only its hash is stored."""
    ticket = TICKET_PREFIX + secrets.token_urlsafe(24)
    session.add(
        StreamTicket(ticket_hash=hash_token(ticket), user_id=user.id, expires_at=utcnow() + ttl)
    )
    session.flush()
    return ticket


def redeem_ticket(session: Session, ticket: str) -> User | None:
    """The ticket's user, once: the same ticket again, or an expired one, gives None."""
    if not ticket.startswith(TICKET_PREFIX) or len(ticket) > 100:
        return None
    now = utcnow()
    user_id = session.execute(
        update(StreamTicket)
        .where(
            StreamTicket.ticket_hash == hash_token(ticket),
            StreamTicket.used_at.is_(None),
            StreamTicket.expires_at > now,
        )
        .values(used_at=now)
        .returning(StreamTicket.user_id)
    ).scalar_one_or_none()
    return session.get(User, user_id) if user_id is not None else None


def _for(audience: str):
    if audience == ADMINS:
        return Notification.audience == "admins"
    user_id = int(audience.split(":", 1)[1])
    return (Notification.audience == "student") & (Notification.user_id == user_id)


def notifications_after(
    session: Session, audience: str, after_id: int, limit: int = 1000
) -> list[Notification]:
    """What a subscriber missed since `after_id` (its Last-Event-ID), oldest first."""
    return list(
        session.scalars(
            select(Notification)
            .where(_for(audience), Notification.id > after_id)
            .order_by(Notification.id)
            .limit(limit)
        )
    )


def notifications_by_id(session: Session, ids: Sequence[int]) -> list[Notification]:
    return list(
        session.scalars(
            select(Notification).where(Notification.id.in_(ids)).order_by(Notification.id)
        )
    )


def newest_notification_id(session: Session) -> int:
    return session.scalar(select(Notification.id).order_by(Notification.id.desc()).limit(1)) or 0


def notifications_since(session: Session, after_id: int, limit: int = 1000) -> list[Notification]:
    """Every audience's notifications after an id: how the stream server catches up after it
    lost Redis, or polls when there is no Redis at all."""
    return list(
        session.scalars(
            select(Notification)
            .where(Notification.id > after_id)
            .order_by(Notification.id)
            .limit(limit)
        )
    )
