"""Reconciliation: ask iKhokha about payments still waiting, for when a callback never came."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from config import Settings
from models import Enrollment, Payment, PaymentMethod, State, utcnow
from pipeline.callbacks import FAILURE, SUCCESS
from pipeline.errors import GatewayError
from pipeline.ikhokha import Gateway
from pipeline.inbox import Received, receive_status_answer

WAITING_STATES = (State.PENDING_PAYMENT, State.PAYMENT_FAILED)


@dataclass
class ReconcileReport:
    checked: int = 0
    fed: list[int] = field(default_factory=list)  # event ids fed into the pipeline
    unchanged: int = 0
    errors: list[str] = field(default_factory=list)


def waiting_payments(session: Session, older_than: timedelta, limit: int) -> list[Payment]:
    return list(
        session.scalars(
            select(Payment)
            .join(Enrollment, Enrollment.id == Payment.enrollment_id)
            .where(
                Payment.method == PaymentMethod.CARD,
                Payment.paylink_id.is_not(None),
                Enrollment.state.in_(WAITING_STATES),
                Payment.created_at <= utcnow() - older_than,
            )
            .order_by(Payment.created_at)
            .limit(limit)
        )
    )


def feed_status(
    session: Session,
    settings: Settings,
    gateway: Gateway,
    payment: Payment,
    enqueue: Callable[[int, str], object],
    *,
    source: str,
) -> Received | None:
    """Ask iKhokha about one payment; a final answer we have not seen yet goes into the
    pipeline as an event, exactly like a callback (and deduplicated against it).
    Raises GatewayError when iKhokha cannot answer."""
    assert payment.paylink_id is not None
    answer = gateway.get_status(payment.paylink_id)
    if answer.status not in (SUCCESS, FAILURE) or answer.status == payment.gateway_status:
        return None
    return receive_status_answer(
        session,
        settings,
        paylink_id=payment.paylink_id,
        external_transaction_id=payment.id,
        status=answer.status,
        source=source,
        enqueue=enqueue,
    )


def claim_status_check(session: Session, payment_id: str, interval: timedelta) -> bool:
    """True for the one caller per interval that may have iKhokha asked about this payment
    (a return page reloading every few seconds, or looped by anyone, asks at most once)."""
    now = utcnow()
    claimed = session.execute(
        update(Payment)
        .where(
            Payment.id == payment_id,
            or_(Payment.status_checked_at.is_(None), Payment.status_checked_at < now - interval),
        )
        .values(status_checked_at=now)
        .returning(Payment.id)
    ).first()
    return claimed is not None


def check_payment(
    session: Session,
    settings: Settings,
    gateway: Gateway,
    payment_id: str,
    enqueue: Callable[[int, str], object],
) -> Received | None:
    """Ask iKhokha about one card payment if it is still waiting (the task a return page
    sends); its final answer goes into the pipeline like a callback."""
    payment = session.get(Payment, payment_id)
    if payment is None or not is_waiting(payment):
        return None
    return feed_status(session, settings, gateway, payment, enqueue, source="return_page")


def is_waiting(payment: Payment) -> bool:
    """A card payment with a link whose enrollment has not been settled yet."""
    return (
        payment.method == PaymentMethod.CARD
        and payment.paylink_id is not None
        and payment.enrollment.state in WAITING_STATES
    )


def reconcile(
    session: Session,
    settings: Settings,
    gateway: Gateway,
    enqueue: Callable[[int, str], object],
    *,
    older_than: timedelta = timedelta(minutes=5),
    limit: int = 200,
) -> ReconcileReport:
    """Feed iKhokha's answer for every card payment still waiting into the pipeline."""
    report = ReconcileReport()
    for payment in waiting_payments(session, older_than, limit):
        report.checked += 1
        try:
            received = feed_status(session, settings, gateway, payment, enqueue, source="reconcile")
        except GatewayError as exc:
            report.errors.append(f"{payment.id}: {exc.message}")
            continue
        if received is None or received.duplicate:
            report.unchanged += 1
        else:
            report.fed.append(received.event_id)
    return report
