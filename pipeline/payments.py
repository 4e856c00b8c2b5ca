"""Finding payments: by a callback's ids, the latest of an enrollment, a new reference."""

from __future__ import annotations

import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from models import Payment
from pipeline.ikhokha import LinkStatus

REFERENCE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"


def new_reference() -> str:
    """A payment reference a student types into a bank transfer: no 0/O or 1/I to confuse."""
    return "SP-" + "".join(secrets.choice(REFERENCE_ALPHABET) for _ in range(8))


def disagreements(answer: LinkStatus, payment: Payment) -> list[str]:
    """How iKhokha's answer about a link disagrees with our payment: empty when it confirms
    it paid, for the amount we asked (an answer without an amount is taken as agreeing)."""
    reasons = []
    if not answer.paid:
        reasons.append(f"iKhokha's status endpoint says {answer.status}, not SUCCESS")
    if answer.amount_cents is not None and answer.amount_cents != payment.amount_cents:
        reasons.append(
            f"iKhokha reports {answer.amount_cents} cents, expected {payment.amount_cents}"
        )
    return reasons


def latest_payment(session: Session, enrollment_id: int) -> Payment | None:
    """The enrollment's newest payment (an enrollment has a few: a retry makes a new link)."""
    return latest_payments(session, [enrollment_id]).get(enrollment_id)


def latest_payments(session: Session, enrollment_ids: list[int]) -> dict[int, Payment]:
    """Each enrollment's newest payment, for a whole page of them in one query."""
    latest: dict[int, Payment] = {}
    for payment in session.scalars(
        select(Payment)
        .where(Payment.enrollment_id.in_(enrollment_ids))
        .order_by(Payment.created_at, Payment.id)
    ):
        latest[payment.enrollment_id] = payment  # the newest wins
    return latest


def rand(cents: int) -> str:
    """An amount as admins read it: R 1,499.00."""
    return f"R {cents / 100:,.2f}"


def amounts_due(session: Session, enrollment_ids: list[int]) -> dict[int, int]:
    """Each enrollment's latest payment amount (cents), in one query."""
    return {
        enrollment_id: payment.amount_cents
        for enrollment_id, payment in latest_payments(session, enrollment_ids).items()
    }


def find_payment(
    session: Session, paylink_id: str | None, external_id: str | None
) -> Payment | None:
    """The payment a callback names: by iKhokha's paylink id, else by our own id."""
    if paylink_id:
        payment = session.scalar(select(Payment).where(Payment.paylink_id == paylink_id))
        if payment is not None:
            return payment
    if external_id:
        return session.get(Payment, external_id)
    return None
