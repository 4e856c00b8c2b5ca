"""Reconciliation: ask iKhokha about payments still waiting, for when a callback never came."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from config import Settings
from models import Enrollment, Payment, PaymentMethod, State, utcnow
from pipeline.callbacks import FAILURE, SUCCESS
from pipeline.errors import GatewayError
from pipeline.ikhokha import Gateway
from pipeline.inbox import Received, record_status


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
                Enrollment.state.in_([State.PENDING_PAYMENT, State.PAYMENT_FAILED]),
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
    return record_status(
        session,
        settings,
        paylink_id=payment.paylink_id,
        external_transaction_id=payment.id,
        status=answer.status,
        source=source,
        enqueue=enqueue,
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
