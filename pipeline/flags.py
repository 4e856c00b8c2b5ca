"""Flags: an enrollment an admin must look at, for a reason no state says (reconciliation found
an approval iKhokha does not confirm, say). A flag never changes the enrollment: access is
never revoked automatically. An admin clears it with a note; both ends are on record."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, joinedload

from config import Settings
from models import Enrollment, EnrollmentFlag, User, utcnow
from pipeline.errors import InvalidRequest, InvalidTransition, NotFound
from pipeline.notify import notify_news


def raise_flag(
    session: Session,
    settings: Settings,
    enrollment: Enrollment,
    kind: str,
    reason: str,
    source: str,
) -> EnrollmentFlag | None:
    """Flag the enrollment for the admins; None when a flag of this kind is open already."""
    open_one = session.scalar(
        select(EnrollmentFlag.id).where(
            EnrollmentFlag.enrollment_id == enrollment.id,
            EnrollmentFlag.kind == kind,
            EnrollmentFlag.cleared_at.is_(None),
        )
    )
    if open_one is not None:
        return None
    flag = EnrollmentFlag(enrollment_id=enrollment.id, kind=kind, reason=reason, source=source)
    try:
        with session.begin_nested():
            session.add(flag)
    except IntegrityError:  # raised at the same moment by another run
        return None
    notify_news(
        session,
        settings,
        enrollment,
        "enrollment.flagged",
        {"kind": kind, "reason": reason},
        student=False,
    )
    return flag


def open_flags(session: Session, *, limit: int = 100, offset: int = 0) -> list[EnrollmentFlag]:
    return list(
        session.scalars(
            select(EnrollmentFlag)
            .where(EnrollmentFlag.cleared_at.is_(None))
            .options(joinedload(EnrollmentFlag.enrollment))
            .order_by(EnrollmentFlag.created_at, EnrollmentFlag.id)
            .limit(limit)
            .offset(offset)
        )
    )


def clear_flag(session: Session, flag_id: int, admin: User, note: str) -> EnrollmentFlag:
    """An admin looked at it: the flag is closed, with what they found."""
    note = (note or "").strip()[:1000]
    if not note:
        raise InvalidRequest("a note is required: say what you found")
    flag = session.scalar(
        select(EnrollmentFlag).where(EnrollmentFlag.id == flag_id).with_for_update()
    )
    if flag is None:
        raise NotFound(f"flag {flag_id} does not exist")
    if flag.cleared_at is not None:
        raise InvalidTransition(f"flag {flag_id} was cleared already")
    flag.cleared_at, flag.cleared_by, flag.note = utcnow(), admin.id, note
    return flag
