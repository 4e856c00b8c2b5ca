"""The six stages of the webhook pipeline, each a plain function of (session, event, settings).

A stage reads what earlier stages wrote on the inbox row and writes its own result there, so
a message only ever carries the event id, and any stage can be re-run from the stored row.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from config import Settings
from models import Enrollment, EnrollmentHistory, Payment, State, WebhookEvent
from pipeline.callbacks import FAILURE, SUCCESS
from pipeline.detection import CARD, EFT, PaymentTypeDetector
from pipeline.enrollments import latest_payment
from pipeline.errors import ClosedEnrollment, UnknownPayment, UnrecognisedStatus
from pipeline.ikhokha import get_gateway
from pipeline.inbox import authenticate
from pipeline.notify import notify_transition
from pipeline.state_machine import transition_enrollment

StageFn = Callable[[Session, WebhookEvent, Settings], None]


def _fields(event: WebhookEvent) -> dict[str, Any]:
    data = json.loads(event.body)
    return data if isinstance(data, dict) else {}


def find_payment(
    session: Session, paylink_id: str | None, external_id: str | None
) -> Payment | None:
    if paylink_id:
        payment = session.scalar(select(Payment).where(Payment.paylink_id == paylink_id))
        if payment is not None:
            return payment
    if external_id:
        return session.get(Payment, external_id)
    return None


def check_signature(session: Session, event: WebhookEvent, settings: Settings) -> None:
    """Re-verify the stored raw callback, so a replayed or re-driven event is authenticated too."""
    authenticate(settings, event.headers, event.path, event.body)


def detect_payment_type(session: Session, event: WebhookEvent, settings: Settings) -> None:
    """Card, EFT or unknown, with a confidence and the indicators behind it."""
    payment = find_payment(session, event.paylink_id, event.external_transaction_id)
    if payment is None:
        raise UnknownPayment(
            f"no payment for paylinkID={event.paylink_id!r} "
            f"externalTransactionID={event.external_transaction_id!r}"
        )
    detection = PaymentTypeDetector().detect(payment.method, _fields(event))
    event.payment_id = payment.id
    event.payment_type = detection.type
    event.detection = detection.as_dict()


def look_up_enrollment(session: Session, event: WebhookEvent, settings: Settings) -> None:
    """Payment to enrollment, and whether amount, currency, course and link agree."""
    payment = session.get(Payment, event.payment_id)
    if payment is None:
        raise UnknownPayment(f"payment {event.payment_id} is gone")
    enrollment = session.get(Enrollment, payment.enrollment_id)
    assert enrollment is not None
    fields = {str(k).lower(): v for k, v in _fields(event).items()}
    mismatches: list[str] = []
    if event.external_transaction_id and event.external_transaction_id != payment.id:
        mismatches.append("paylinkID and externalTransactionID name different payments")
    if event.paylink_id and payment.paylink_id and event.paylink_id != payment.paylink_id:
        mismatches.append("paylinkID is not the link we created for this payment")
    amount = fields.get("amount")
    if isinstance(amount, int) and not isinstance(amount, bool) and amount != payment.amount_cents:
        mismatches.append(f"amount {amount} cents, expected {payment.amount_cents}")
    currency = fields.get("currency")
    if isinstance(currency, str) and currency.upper() != payment.currency:
        mismatches.append(f"currency {currency[:8]}, expected {payment.currency}")
    if (
        payment.amount_cents != enrollment.course.price_cents
        or payment.currency != enrollment.course.currency
    ):
        mismatches.append(
            f"payment of {payment.amount_cents} {payment.currency} does not match the course "
            f"price of {enrollment.course.price_cents} {enrollment.course.currency}"
        )
    event.enrollment_id = enrollment.id
    event.checks = {"mismatches": mismatches, "enrollment_state": enrollment.state}


def route_approval(session: Session, event: WebhookEvent, settings: Settings) -> None:
    """Decide the target state: card SUCCESS approves; anything uncertain waits for an admin."""
    enrollment = session.get(Enrollment, event.enrollment_id)
    payment = session.get(Payment, event.payment_id)
    assert enrollment is not None and payment is not None
    status = event.callback_status
    if status == FAILURE:
        latest = latest_payment(session, enrollment.id)
        if latest is None or latest.id != payment.id:
            event.decision = {"target": None, "reason": "failure of an earlier payment link"}
            return
        event.decision = {
            "target": State.PAYMENT_FAILED,
            "reason": "iKhokha reported the payment failed",
        }
        return
    if status != SUCCESS:
        raise UnrecognisedStatus(f"status {status!r} is neither SUCCESS nor FAILURE")
    if enrollment.state in (State.REJECTED, State.REFUNDED):
        raise ClosedEnrollment(
            f"payment SUCCESS for enrollment {enrollment.id}, which is {enrollment.state}"
        )
    reasons = list((event.checks or {}).get("mismatches", []))
    if settings.ikhokha_confirm_with_status:
        reasons += _confirm_with_ikhokha(event, payment, settings)
    if enrollment.state == State.EXPIRED:
        reasons.append("paid after the enrollment expired")
    detection = event.detection or {}
    confidence = float(detection.get("confidence", 0.0))
    if event.payment_type == EFT:
        reasons.append("EFT payment: confirm the money is in the bank account")
    elif event.payment_type != CARD or confidence < settings.card_min_confidence:
        reasons.append(
            f"payment type uncertain ({event.payment_type}, confidence {confidence:.2f})"
        )
    if reasons:
        event.decision = {"target": State.PENDING_APPROVAL, "reason": "; ".join(reasons)}
    else:
        event.decision = {"target": State.APPROVED, "reason": "card payment confirmed by iKhokha"}


def _confirm_with_ikhokha(event: WebhookEvent, payment: Payment, settings: Settings) -> list[str]:
    paylink_id = payment.paylink_id or event.paylink_id
    if not paylink_id:
        return ["cannot confirm with iKhokha: no paylink id"]
    answer = get_gateway(settings).get_status(paylink_id)  # transient errors are retried
    reasons = []
    if not answer.paid:
        reasons.append(f"iKhokha's status endpoint says {answer.status}, not SUCCESS")
    if answer.amount_cents is not None and answer.amount_cents != payment.amount_cents:
        reasons.append(
            f"iKhokha reports {answer.amount_cents} cents, expected {payment.amount_cents}"
        )
    return reasons


def update_status(session: Session, event: WebhookEvent, settings: Settings) -> None:
    """Apply the decision through the state machine, under the enrollment's row lock.

    The transition is re-checked under the lock: whatever happened since routing (an admin's
    approval, an earlier SUCCESS), a FAILURE never undoes an approval.
    """
    decision = event.decision or {}
    target = decision.get("target")
    payment = session.get(Payment, event.payment_id)
    if payment is not None and payment.gateway_status != SUCCESS:
        payment.gateway_status = event.callback_status
    if target is None:
        event.outcome = f"no change: {decision.get('reason')}"
        return
    assert event.enrollment_id is not None
    result = transition_enrollment(
        session,
        event.enrollment_id,
        State(target),
        actor="pipeline",
        source="webhook",
        reason=decision.get("reason"),
        event_id=event.id,
        strict=False,
    )
    if result.history is not None:
        event.history_id = result.history.id
        event.outcome = f"{result.from_state} -> {result.to_state}"
    else:
        event.outcome = f"no change: enrollment is {result.from_state}"


def send_notifications(session: Session, event: WebhookEvent, settings: Settings) -> None:
    """Tell the student and the admins about the change this event made, if it made one."""
    if event.history_id is None:
        return
    history = session.get(EnrollmentHistory, event.history_id)
    enrollment = session.get(Enrollment, event.enrollment_id)
    assert history is not None and enrollment is not None
    notify_transition(session, enrollment, history)


STAGES: dict[str, StageFn] = {
    "signature_check": check_signature,
    "payment_type_detection": detect_payment_type,
    "enrollment_lookup": look_up_enrollment,
    "approval_routing": route_approval,
    "status_update": update_status,
    "notification": send_notifications,
}
STAGE_NAMES: tuple[str, ...] = tuple(STAGES)


def next_stage(stage: str) -> str | None:
    index = STAGE_NAMES.index(stage)
    return STAGE_NAMES[index + 1] if index + 1 < len(STAGE_NAMES) else None
