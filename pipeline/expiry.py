"""Enrollments that can no longer be paid become expired (beat runs this): card enrollments
not paid by their expiry time, and bank transfers waiting for an admin longer than
SKILLPAY_EFT_APPROVAL_EXPIRY_DAYS with no sign of the money."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from config import Settings
from models import Enrollment, EnrollmentFlag, State, StatementLine, utcnow
from pipeline.checkout import EFT_WAITING_REASON
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
    return _expire(session, settings, ids, frozenset(UNPAID), "not paid in time")


def expire_waiting_transfers(session: Session, settings: Settings, limit: int = 1000) -> int:
    """Close plain bank transfers that waited for an admin longer than the setting, with a
    notice to the student. One parked for anything else (money seen with a mismatch), one a
    bank statement line was matched to, or one flagged for an admin, keeps waiting."""
    days = settings.eft_approval_expiry_days
    if days <= 0:
        return 0
    ids = session.scalars(
        select(Enrollment.id)
        .where(
            Enrollment.state == State.PENDING_APPROVAL,
            Enrollment.waiting_reason == EFT_WAITING_REASON,
            Enrollment.updated_at < utcnow() - timedelta(days=days),
            ~exists().where(StatementLine.enrollment_id == Enrollment.id),
            ~exists().where(
                EnrollmentFlag.enrollment_id == Enrollment.id, EnrollmentFlag.cleared_at.is_(None)
            ),
        )
        .order_by(Enrollment.id)
        .limit(limit)
    ).all()
    reason = f"no bank transfer was confirmed within {days} days; enroll again to pay"
    return _expire(session, settings, ids, frozenset({State.PENDING_APPROVAL}), reason)


def _expire(
    session: Session, settings: Settings, ids: list[int], only_from: frozenset[State], reason: str
) -> int:
    results = transition_enrollments(
        session,
        ids,
        State.EXPIRED,
        actor="scheduler",
        source="expiry",
        reason=reason,
        only_from=only_from,
    )
    changed = [t for t in results.values() if t.changed]
    notify(session, settings, changed)
    return len(changed)
