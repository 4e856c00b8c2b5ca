"""The six stages of the webhook pipeline, each a plain function of (session, event, context).

A stage reads what earlier stages wrote on the inbox row and writes its own result there, so
a message only ever carries the event id, and any stage can be re-run from the stored row.
The runner calls a stage under the event's row lock; a stage that must ask iKhokha does so in
its `fetch`, which the runner calls first, with no transaction open and no lock held.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from config import Settings
from models import (
    Course,
    Enrollment,
    EnrollmentHistory,
    Payment,
    PaymentMethod,
    State,
    WebhookEvent,
)
from models.db import session_scope
from pipeline.callbacks import FAILURE, SUCCESS, lowered_keys
from pipeline.checkout import EFT_WAITING_REASON
from pipeline.detection import PaymentTypeDetector
from pipeline.errors import ClosedEnrollment, UnknownPayment, UnrecognisedStatus
from pipeline.flags import raise_flag
from pipeline.ikhokha import Gateway, LinkStatus
from pipeline.inbox import FIRST_STAGE, authenticate
from pipeline.notify import notify
from pipeline.payments import disagreements, find_payment, latest_payment
from pipeline.state_machine import Outcome, Transition, transition_enrollment


@dataclass(frozen=True)
class StageContext:
    settings: Settings
    gateway: Gateway
    # What the stage's fetch brought back (None when it has none, or had nothing to ask).
    fetched: Any = None


# What a stage writes on its event; the runner saves what changed with the stage's progress.
STAGE_OUTPUTS = (
    "payment_id",
    "payment_type",
    "detection",
    "enrollment_id",
    "checks",
    "decision",
    "history_id",
    "outcome",
)


class EventRow(SimpleNamespace):
    """An inbox row as the runner hands it to a stage: its columns as attributes, read under
    the row lock (a WebhookEvent does as well, in tests)."""


Event = WebhookEvent | EventRow
StageFn = Callable[[Session, Event, StageContext], None]
FetchFn = Callable[[int, StageContext], Any]


@dataclass(frozen=True)
class Stage:
    run: StageFn
    fetch: FetchFn | None = None


def _fields(event: Event) -> dict[str, Any]:
    data = json.loads(event.body)
    return lowered_keys(data) if isinstance(data, dict) else {}


def check_signature(session: Session, event: Event, ctx: StageContext) -> None:
    """Re-verify the stored raw callback, so a replayed or re-driven event is authenticated too."""
    authenticate(ctx.settings, event.headers, event.path, event.body)


def detect_payment_type(session: Session, event: Event, ctx: StageContext) -> None:
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


def look_up_enrollment(session: Session, event: Event, ctx: StageContext) -> None:
    """Payment to enrollment, and whether amount, currency, course and link agree."""
    found = session.execute(
        select(Payment, Enrollment, Course)
        .join(Enrollment, Enrollment.id == Payment.enrollment_id)
        .join(Course, Course.id == Enrollment.course_id)
        .where(Payment.id == event.payment_id)
    ).first()
    if found is None:
        raise UnknownPayment(f"payment {event.payment_id} is gone")
    payment, enrollment, course = found
    fields = _fields(event)
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
    if payment.amount_cents != course.price_cents or payment.currency != course.currency:
        mismatches.append(
            f"payment of {payment.amount_cents} {payment.currency} does not match the course "
            f"price of {course.price_cents} {course.currency}"
        )
    event.enrollment_id = enrollment.id
    event.checks = {"mismatches": mismatches, "enrollment_state": enrollment.state}


def ask_ikhokha_for_status(event_id: int, ctx: StageContext) -> LinkStatus | None:
    """Before routing, and only when IKHOKHA_CONFIRM_WITH_STATUS asks for it: iKhokha's own
    word on a SUCCESS. A short read finds the link; the call is made with nothing held.
    Transient gateway errors propagate and the stage is retried."""
    if not ctx.settings.ikhokha_confirm_with_status:
        return None
    with session_scope() as session:
        row = session.execute(
            select(WebhookEvent.callback_status, WebhookEvent.paylink_id, Payment.paylink_id)
            .outerjoin(Payment, Payment.id == WebhookEvent.payment_id)
            .where(WebhookEvent.id == event_id)
        ).one_or_none()
    if row is None or row[0] != SUCCESS:
        return None
    paylink_id = row[2] or row[1]
    return ctx.gateway.get_status(paylink_id) if paylink_id else None


def route_approval(session: Session, event: Event, ctx: StageContext) -> None:
    """Decide the target state: card SUCCESS approves; anything uncertain waits for an admin."""
    enrollment, payment = session.execute(
        select(Enrollment, Payment)
        .join(Payment, Payment.id == event.payment_id)
        .where(Enrollment.id == event.enrollment_id)
    ).one()
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
    if enrollment.state == State.APPROVED and payment.gateway_status != SUCCESS:
        other = session.scalar(
            select(Payment.reference).where(
                Payment.enrollment_id == enrollment.id,
                Payment.id != payment.id,
                or_(Payment.gateway_status == SUCCESS, Payment.method == PaymentMethod.EFT),
            )
        )
        if other is not None:
            # An earlier link, still payable, was paid after the enrollment was approved on
            # another payment (a later link, or a bank transfer): the student paid twice.
            # Access stays; an admin refunds one.
            reason = f"paid twice: {payment.reference} after {other}; refund one of them"
            raise_flag(session, ctx.settings, enrollment, "paid_twice", reason, "webhook")
            event.decision = {"target": None, "reason": reason}
            return
    if enrollment.state == State.REFUNDED and payment.gateway_status == SUCCESS:
        # The payment already counted (it was approved, then refunded): news to nobody.
        event.decision = {"target": None, "reason": "this payment was refunded"}
        return
    if enrollment.state in (State.REJECTED, State.REFUNDED):
        raise ClosedEnrollment(
            f"payment SUCCESS for enrollment {enrollment.id}, which is {enrollment.state}"
        )
    reasons = list((event.checks or {}).get("mismatches", []))
    if ctx.settings.ikhokha_confirm_with_status:
        reasons += _unconfirmed(ctx.fetched, payment)
    if enrollment.state == State.EXPIRED:
        reasons.append("paid after the enrollment expired")
    detection = event.detection or {}
    confidence = float(detection.get("confidence", 0.0))
    if event.payment_type == PaymentMethod.EFT:
        reasons.append(EFT_WAITING_REASON)
    elif event.payment_type != PaymentMethod.CARD or confidence < ctx.settings.card_min_confidence:
        reasons.append(
            f"payment type uncertain ({event.payment_type}, confidence {confidence:.2f})"
        )
    if reasons:
        event.decision = {"target": State.PENDING_APPROVAL, "reason": "; ".join(reasons)}
    else:
        event.decision = {"target": State.APPROVED, "reason": "card payment confirmed by iKhokha"}


def _unconfirmed(answer: LinkStatus | None, payment: Payment) -> list[str]:
    """Why iKhokha's answer does not confirm the payment; empty when it does."""
    if answer is None:
        return ["cannot confirm with iKhokha: no paylink id"]
    return disagreements(answer, payment)


def update_status(session: Session, event: Event, ctx: StageContext) -> None:
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
    if result.outcome is Outcome.CHANGED:
        assert result.history is not None
        event.history_id = result.history.id
        event.outcome = f"{result.from_state} -> {result.to_state}"
    else:
        event.outcome = f"no change: enrollment is {result.from_state}"


def send_notifications(session: Session, event: Event, ctx: StageContext) -> None:
    """Tell the student and the admins about the change this event made, if it made one."""
    if event.history_id is None:
        return
    history, enrollment = session.execute(
        select(EnrollmentHistory, Enrollment)
        .join(Enrollment, Enrollment.id == EnrollmentHistory.enrollment_id)
        .where(EnrollmentHistory.id == event.history_id)
    ).one()
    change = Transition(
        enrollment.id, Outcome.CHANGED, enrollment, history.from_state, history.to_state, history
    )
    notify(session, ctx.settings, [change])


STAGES: dict[str, Stage] = {
    "signature_check": Stage(check_signature),
    "payment_type_detection": Stage(detect_payment_type),
    "enrollment_lookup": Stage(look_up_enrollment),
    "approval_routing": Stage(route_approval, fetch=ask_ikhokha_for_status),
    "status_update": Stage(update_status),
    "notification": Stage(send_notifications),
}
STAGE_NAMES: tuple[str, ...] = tuple(STAGES)
assert STAGE_NAMES[0] == FIRST_STAGE


def next_stage(stage: str) -> str | None:
    index = STAGE_NAMES.index(stage)
    return STAGE_NAMES[index + 1] if index + 1 < len(STAGE_NAMES) else None
