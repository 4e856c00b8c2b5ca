"""Checkout, the course card, admin decisions and expiry: each through the one state machine."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from config import Settings
from models import (
    OPEN_STATES,
    Course,
    Enrollment,
    EnrollmentHistory,
    Payment,
    PaymentMethod,
    State,
    User,
    utcnow,
)
from pipeline.errors import InvalidRequest, NotFound
from pipeline.ikhokha import Gateway, LinkRequest
from pipeline.notify import notify_transition
from pipeline.state_machine import record_creation, transition_enrollment

EFT_WAITING_REASON = "EFT payment: confirm the money is in the bank account"
_REFERENCE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"


def new_reference() -> str:
    return "SP-" + "".join(secrets.choice(_REFERENCE_ALPHABET) for _ in range(8))


@dataclass(frozen=True)
class Checkout:
    enrollment: Enrollment
    payment: Payment | None
    created: bool


def latest_payment(session: Session, enrollment_id: int) -> Payment | None:
    return session.scalar(
        select(Payment)
        .where(Payment.enrollment_id == enrollment_id)
        .order_by(Payment.created_at.desc())
        .limit(1)
    )


def open_enrollment(session: Session, user_id: int, course_id: int) -> Enrollment | None:
    return session.scalar(
        select(Enrollment)
        .where(
            Enrollment.user_id == user_id,
            Enrollment.course_id == course_id,
            Enrollment.state.in_([*OPEN_STATES, State.PAYMENT_FAILED]),
        )
        .order_by(Enrollment.created_at.desc())
        .limit(1)
    )


def start_checkout(
    session: Session,
    settings: Settings,
    gateway: Gateway,
    student: User,
    course_id: int,
    method: str,
) -> Checkout:
    """Enroll a student: card gets a pending_payment enrollment and an iKhokha link; EFT waits
    for an admin. An enrollment already open is returned instead of a second one; after a
    failed payment a new link is made ("Retry Payment").

    The caller's transaction stays open across the iKhokha call, so a gateway error rolls
    everything back and leaves nothing half-made. A callback that outruns the commit finds
    no payment yet and is retried by the pipeline.
    """
    if method not in (PaymentMethod.CARD, PaymentMethod.EFT):
        raise InvalidRequest("payment_method must be 'card' or 'eft'")
    course = session.get(Course, course_id)
    if course is None:
        raise NotFound(f"course {course_id} does not exist")
    existing = open_enrollment(session, student.id, course.id)
    if existing is not None and existing.state != State.PAYMENT_FAILED:
        return Checkout(existing, latest_payment(session, existing.id), created=False)
    if existing is not None:
        # "Retry Payment": the same enrollment, with a new payment.
        enrollment = existing
        eft = method == PaymentMethod.EFT
        result = transition_enrollment(
            session,
            enrollment.id,
            State.PENDING_APPROVAL if eft else State.PENDING_PAYMENT,
            actor=f"user:{student.id}",
            actor_user_id=student.id,
            source="checkout",
            reason=EFT_WAITING_REASON if eft else "retry payment",
        )
        enrollment.payment_method = method
        history = result.history
    else:
        first = State.PENDING_APPROVAL if method == PaymentMethod.EFT else State.PENDING_PAYMENT
        enrollment = Enrollment(
            user_id=student.id,
            course_id=course.id,
            state=first,
            payment_method=method,
            waiting_reason=EFT_WAITING_REASON if method == PaymentMethod.EFT else None,
            expires_at=utcnow() + timedelta(hours=settings.enrollment_expiry_hours),
        )
        session.add(enrollment)
        try:
            with session.begin_nested():
                session.flush()
        except IntegrityError:
            # A concurrent request opened one first: answer with it.
            again = open_enrollment(session, student.id, course.id)
            if again is None:
                raise
            return Checkout(again, latest_payment(session, again.id), created=False)
        history = record_creation(
            session,
            enrollment,
            actor=f"user:{student.id}",
            actor_user_id=student.id,
            reason=EFT_WAITING_REASON if method == PaymentMethod.EFT else None,
        )
    payment = Payment(
        enrollment_id=enrollment.id,
        method=method,
        amount_cents=course.price_cents,
        currency=course.currency,
        reference=new_reference(),
    )
    session.add(payment)
    session.flush()
    if method == PaymentMethod.CARD:
        link = gateway.create_payment_link(
            LinkRequest(
                amount_cents=payment.amount_cents,
                description=f"Skillpay course {course.id}",
                external_transaction_id=payment.id,
                payment_reference=payment.reference,
                callback_url=settings.url_for_public("/webhooks/ikhokha"),
                success_url=settings.url_for_public(f"/payments/{payment.id}/success"),
                failure_url=settings.url_for_public(f"/payments/{payment.id}/failure"),
                cancel_url=settings.url_for_public(f"/payments/{payment.id}/cancel"),
                requester_url=settings.public_base_url,
            )
        )
        payment.paylink_id = link.paylink_id
        payment.paylink_url = link.paylink_url
        session.flush()
    if history is not None:
        notify_transition(session, enrollment, history)
    return Checkout(enrollment, payment, created=True)


CARD_STATES: dict[str | None, tuple[str, str, bool]] = {
    None: ("Enroll Now", "initiate_enrollment", False),
    State.PENDING_PAYMENT: ("Complete Payment", "continue_payment", False),
    State.PENDING_APPROVAL: ("Pending Approval", "show_pending", True),
    State.APPROVED: ("Continue Course", "continue_course", False),
    State.PAYMENT_FAILED: ("Retry Payment", "retry_payment", False),
}


def course_card(session: Session, course_id: int, user: User | None) -> dict[str, Any]:
    """The course card's button for this caller, as the seed designs have it."""
    if session.get(Course, course_id) is None:
        raise NotFound(f"course {course_id} does not exist")
    if user is None:
        return {
            "course_id": course_id,
            "state": None,
            "button_text": "Register To Enroll",
            "action": "redirect_to_auth",
            "disabled": False,
            "course_access": False,
        }
    enrollment = session.scalar(
        select(Enrollment)
        .where(Enrollment.user_id == user.id, Enrollment.course_id == course_id)
        .order_by(Enrollment.created_at.desc())
        .limit(1)
    )
    state = enrollment.state if enrollment is not None else None
    text, action, disabled = CARD_STATES.get(state, CARD_STATES[None])
    card: dict[str, Any] = {
        "course_id": course_id,
        "state": state,
        "button_text": text,
        "action": action,
        "disabled": disabled,
        "course_access": bool(enrollment and enrollment.course_access),
        "enrollment_id": enrollment.id if enrollment else None,
    }
    if enrollment is not None and enrollment.state == State.REJECTED:
        card["message"] = f"Your enrollment was rejected: {enrollment.rejection_reason}"
    if (
        enrollment is not None
        and enrollment.state == State.PENDING_APPROVAL
        and enrollment.payment_method == PaymentMethod.EFT
    ):
        payment = latest_payment(session, enrollment.id)
        if payment is not None:
            card["message"] = (
                f"Pay by bank transfer with reference {payment.reference}; "
                "an admin approves once the money arrives."
            )
    if enrollment is not None and enrollment.state == State.PENDING_PAYMENT:
        payment = latest_payment(session, enrollment.id)
        card["paylink_url"] = payment.paylink_url if payment else None
    return card


def decide(
    session: Session, enrollment_id: int, admin: User, *, approve: bool, reason: str | None = None
) -> tuple[Enrollment, bool]:
    """An admin approves or rejects one enrollment. Returns (enrollment, changed).

    Deciding again the same way changes nothing; anything else not waiting for approval is a
    conflict (409) that says what state the enrollment is in.
    """
    target = State.APPROVED if approve else State.REJECTED
    if not approve and not (reason and reason.strip()):
        raise InvalidRequest("a reason is required to reject, and the student will see it")
    result = transition_enrollment(
        session,
        enrollment_id,
        target,
        actor=f"admin:{admin.id}",
        actor_user_id=admin.id,
        source="admin",
        reason=(reason or "").strip()[:1000] or None,
        only_from=frozenset({State.PENDING_APPROVAL}),
    )
    if result.history is not None:
        notify_transition(session, result.enrollment, result.history)
    return result.enrollment, result.changed


def expire_stale(session: Session, settings: Settings, limit: int = 1000) -> int:
    """Enrollments never paid by their expiry time become expired."""
    ids = session.scalars(
        select(Enrollment.id)
        .where(
            Enrollment.state.in_([State.PENDING_PAYMENT, State.PAYMENT_FAILED]),
            Enrollment.expires_at < utcnow(),
        )
        .limit(limit)
    ).all()
    count = 0
    for enrollment_id in ids:
        result = transition_enrollment(
            session,
            enrollment_id,
            State.EXPIRED,
            actor="scheduler",
            source="expiry",
            reason="not paid in time",
            strict=False,
        )
        if result.history is not None:
            notify_transition(session, result.enrollment, result.history)
            count += 1
    return count


def enrollment_view(
    session: Session, enrollment: Enrollment, *, with_history: bool = True
) -> dict[str, Any]:
    payment = latest_payment(session, enrollment.id)
    view: dict[str, Any] = {
        "id": enrollment.id,
        "user_id": enrollment.user_id,
        "course_id": enrollment.course_id,
        "state": enrollment.state,
        "course_access": enrollment.course_access,
        "payment_method": enrollment.payment_method,
        "waiting_reason": enrollment.waiting_reason,
        "rejection_reason": enrollment.rejection_reason,
        "created_at": enrollment.created_at.isoformat(),
        "updated_at": enrollment.updated_at.isoformat(),
        "approved_at": enrollment.approved_at.isoformat() if enrollment.approved_at else None,
        "payment": None
        if payment is None
        else {
            "id": payment.id,
            "method": payment.method,
            "amount_cents": payment.amount_cents,
            "currency": payment.currency,
            "reference": payment.reference,
            "paylink_url": payment.paylink_url,
            "gateway_status": payment.gateway_status,
        },
    }
    if with_history:
        rows = session.scalars(
            select(EnrollmentHistory)
            .where(EnrollmentHistory.enrollment_id == enrollment.id)
            .order_by(EnrollmentHistory.id)
        )
        view["history"] = [
            {
                "from": h.from_state,
                "to": h.to_state,
                "actor": h.actor,
                "source": h.source,
                "reason": h.reason,
                "event_id": h.event_id,
                "at": h.created_at.isoformat(),
            }
            for h in rows
        ]
    return view
