"""Reconciliation, in both directions, against iKhokha's own word.

Paid but not enrolled: card payments still waiting (or whose enrollment expired unpaid within
SKILLPAY_RECONCILE_LOOKBACK_DAYS) that iKhokha reports final go into the pipeline as events,
exactly like a callback that never came (fixed). Enrolled but not paid: approved card
enrollments of the lookback window whose payment iKhokha does not report as SUCCESS, or
reports for another amount, are flagged for an admin, never revoked. A payment iKhokha
confirmed is marked reconciled and not asked about again. iKhokha's payment history (one call)
answers for most payments; the status endpoint is asked about the rest, and always before a
flag is raised. Each run, and what it found, is stored (GET /api/admin/reconciliation).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta

import structlog
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from config import Settings
from models import (
    Enrollment,
    Payment,
    PaymentMethod,
    ReconciliationFinding,
    ReconciliationRun,
    State,
    utcnow,
)
from pipeline.callbacks import FAILURE, SUCCESS, lowered_keys
from pipeline.errors import GatewayError
from pipeline.flags import raise_flag
from pipeline.ikhokha import Gateway, LinkStatus, parse_status
from pipeline.inbox import Received, receive_status_answer
from pipeline.payments import disagreements

log = structlog.get_logger(__name__)

WAITING_STATES = (State.PENDING_PAYMENT, State.PAYMENT_FAILED)

# What a run can find, in the order a report lists them.
KINDS = {
    "paid_not_enrolled": "paid but not enrolled (fed to the pipeline: fixed)",
    "enrolled_not_paid": "enrolled but not paid (flagged for an admin)",
    "amount_mismatch": "amount mismatches (flagged for an admin)",
    "unknown_payment": "paid to us but not a payment of ours (reported)",
    "error": "errors (iKhokha could not answer; tried again next run)",
}


def counts_by_kind(findings: Iterable[ReconciliationFinding]) -> dict[str, int]:
    """How many findings of each kind (every kind, zero included)."""
    counts = dict.fromkeys(KINDS, 0)
    for finding in findings:
        counts[finding.kind] += 1
    return counts


@dataclass
class ReconcileReport:
    run_id: int | None = None
    checked: int = 0
    fed: list[int] = field(default_factory=list)  # event ids fed into the pipeline
    findings: list[ReconciliationFinding] = field(default_factory=list)

    def count(self, kind: str) -> int:
        return self.counts[kind]

    @property
    def counts(self) -> dict[str, int]:
        return counts_by_kind(self.findings)

    @property
    def errors(self) -> list[str]:
        return [f.detail for f in self.findings if f.kind == "error"]


def waiting_payments(
    session: Session, older_than: timedelta, since: timedelta, limit: int
) -> list[Payment]:
    """Card payments whose enrollment waits for the money, and those whose enrollment
    expired unpaid within the lookback window (paid late, the callback lost)."""
    now = utcnow()
    return list(
        session.scalars(
            select(Payment)
            .join(Enrollment, Enrollment.id == Payment.enrollment_id)
            .where(
                Payment.method == PaymentMethod.CARD,
                Payment.paylink_id.is_not(None),
                or_(
                    Enrollment.state.in_(WAITING_STATES),
                    (Enrollment.state == State.EXPIRED) & (Enrollment.updated_at >= now - since),
                ),
                Payment.created_at <= now - older_than,
            )
            .order_by(Payment.created_at)
            .limit(limit)
        )
    )


def unconfirmed_approvals(session: Session, since: timedelta, limit: int) -> list[Payment]:
    """The paid payment of each card enrollment approved within the window that iKhokha has
    not yet confirmed to reconciliation."""
    return list(
        session.scalars(
            select(Payment)
            .join(Enrollment, Enrollment.id == Payment.enrollment_id)
            .where(
                Payment.method == PaymentMethod.CARD,
                Payment.paylink_id.is_not(None),
                Payment.reconciled_at.is_(None),
                Payment.gateway_status == SUCCESS,
                Enrollment.state == State.APPROVED,
                Enrollment.payment_method == PaymentMethod.CARD,
                Enrollment.approved_at >= utcnow() - since,
            )
            .order_by(Enrollment.approved_at)
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
    answer: LinkStatus | None = None,
) -> Received | None:
    """Ask iKhokha about one payment (unless its answer is given); a final answer we have not
    seen yet goes into the pipeline as an event, exactly like a callback (and deduplicated
    against it). Raises GatewayError when iKhokha cannot answer."""
    assert payment.paylink_id is not None
    answer = answer or gateway.get_status(payment.paylink_id)
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
    trigger: str = "beat",
) -> ReconcileReport:
    """One run in both directions, stored with what it found. The caller commits."""
    since = timedelta(days=settings.reconcile_lookback_days)
    run = ReconciliationRun(trigger=trigger)
    session.add(run)
    session.flush()
    report = ReconcileReport(run_id=run.id)

    def found(kind: str, action: str, detail: str, payment: Payment | None = None) -> None:
        finding = ReconciliationFinding(
            run_id=run.id,
            kind=kind,
            action=action,
            detail=detail,
            enrollment_id=payment.enrollment_id if payment else None,
            payment_id=payment.id if payment else None,
        )
        session.add(finding)
        report.findings.append(finding)

    history = _history(gateway, since)
    for payment in waiting_payments(session, older_than, since, limit):
        report.checked += 1
        assert payment.paylink_id is not None
        try:
            answer = _trusted(history.get(payment.paylink_id)) or gateway.get_status(
                payment.paylink_id
            )
        except GatewayError as exc:
            found("error", "reported", f"{payment.reference}: {exc.message}", payment)
            continue
        state = payment.enrollment.state
        received = feed_status(
            session, settings, gateway, payment, enqueue, source="reconcile", answer=answer
        )
        if received is None or received.duplicate:
            continue
        report.fed.append(received.event_id)
        if answer.paid:
            found(
                "paid_not_enrolled",
                "fed",
                f"{payment.reference}: iKhokha reports it paid, no callback said so "
                f"(enrollment {payment.enrollment_id} was {state})",
                payment,
            )
    for payment in unconfirmed_approvals(session, since, limit):
        report.checked += 1
        _confirm_approval(session, settings, gateway, payment, history, found)
    ours = set(session.scalars(select(Payment.paylink_id).where(Payment.paylink_id.in_(history))))
    for paylink_id, answer in history.items():
        if answer.paid and paylink_id not in ours:
            found("unknown_payment", "reported", f"paylink {paylink_id} is paid but not ours")
    run.checked, run.finished_at = report.checked, utcnow()
    session.flush()
    return report


def _confirm_approval(
    session: Session,
    settings: Settings,
    gateway: Gateway,
    payment: Payment,
    history: dict[str, LinkStatus],
    found: Callable[..., None],
) -> None:
    """Mark the approval confirmed when iKhokha agrees; flag it when iKhokha's status
    endpoint says otherwise (history alone never flags anything)."""
    assert payment.paylink_id is not None
    answer = history.get(payment.paylink_id)
    if answer is None or disagreements(answer, payment):
        try:
            answer = gateway.get_status(payment.paylink_id)
        except GatewayError as exc:
            found("error", "reported", f"{payment.reference}: {exc.message}", payment)
            return
    reasons = disagreements(answer, payment)
    if not reasons:
        payment.reconciled_at = utcnow()
        return
    kind = "amount_mismatch" if answer.paid else "enrolled_not_paid"
    detail = f"{payment.reference}: approved, but " + "; ".join(reasons)
    raise_flag(session, settings, payment.enrollment, kind, detail, "reconcile")
    found(kind, "flagged", detail, payment)


def _trusted(answer: LinkStatus | None) -> LinkStatus | None:
    """History's answer, when it is one to act on without asking again (a payment made)."""
    return answer if answer is not None and answer.paid else None


def _history(gateway: Gateway, since: timedelta) -> dict[str, LinkStatus]:
    """iKhokha's payment history for the window, by paylink id (its shape is undocumented:
    read tolerantly; when it fails, every payment is asked about on its own)."""
    today = utcnow().date()
    try:
        items = gateway.payment_history((today - since).isoformat(), today.isoformat())
    except GatewayError as exc:
        log.warning("reconcile.history_unavailable", error=exc.message)
        return {}
    answers = {}
    for item in items:
        paylink_id = lowered_keys(item).get("paylinkid")
        if isinstance(paylink_id, str) and paylink_id:
            answers[paylink_id] = parse_status(paylink_id, item)
    return answers
