"""Enrollments never paid by their expiry time become expired (beat runs this)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from config import Settings
from models import Enrollment, State, utcnow
from pipeline.notify import notify
from pipeline.state_machine import transition_enrollments

UNPAID = (State.PENDING_PAYMENT, State.PAYMENT_FAILED)


def expire_unpaid_enrollments(session: Session, settings: Settings, limit: int = 1000) -> int:
    """Expire card enrollments still unpaid after their expiry time. Returns how many."""
    ids = session.scalars(
        select(Enrollment.id)
        .where(Enrollment.state.in_(UNPAID), Enrollment.expires_at < utcnow())
        .order_by(Enrollment.id)
        .limit(limit)
    ).all()
    results = transition_enrollments(
        session,
        ids,
        State.EXPIRED,
        actor="scheduler",
        source="expiry",
        reason="not paid in time",
        only_from=frozenset(UNPAID),
    )
    changed = [t for t in results.values() if t.changed]
    notify(session, settings, changed)
    return len(changed)
