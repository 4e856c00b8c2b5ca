"""Checkout: a student enrolls in a course, by card (an iKhokha payment link) or by EFT."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from config import Settings
from models import OPEN_STATES, Course, Enrollment, Payment, PaymentMethod, State, User, utcnow
from models.tables import new_uuid
from pipeline.errors import InvalidRequest, NotFound
from pipeline.ikhokha import Gateway, LinkRequest
from pipeline.notify import notify
from pipeline.payments import latest_payment, new_reference
from pipeline.state_machine import Outcome, Transition, create_enrollment, transition_enrollment

EFT_WAITING_REASON = "EFT payment: confirm the money is in the bank account"


@dataclass(frozen=True)
class Checkout:
    enrollment: Enrollment
    payment: Payment | None
    # A new enrollment was made (the API answers 201). False for an open enrollment returned
    # as it is, and for "Retry Payment" (the same enrollment with a new payment).
    enrollment_created: bool
    payment_created: bool


def open_enrollment(session: Session, user_id: int, course_id: int) -> Enrollment | None:
    """The student's enrollment in the course that a new checkout would continue, if any."""
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


def _as_it_is(session: Session, enrollment: Enrollment) -> Checkout:
    return Checkout(enrollment, latest_payment(session, enrollment.id), False, False)


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
    failed payment a new payment is made on the same enrollment ("Retry Payment").

    The iKhokha link is asked for first, with the session's read transaction ended and no row
    locked, so a slow gateway holds up nobody; its error leaves nothing behind. The rows are
    then written in the session's next transaction, which the caller commits. A link made for
    a checkout that lost a race is never stored and never shown: nobody can pay it.
    """
    if method not in (PaymentMethod.CARD, PaymentMethod.EFT):
        raise InvalidRequest("payment_method must be 'card' or 'eft'")
    method = PaymentMethod(method)
    course = session.get(Course, course_id)
    if course is None:
        raise NotFound(f"course {course_id} does not exist")
    existing = open_enrollment(session, student.id, course.id)
    if existing is not None and existing.state != State.PAYMENT_FAILED:
        return _as_it_is(session, existing)
    payment = Payment(
        id=new_uuid(),
        method=method,
        amount_cents=course.price_cents,
        currency=course.currency,
        reference=new_reference(),
    )
    if method == PaymentMethod.CARD:
        session.commit()  # ends the read transaction: nothing is held during the call
        link = gateway.create_payment_link(_link_request(settings, course, payment))
        payment.paylink_id, payment.paylink_url = link.paylink_id, link.paylink_url
    transition = _enter_checkout(session, settings, student, course, method, existing)
    if transition.outcome is not Outcome.CHANGED:
        assert transition.enrollment is not None
        return _as_it_is(session, transition.enrollment)
    assert transition.enrollment is not None
    payment.enrollment_id = transition.enrollment.id
    session.add(payment)
    session.flush()
    notify(session, settings, [transition])
    return Checkout(transition.enrollment, payment, existing is None, True)


def _link_request(settings: Settings, course: Course, payment: Payment) -> LinkRequest:
    return LinkRequest(
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


def _enter_checkout(
    session: Session,
    settings: Settings,
    student: User,
    course: Course,
    method: PaymentMethod,
    failed: Enrollment | None,
) -> Transition:
    """Create the enrollment, or move the failed one back to waiting. Anything other than
    CHANGED means somebody else got there first: the caller answers with what is there."""
    eft = method == PaymentMethod.EFT
    state = State.PENDING_APPROVAL if eft else State.PENDING_PAYMENT
    reason = EFT_WAITING_REASON if eft else None
    actor = {"actor": f"user:{student.id}", "actor_user_id": student.id, "source": "checkout"}
    if failed is not None:
        return transition_enrollment(
            session,
            failed.id,
            state,
            reason=reason or "retry payment",
            only_from=frozenset({State.PAYMENT_FAILED}),
            payment_method=method,
            strict=False,
            **actor,
        )
    try:
        with session.begin_nested():
            return create_enrollment(
                session,
                user_id=student.id,
                course_id=course.id,
                state=state,
                payment_method=method,
                expires_at=utcnow() + timedelta(hours=settings.enrollment_expiry_hours),
                reason=reason,
                **actor,
            )
    except IntegrityError:
        # A concurrent request opened one first: answer with it.
        again = open_enrollment(session, student.id, course.id)
        if again is None:
            raise
        return Transition(again.id, Outcome.ALREADY_THERE, again, again.state, state)
