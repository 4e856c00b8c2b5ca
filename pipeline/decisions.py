"""An admin approves or rejects one enrollment waiting for approval.

Four-eyes: above SKILLPAY_FOUR_EYES_ABOVE_CENTS an admin's approval is a request, recorded and
shown to the other admins; the enrollment is approved when a different admin approves it too.
The one who asked cannot confirm their own request, and bulk approval passes such rows over.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from config import Settings
from models import ApprovalRequest, Enrollment, State, User, utcnow
from pipeline.checkout import EFT_WAITING_REASON
from pipeline.errors import InvalidRequest, NotFound
from pipeline.notify import notify, notify_news
from pipeline.payments import amounts_due
from pipeline.state_machine import Outcome, Transition, lock_enrollments, transition_enrollment

WAITING = frozenset({State.PENDING_APPROVAL})


def needs_individual_review(enrollment: Enrollment) -> bool:
    """Parked for something other than a plain bank transfer (an amount or paylink mismatch,
    a status iKhokha did not confirm, an uncertain payment type): an admin must look at it on
    its own, so bulk approval passes it over."""
    return enrollment.waiting_reason not in (None, EFT_WAITING_REASON)


@dataclass(frozen=True)
class Decision:
    """What an admin's approval or rejection did. `awaiting` is the four-eyes request when
    the approval now waits for a second admin (the enrollment did not change)."""

    transition: Transition
    awaiting: ApprovalRequest | None = None


def needs_two_admins(settings: Settings, amount_cents: int | None) -> bool:
    threshold = settings.four_eyes_above_cents
    return bool(threshold) and amount_cents is not None and amount_cents > threshold


def open_requests(session: Session, enrollment_ids: Sequence[int]) -> dict[int, ApprovalRequest]:
    """The open four-eyes request of each enrollment that has one."""
    rows = session.scalars(
        select(ApprovalRequest).where(
            ApprovalRequest.enrollment_id.in_(list(enrollment_ids)),
            ApprovalRequest.confirmed_at.is_(None),
            ApprovalRequest.cancelled_at.is_(None),
        )
    )
    return {row.enrollment_id: row for row in rows}


def approve_enrollment(
    session: Session, settings: Settings, enrollment_id: int, admin: User
) -> Decision:
    """Approve an enrollment waiting for approval. Approving again changes nothing; any other
    state is a conflict (InvalidTransition, 409) that says what state it is in. Above the
    four-eyes amount the first admin's approval is a request a second admin confirms."""
    reason = None
    if settings.four_eyes_above_cents:
        enrollment = lock_enrollments(session, [enrollment_id]).get(enrollment_id)
        if enrollment is None:
            raise NotFound(f"enrollment {enrollment_id} does not exist")
        amount = amounts_due(session, [enrollment_id]).get(enrollment_id)
        if enrollment.state == State.PENDING_APPROVAL and needs_two_admins(settings, amount):
            assert amount is not None
            request = _current_request(session, enrollment)
            if request is None or request.requested_by == admin.id:
                return _awaiting(session, settings, enrollment, admin, amount, request)
            request.confirmed_by, request.confirmed_at = admin.id, utcnow()
            reason = (
                f"four-eyes approval: asked by admin {request.requested_by}, "
                f"confirmed by admin {admin.id}"
            )
    return Decision(_decide(session, settings, enrollment_id, admin, State.APPROVED, reason))


def _current_request(session: Session, enrollment: Enrollment) -> ApprovalRequest | None:
    """The open request made while the enrollment has been waiting this time; one left from
    an earlier stay in the queue is void (it was about another payment, or none)."""
    request = open_requests(session, [enrollment.id]).get(enrollment.id)
    if request is None:
        return None
    if enrollment.waiting_since is not None and request.requested_at < enrollment.waiting_since:
        request.cancelled_at = utcnow()
        session.flush()
        return None
    return request


def _awaiting(
    session: Session,
    settings: Settings,
    enrollment: Enrollment,
    admin: User,
    amount: int,
    request: ApprovalRequest | None,
) -> Decision:
    """The first admin's approval: recorded (once), the other admins told."""
    if request is None:
        request = ApprovalRequest(
            enrollment_id=enrollment.id, amount_cents=amount, requested_by=admin.id
        )
        session.add(request)
        session.flush()
        notify_news(
            session,
            settings,
            enrollment,
            "enrollment.approval_requested",
            {"requested_by": admin.id, "amount_cents": amount},
            student=False,
        )
    waiting = Transition(
        enrollment.id,
        Outcome.REFUSED,
        enrollment,
        enrollment.state,
        State.APPROVED,
        refusal="waits for a second admin to confirm the approval",
    )
    return Decision(waiting, awaiting=request)


def reject_enrollment(
    session: Session, settings: Settings, enrollment_id: int, admin: User, reason: str
) -> Decision:
    """Reject an enrollment waiting for approval, with a reason the student will see. An
    open four-eyes request for it is cancelled."""
    reason = (reason or "").strip()[:1000]
    if not reason:
        raise InvalidRequest("a reason is required to reject, and the student will see it")
    result = _decide(session, settings, enrollment_id, admin, State.REJECTED, reason)
    if result.changed:
        session.execute(
            update(ApprovalRequest)
            .where(
                ApprovalRequest.enrollment_id == enrollment_id,
                ApprovalRequest.confirmed_at.is_(None),
                ApprovalRequest.cancelled_at.is_(None),
            )
            .values(cancelled_at=utcnow())
        )
    return Decision(result)


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
