"""An admin approves or rejects one enrollment waiting for approval."""

from __future__ import annotations

from sqlalchemy.orm import Session

from config import Settings
from models import Enrollment, State, User
from pipeline.checkout import EFT_WAITING_REASON
from pipeline.errors import InvalidRequest
from pipeline.notify import notify
from pipeline.state_machine import Transition, transition_enrollment

WAITING = frozenset({State.PENDING_APPROVAL})


def needs_individual_review(enrollment: Enrollment) -> bool:
    """Parked for something other than a plain bank transfer (an amount or paylink mismatch,
    a status iKhokha did not confirm, an uncertain payment type): an admin must look at it on
    its own, so bulk approval passes it over."""
    return enrollment.waiting_reason not in (None, EFT_WAITING_REASON)


def approve_enrollment(
    session: Session, settings: Settings, enrollment_id: int, admin: User
) -> Transition:
    """Approve an enrollment waiting for approval. Approving again changes nothing; any other
    state is a conflict (InvalidTransition, 409) that says what state it is in."""
    return _decide(session, settings, enrollment_id, admin, State.APPROVED, None)


def reject_enrollment(
    session: Session, settings: Settings, enrollment_id: int, admin: User, reason: str
) -> Transition:
    """Reject an enrollment waiting for approval, with a reason the student will see."""
    reason = (reason or "").strip()[:1000]
    if not reason:
        raise InvalidRequest("a reason is required to reject, and the student will see it")
    return _decide(session, settings, enrollment_id, admin, State.REJECTED, reason)


def _decide(
    session: Session,
    settings: Settings,
    enrollment_id: int,
    admin: User,
    target: State,
    reason: str | None,
) -> Transition:
    result = transition_enrollment(
        session,
        enrollment_id,
        target,
        actor=f"admin:{admin.id}",
        actor_user_id=admin.id,
        source="admin",
        reason=reason,
        only_from=WAITING,
    )
    notify(session, settings, [result])
    return result
