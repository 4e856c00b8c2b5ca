"""Refunds: money given back for an approved enrollment, through the one state machine.

A refund of everything still refundable ends course access (approved -> refunded); a partial
one keeps it. What is refunded of a payment never exceeds what was paid: the amount is
checked under the enrollment's row lock, and a unique index allows one full refund per payment
whatever races. The same Idempotency-Key from the same admin returns the same refund.

iKhokha publishes no refund API for iK Pay that we could verify, so SKILLPAY_REFUND_MODE is
`record` by default: the admin made the refund in iKhokha's dashboard (or, for EFT, from the
bank) and Skillpay records it. `api` asks the gateway to make it (IKHOKHA_REFUND_PATH,
unverified against iKhokha; the simulator implements it); the refund is written as requested
and committed before the call, so a crash leaves a visible `requested` row, never money sent
with nothing on record. The call is made with no row locked.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from config import Settings
from models import Enrollment, Payment, PaymentMethod, Refund, State, User, utcnow
from pipeline.callbacks import SUCCESS
from pipeline.errors import Conflict, GatewayError, InvalidRequest, InvalidTransition, NotFound
from pipeline.ikhokha import Gateway
from pipeline.notify import notify, notify_news
from pipeline.state_machine import Transition, lock_enrollments, transition_enrollment

REFUND_MODES = ("record", "api")


@dataclass(frozen=True)
class RefundResult:
    refund: Refund
    # False: this admin's Idempotency-Key had made it already; it is returned as it is.
    created: bool
    transition: Transition | None = None


def paid_payment(session: Session, enrollment: Enrollment) -> Payment | None:
    """The payment that paid for the enrollment: the card payment iKhokha reported paid, or
    for EFT the latest payment (the bank transfer an admin approved)."""
    stmt = select(Payment).where(Payment.enrollment_id == enrollment.id)
    if enrollment.payment_method == PaymentMethod.CARD:
        stmt = stmt.where(Payment.gateway_status == SUCCESS)
    return session.scalar(stmt.order_by(Payment.created_at.desc()).limit(1))


def refunded_cents(session: Session, payment_id: str) -> int:
    """What has been refunded of a payment, or is being (a requested refund counts)."""
    total = session.scalar(
        select(func.coalesce(func.sum(Refund.amount_cents), 0)).where(
            Refund.payment_id == payment_id, Refund.state != "failed"
        )
    )
    return int(total or 0)


def refund_enrollment(
    session: Session,
    settings: Settings,
    gateway: Gateway,
    enrollment_id: int,
    admin: User,
    *,
    reason: str,
    amount_cents: int | None = None,
    idempotency_key: str | None = None,
) -> RefundResult:
    """Refund an approved enrollment, in full (the default) or in part. The caller commits."""
    reason = (reason or "").strip()[:1000]
    if not reason:
        raise InvalidRequest("a reason is required to refund, and the student will see it")
    if idempotency_key:
        earlier = session.scalar(
            select(Refund).where(
                Refund.admin_user_id == admin.id, Refund.idempotency_key == idempotency_key
            )
        )
        if earlier is not None:
            if earlier.enrollment_id != enrollment_id:
                raise InvalidRequest("this Idempotency-Key was used for another enrollment")
            if earlier.state == "requested":  # iKhokha's answer was lost: ask again
                return RefundResult(earlier, False, _send(session, settings, gateway, earlier))
            return RefundResult(earlier, False)
    enrollment = lock_enrollments(session, [enrollment_id]).get(enrollment_id)
    if enrollment is None:
        raise NotFound(f"enrollment {enrollment_id} does not exist")
    if enrollment.state == State.REFUNDED and amount_cents is None:
        done = session.scalar(
            select(Refund).where(
                Refund.enrollment_id == enrollment_id, Refund.is_full, Refund.state == "done"
            )
        )
        if done is not None:  # asked again (or by two admins at once): nothing more to do
            return RefundResult(done, False)
    if enrollment.state != State.APPROVED:
        raise InvalidTransition(
            f"enrollment {enrollment_id} is {enrollment.state}; only an approved enrollment "
            "can be refunded"
        )
    payment = paid_payment(session, enrollment)
    if payment is None:
        raise InvalidRequest(f"enrollment {enrollment_id} has no paid payment to refund")
    left = payment.amount_cents - refunded_cents(session, payment.id)
    amount = left if amount_cents is None else amount_cents
    if left <= 0:
        raise InvalidTransition(f"payment {payment.reference} is refunded in full already")
    if not 0 < amount <= left:
        raise InvalidRequest(f"amount_cents must be between 1 and {left}, what is left to refund")
    api = settings.refund_mode == "api" and payment.method == PaymentMethod.CARD
    refund = Refund(
        enrollment_id=enrollment.id,
        payment_id=payment.id,
        amount_cents=amount,
        is_full=amount == left,
        reason=reason,
        mode="api" if api else "recorded",
        state="requested" if api else "done",
        admin_user_id=admin.id,
        idempotency_key=idempotency_key,
    )
    try:
        with session.begin_nested():
            session.add(refund)
    except IntegrityError as exc:
        raise Conflict(
            f"another refund of enrollment {enrollment_id} was made at the same moment"
        ) from exc
    if api:
        session.commit()  # on record, and the lock released, before iKhokha hears of it
        return RefundResult(refund, True, _send(session, settings, gateway, refund))
    return RefundResult(refund, True, _settle(session, settings, refund))


def _send(
    session: Session, settings: Settings, gateway: Gateway, refund: Refund
) -> Transition | None:
    """Ask the gateway to make a requested refund, under our refund id (the gateway's
    idempotency key). A refusal fails it; an answer that never came leaves it requested, to
    be asked again with the same Idempotency-Key (the same refund id: never paid out twice)."""
    payment = session.get(Payment, refund.payment_id)
    assert payment is not None and payment.paylink_id is not None
    try:
        reference = gateway.refund(
            payment.paylink_id, refund.amount_cents, refund.reason, refund.id
        )
    except GatewayError as exc:
        refund.error = exc.message
        if exc.kind in ("authentication", "validation", "declined"):
            refund.state, refund.finished_at = "failed", utcnow()
        session.commit()
        raise
    refund.state, refund.gateway_reference, refund.error = "done", reference, None
    return _settle(session, settings, refund)


def _settle(session: Session, settings: Settings, refund: Refund) -> Transition | None:
    """A refund made: a full one ends access (approved -> refunded); either is news to the
    student and the admins."""
    refund.finished_at = utcnow()
    if refund.is_full:
        transition = transition_enrollment(
            session,
            refund.enrollment_id,
            State.REFUNDED,
            actor=f"admin:{refund.admin_user_id}",
            actor_user_id=refund.admin_user_id,
            source="refund",
            reason=refund.reason,
            only_from=frozenset({State.APPROVED}),
        )
        notify(session, settings, [transition])
        return transition
    enrollment = session.get(Enrollment, refund.enrollment_id)
    assert enrollment is not None
    notify_news(
        session,
        settings,
        enrollment,
        "enrollment.partially_refunded",
        {"amount_cents": refund.amount_cents, "reason": refund.reason},
    )
    return None
