"""Refunds, two-way reconciliation and EFT expiry, as plain functions against PostgreSQL."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest
from freezegun import freeze_time
from sqlalchemy import func, select

from models import (
    EnrollmentFlag,
    EnrollmentHistory,
    Notification,
    ReconciliationFinding,
    Refund,
    State,
    WebhookEvent,
    utcnow,
)
from pipeline import stages
from pipeline.checkout import EFT_WAITING_REASON
from pipeline.errors import GatewayError, InvalidRequest, InvalidTransition
from pipeline.expiry import expire_waiting_transfers
from pipeline.flags import clear_flag
from pipeline.ikhokha import MemoryGateway
from pipeline.reconcile import reconcile
from pipeline.refunds import refund_enrollment
from pipeline.stages import StageContext
from tests.support import callback_body, make_enrollment, make_user, stored_callback


@pytest.fixture
def gateway():
    return MemoryGateway()


@pytest.fixture
def admin(session):
    return make_user(session, role="admin")[0]


def paid_card(session, gateway, amount_cents=None):
    """An approved card enrollment whose payment iKhokha reported paid."""
    enrollment, payment = make_enrollment(session, state=State.APPROVED, amount_cents=amount_cents)
    enrollment.approved_at = utcnow()
    payment.gateway_status = "SUCCESS"
    gateway.settle(payment.paylink_id, "SUCCESS", payment.amount_cents)
    session.flush()
    return enrollment, payment


def history_to(session, enrollment_id, state):
    return session.scalar(
        select(func.count()).where(
            EnrollmentHistory.enrollment_id == enrollment_id, EnrollmentHistory.to_state == state
        )
    )


def test_a_full_refund_ends_access_and_asking_again_refunds_nothing(
    session, settings, gateway, admin
):
    enrollment, payment = paid_card(session, gateway)
    result = refund_enrollment(
        session, settings, gateway, enrollment.id, admin, reason="changed their mind"
    )
    assert result.created and result.transition is not None and result.transition.changed
    assert result.refund.amount_cents == payment.amount_cents and result.refund.is_full
    assert result.refund.mode == "recorded" and result.refund.state == "done"
    assert enrollment.state == State.REFUNDED and not enrollment.course_access
    row = session.scalar(
        select(EnrollmentHistory).where(EnrollmentHistory.to_state == State.REFUNDED)
    )
    assert (row.actor_user_id, row.source, row.reason) == (admin.id, "refund", "changed their mind")
    kinds = session.scalars(
        select(Notification.audience).where(
            Notification.enrollment_id == enrollment.id, Notification.kind == "enrollment.refunded"
        )
    ).all()
    assert sorted(kinds) == ["admins", "student"]
    again = refund_enrollment(session, settings, gateway, enrollment.id, admin, reason="again")
    assert not again.created and again.refund.id == result.refund.id  # asked again: the same
    with pytest.raises(InvalidTransition, match="only an approved enrollment"):
        refund_enrollment(
            session, settings, gateway, enrollment.id, admin, reason="more", amount_cents=1
        )
    assert session.scalar(select(func.count()).select_from(Refund)) == 1


def test_partial_refunds_keep_access_until_the_rest_is_refunded(session, settings, gateway, admin):
    enrollment, _payment = paid_card(session, gateway, amount_cents=10000)
    part = refund_enrollment(
        session, settings, gateway, enrollment.id, admin, reason="late start", amount_cents=3000
    )
    assert not part.refund.is_full and part.transition is None
    assert enrollment.state == State.APPROVED and enrollment.course_access
    assert (
        session.scalar(
            select(func.count()).where(Notification.kind == "enrollment.partially_refunded")
        )
        == 2
    )
    with pytest.raises(InvalidRequest, match="between 1 and 7000"):
        refund_enrollment(
            session, settings, gateway, enrollment.id, admin, reason="x", amount_cents=7001
        )
    rest = refund_enrollment(session, settings, gateway, enrollment.id, admin, reason="left")
    assert rest.refund.amount_cents == 7000 and rest.refund.is_full
    assert enrollment.state == State.REFUNDED


def test_the_same_idempotency_key_returns_the_same_refund(session, settings, gateway, admin):
    enrollment, _ = paid_card(session, gateway)
    first = refund_enrollment(
        session, settings, gateway, enrollment.id, admin, reason="r", idempotency_key="k1"
    )
    again = refund_enrollment(
        session, settings, gateway, enrollment.id, admin, reason="r", idempotency_key="k1"
    )
    assert not again.created and again.refund.id == first.refund.id
    other, _ = paid_card(session, gateway)
    with pytest.raises(InvalidRequest, match="another enrollment"):
        refund_enrollment(
            session, settings, gateway, other.id, admin, reason="r", idempotency_key="k1"
        )


def test_one_full_refund_per_payment_even_past_the_amount_check(session, settings, gateway, admin):
    """The unique index is the last word: a second full refund row cannot be stored."""
    enrollment, payment = paid_card(session, gateway)
    refund_enrollment(session, settings, gateway, enrollment.id, admin, reason="r")
    enrollment.state = State.APPROVED  # as if a racing request had read it before the change
    session.add(
        Refund(
            enrollment_id=enrollment.id,
            payment_id=payment.id,
            amount_cents=1,
            is_full=True,
            reason="race",
            mode="recorded",
            state="done",
            admin_user_id=admin.id,
        )
    )
    with pytest.raises(Exception, match="uq_refunds_full_per_payment"), session.begin_nested():
        session.flush()


def test_api_refunds_go_through_the_gateway_and_a_lost_answer_is_asked_again(
    session, settings, gateway, admin
):
    settings = replace(settings, refund_mode="api")
    enrollment, _payment = paid_card(session, gateway)
    gateway.failure = GatewayError("timed out", kind="timeout", retryable=True, student_message="")
    with pytest.raises(GatewayError):
        refund_enrollment(
            session, settings, gateway, enrollment.id, admin, reason="r", idempotency_key="k"
        )
    refund = session.scalar(select(Refund))
    assert refund.state == "requested" and refund.error == "timed out"
    assert enrollment.state == State.APPROVED
    gateway.failure = None
    again = refund_enrollment(
        session, settings, gateway, enrollment.id, admin, reason="r", idempotency_key="k"
    )
    assert again.refund.id == refund.id and again.refund.state == "done"
    assert list(gateway.refunds) == [refund.id]  # asked under the same id: one refund
    assert again.refund.gateway_reference.startswith("MEMREF-")
    assert enrollment.state == State.REFUNDED


def test_an_api_refund_the_gateway_refuses_fails_and_changes_nothing(
    session, settings, gateway, admin
):
    settings = replace(settings, refund_mode="api")
    enrollment, _ = paid_card(session, gateway)
    gateway.failure = GatewayError("no", kind="declined", retryable=False, student_message="")
    with pytest.raises(GatewayError):
        refund_enrollment(session, settings, gateway, enrollment.id, admin, reason="r")
    assert session.scalar(select(Refund.state)) == "failed"
    assert enrollment.state == State.APPROVED
    gateway.failure = None
    assert refund_enrollment(session, settings, gateway, enrollment.id, admin, reason="r").created


def test_a_late_success_for_a_refunded_payment_changes_nothing(session, settings, gateway, admin):
    enrollment, payment = paid_card(session, gateway)
    refund_enrollment(session, settings, gateway, enrollment.id, admin, reason="r")
    event = routed_success(session, settings, gateway, enrollment, payment)
    assert event.decision == {"target": None, "reason": "this payment was refunded"}
    assert enrollment.state == State.REFUNDED
    assert session.get(WebhookEvent, event.id) is not None


def routed_success(session, settings, gateway, enrollment, payment):
    """A card SUCCESS for this payment, taken through approval routing."""
    event = stored_callback(session, settings, callback_body(payment, "SUCCESS"))
    event.enrollment_id, event.payment_id = enrollment.id, payment.id
    event.callback_status, event.payment_type = "SUCCESS", "card"
    stages.route_approval(session, event, StageContext(settings, gateway))
    return event


# Reconciliation -------------------------------------------------------------------------------


def run(session, settings, gateway):
    return reconcile(
        session,
        settings,
        gateway,
        lambda event_id, stage: None,  # enqueued after commit, which a unit test never makes
        older_than=timedelta(0),
        trigger="cli",
    )


def test_an_approval_ikhokha_does_not_confirm_is_flagged_never_revoked(
    session, settings, gateway, admin
):
    enrollment, payment = paid_card(session, gateway)
    gateway.settle(payment.paylink_id, "PENDING")
    short, short_payment = paid_card(session, gateway)
    gateway.settle(short_payment.paylink_id, "SUCCESS", short_payment.amount_cents - 100)
    _good, good_payment = paid_card(session, gateway)
    report = run(session, settings, gateway)
    assert report.counts["enrolled_not_paid"] == 1 and report.counts["amount_mismatch"] == 1
    assert enrollment.state == State.APPROVED and short.state == State.APPROVED
    flags = session.scalars(select(EnrollmentFlag).order_by(EnrollmentFlag.id)).all()
    assert [(f.enrollment_id, f.kind) for f in flags] == [
        (enrollment.id, "enrolled_not_paid"),
        (short.id, "amount_mismatch"),
    ]
    assert "PENDING, not SUCCESS" in flags[0].reason
    assert good_payment.reconciled_at is not None  # confirmed: not asked about again
    assert (
        session.scalar(
            select(func.count()).where(
                Notification.kind == "enrollment.flagged", Notification.audience == "student"
            )
        )
        == 0
    )
    again = run(session, settings, gateway)
    assert again.checked == 2 and again.counts["enrolled_not_paid"] == 1
    assert session.scalar(select(func.count()).select_from(EnrollmentFlag)) == 2  # not piled up
    cleared = clear_flag(session, flags[0].id, admin, "paid by EFT instead; fine")
    assert cleared.cleared_by == admin.id
    with pytest.raises(InvalidTransition):
        clear_flag(session, flags[0].id, admin, "again")


def test_a_card_paid_after_expiry_whose_callback_was_lost_is_found(session, settings, gateway):
    enrollment, payment = make_enrollment(session, state=State.EXPIRED)
    gateway.settle(payment.paylink_id, "SUCCESS", payment.amount_cents)
    stale, stale_payment = make_enrollment(session, state=State.EXPIRED)
    stale.updated_at = utcnow() - timedelta(days=settings.reconcile_lookback_days + 1)
    gateway.settle(stale_payment.paylink_id, "SUCCESS", stale_payment.amount_cents)
    session.flush()
    report = run(session, settings, gateway)
    assert report.counts["paid_not_enrolled"] == 1 and len(report.fed) == 1
    finding = session.scalar(
        select(ReconciliationFinding).where(ReconciliationFinding.kind == "paid_not_enrolled")
    )
    assert finding.enrollment_id == enrollment.id and "was expired" in finding.detail
    assert session.get(WebhookEvent, report.fed[0]).paylink_id == payment.paylink_id


def test_a_paid_link_that_is_not_ours_is_reported(session, settings, gateway):
    gateway.settle("FOREIGN1", "SUCCESS", 5000)
    report = run(session, settings, gateway)
    assert report.counts["unknown_payment"] == 1
    assert "FOREIGN1" in report.findings[0].detail


def test_an_unreachable_ikhokha_is_an_error_and_nothing_is_flagged(session, settings, gateway):
    paid_card(session, gateway)
    gateway.failure = GatewayError("down", kind="network", retryable=True, student_message="")
    report = run(session, settings, gateway)
    assert report.counts["error"] == 1 and report.errors == [report.findings[0].detail]
    assert session.scalar(select(func.count()).select_from(EnrollmentFlag)) == 0


# EFT expiry -----------------------------------------------------------------------------------


def test_plain_transfers_waiting_too_long_expire_with_a_notice(session, settings, gateway):
    settings = replace(settings, eft_approval_expiry_days=14)
    old, _ = make_enrollment(session, method="eft", state=State.PENDING_APPROVAL)
    mismatch, _ = make_enrollment(session, method="eft", state=State.PENDING_APPROVAL)
    flagged, _ = make_enrollment(session, method="eft", state=State.PENDING_APPROVAL)
    recent, _ = make_enrollment(session, method="eft", state=State.PENDING_APPROVAL)
    for e in (old, flagged, recent):
        e.waiting_reason = EFT_WAITING_REASON
    mismatch.waiting_reason = "amount differs"
    session.add(EnrollmentFlag(enrollment_id=flagged.id, kind="x", reason="x", source="test"))
    for e in (old, mismatch, flagged):
        e.updated_at = utcnow() - timedelta(days=15)
    session.flush()
    assert expire_waiting_transfers(session, settings) == 1
    assert old.state == State.EXPIRED
    assert {mismatch.state, flagged.state, recent.state} == {State.PENDING_APPROVAL}
    notice = session.scalar(
        select(Notification).where(
            Notification.enrollment_id == old.id, Notification.audience == "student"
        )
    )
    assert notice.kind == "enrollment.expired" and "within 14 days" in notice.payload["reason"]
    with freeze_time(utcnow() + timedelta(days=30)):
        assert expire_waiting_transfers(session, replace(settings, eft_approval_expiry_days=0)) == 0


def test_an_earlier_link_paid_after_approval_is_flagged_as_paid_twice(session, settings, gateway):
    enrollment, paid = paid_card(session, gateway)
    _, earlier = make_enrollment(session, state=State.PENDING_PAYMENT)
    earlier.enrollment_id = enrollment.id
    session.flush()
    event = routed_success(session, settings, gateway, enrollment, earlier)
    assert event.decision["target"] is None and "paid twice" in event.decision["reason"]
    flag = session.scalar(select(EnrollmentFlag))
    assert (flag.enrollment_id, flag.kind) == (enrollment.id, "paid_twice")
    assert paid.reference in flag.reason and enrollment.state == State.APPROVED


def test_a_card_link_paid_after_a_bank_transfer_was_approved_is_paid_twice(
    session, settings, gateway
):
    enrollment, transfer = make_enrollment(session, method="eft", state=State.APPROVED)
    _, link = make_enrollment(session, state=State.PENDING_PAYMENT)
    link.enrollment_id = enrollment.id
    session.flush()
    event = routed_success(session, settings, gateway, enrollment, link)
    assert f"paid twice: {link.reference} after {transfer.reference}" in event.decision["reason"]


def test_metrics_count_the_latest_run_and_open_flags(session, settings, gateway):
    from web.app import create_app

    _, payment = paid_card(session, gateway)
    gateway.settle(payment.paylink_id, "PENDING")
    run(session, settings, gateway)
    session.flush()
    text = create_app(settings, gateway=gateway).test_client().get("/metrics").get_data(True)
    assert 'skillpay_reconciliation_findings{kind="enrolled_not_paid"} 1.0' in text
    assert 'skillpay_reconciliation_findings{kind="amount_mismatch"} 0.0' in text
    assert 'skillpay_enrollments_flagged{kind="enrolled_not_paid"} 1.0' in text
