"""Each stage and the runner, called as plain functions against PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from models import (
    DeadLetter,
    EnrollmentHistory,
    EventState,
    Notification,
    StageAttempt,
    State,
)
from pipeline import runner, stages
from pipeline.errors import (
    ClosedEnrollment,
    SignatureMismatch,
    UnknownPayment,
    UnrecognisedStatus,
)
from pipeline.ikhokha import LinkStatus, set_gateway
from tests.support import callback_body, make_enrollment, stored_callback


def run_all(settings, event_id):
    for stage in stages.STAGE_NAMES:
        runner.run_stage(stage, event_id, 1, settings)


def test_signature_check_reverifies_the_stored_event(session, settings):
    _, payment = make_enrollment(session)
    event = stored_callback(session, settings, callback_body(payment))
    stages.check_signature(session, event, settings)
    event.body = event.body.replace(b"SUCCESS", b"FAILURE")
    with pytest.raises(SignatureMismatch):
        stages.check_signature(session, event, settings)


def test_detection_records_type_confidence_and_indicators(session, settings):
    _, payment = make_enrollment(session, method="card")
    event = stored_callback(session, settings, callback_body(payment))
    stages.detect_payment_type(session, event, settings)
    assert event.payment_id == payment.id
    assert event.payment_type == "card"
    assert event.detection["confidence"] == 0.8
    assert event.detection["indicators"][0]["field"] == "checkout.payment_method"


def test_detection_of_an_unknown_payment_is_retryable(session, settings):
    event = stored_callback(session, settings, {"paylinkID": "nope", "status": "SUCCESS"})
    with pytest.raises(UnknownPayment) as info:
        stages.detect_payment_type(session, event, settings)
    assert info.value.retryable


def test_lookup_finds_the_enrollment_and_flags_mismatches(session, settings):
    enrollment, payment = make_enrollment(session)
    event = stored_callback(session, settings, callback_body(payment, amount=1, currency="USD"))
    stages.detect_payment_type(session, event, settings)
    stages.look_up_enrollment(session, event, settings)
    assert event.enrollment_id == enrollment.id
    assert event.checks["mismatches"] == [
        f"amount 1 cents, expected {payment.amount_cents}",
        "currency USD, expected ZAR",
    ]


@pytest.mark.parametrize(
    ("method", "extra", "target", "reason_part"),
    [
        ("card", {}, "approved", "card payment confirmed"),
        ("eft", {}, "pending_approval", "EFT payment"),
        ("card", {"paymentMethod": "bank transfer"}, "pending_approval", "uncertain"),
        ("card", {"amount": 5}, "pending_approval", "amount 5 cents"),
    ],
)
def test_routing(session, settings, method, extra, target, reason_part):
    _, payment = make_enrollment(session, method=method)
    if method == "eft":
        payment.paylink_id = "PL-eft-" + payment.id[:8]
    event = stored_callback(session, settings, callback_body(payment, **extra))
    for fn in (stages.detect_payment_type, stages.look_up_enrollment, stages.route_approval):
        fn(session, event, settings)
    assert event.decision["target"] == target
    assert reason_part in event.decision["reason"]


def test_routing_failure_and_unknown_status(session, settings):
    _, payment = make_enrollment(session)
    event = stored_callback(session, settings, callback_body(payment, status="FAILURE"))
    for fn in (stages.detect_payment_type, stages.look_up_enrollment, stages.route_approval):
        fn(session, event, settings)
    assert event.decision["target"] == "payment_failed"
    odd = stored_callback(session, settings, callback_body(payment, status="REVERSED"))
    stages.detect_payment_type(session, odd, settings)
    stages.look_up_enrollment(session, odd, settings)
    with pytest.raises(UnrecognisedStatus):
        stages.route_approval(session, odd, settings)


def test_routing_success_for_a_rejected_enrollment_needs_a_person(session, settings):
    _, payment = make_enrollment(session, state=State.REJECTED)
    event = stored_callback(session, settings, callback_body(payment))
    stages.detect_payment_type(session, event, settings)
    stages.look_up_enrollment(session, event, settings)
    with pytest.raises(ClosedEnrollment):
        stages.route_approval(session, event, settings)


def test_confirmation_with_ikhokha_holds_back_an_unconfirmed_success(session, settings):
    from dataclasses import replace

    strict = replace(settings, ikhokha_confirm_with_status=True)
    _, payment = make_enrollment(session)

    class Gateway:
        def get_status(self, paylink_id):
            assert paylink_id == payment.paylink_id
            return LinkStatus(paylink_id, "PENDING", None, {})

    set_gateway(Gateway())
    try:
        event = stored_callback(session, strict, callback_body(payment))
        for fn in (stages.detect_payment_type, stages.look_up_enrollment, stages.route_approval):
            fn(session, event, strict)
    finally:
        set_gateway(None)
    assert event.decision["target"] == "pending_approval"
    assert "status endpoint says PENDING" in event.decision["reason"]


def test_whole_pipeline_approves_a_card_payment_once(session, settings):
    enrollment, payment = make_enrollment(session)
    event = stored_callback(session, settings, callback_body(payment))
    run_all(settings, event.id)
    session.expire_all()
    assert enrollment.state == "approved"
    assert event.state == EventState.COMPLETED and event.outcome == "pending_payment -> approved"
    assert (
        session.scalar(
            select(func.count()).select_from(StageAttempt).where(StageAttempt.event_id == event.id)
        )
        == 6
    )
    notes = session.scalars(
        select(Notification).where(Notification.enrollment_id == enrollment.id)
    ).all()
    assert sorted(n.audience for n in notes) == ["admins", "student"]
    # Running every stage again (a duplicate message) is a no-op.
    for stage in stages.STAGE_NAMES:
        assert runner.run_stage(stage, event.id, 2, settings) is None
    assert (
        session.scalar(
            select(func.count())
            .select_from(EnrollmentHistory)
            .where(EnrollmentHistory.enrollment_id == enrollment.id)
        )
        == 1
    )


def test_stage_out_of_turn_is_skipped(session, settings):
    _, payment = make_enrollment(session)
    event = stored_callback(session, settings, callback_body(payment))
    assert runner.run_stage("status_update", event.id, 1, settings) is None


def test_failure_after_approval_changes_nothing(session, settings):
    enrollment, payment = make_enrollment(session)
    run_all(settings, stored_callback(session, settings, callback_body(payment)).id)
    late = stored_callback(session, settings, callback_body(payment, status="FAILURE"))
    run_all(settings, late.id)
    session.expire_all()
    assert enrollment.state == "approved"
    assert late.outcome == "no change: enrollment is approved"


def test_final_failure_writes_a_dead_letter_and_replay_completes(session, settings):
    enrollment, payment = make_enrollment(session)
    event = stored_callback(session, settings, callback_body(payment))
    runner.run_stage("signature_check", event.id, 1, settings)
    runner.record_failure(
        "payment_type_detection", event.id, 1, UnknownPayment("gone"), final=False
    )
    runner.record_failure("payment_type_detection", event.id, 2, UnknownPayment("gone"), final=True)
    session.expire_all()
    letter = session.scalar(select(DeadLetter).where(DeadLetter.event_id == event.id))
    assert (letter.stage, letter.error_code, event.state) == (
        "payment_type_detection",
        "unknown_payment",
        EventState.DEAD,
    )
    outcomes = session.scalars(
        select(StageAttempt.outcome)
        .where(StageAttempt.event_id == event.id)
        .order_by(StageAttempt.id)
    ).all()
    assert outcomes == ["ok", "retry", "failed"]
    sent = []
    runner.replay(session, letter.id, lambda e, s: sent.append((e, s)))
    session.commit()
    assert sent == [(event.id, "payment_type_detection")]
    for stage in stages.STAGE_NAMES[1:]:
        runner.run_stage(stage, event.id, 1, settings)
    session.expire_all()
    assert enrollment.state == "approved" and letter.replay_count == 1
    with pytest.raises(Exception, match="not dead"):
        runner.replay(session, letter.id, lambda e, s: None)


def test_replay_refuses_an_unknown_stage(session, settings):
    _, payment = make_enrollment(session)
    event = stored_callback(session, settings, callback_body(payment))
    runner.record_failure("signature_check", event.id, 1, SignatureMismatch(), final=True)
    letter = session.scalar(select(DeadLetter).where(DeadLetter.event_id == event.id))
    with pytest.raises(Exception, match="unknown stage"):
        runner.replay(session, letter.id, lambda e, s: None, from_stage="nowhere")


def test_sweeper_redrives_stalled_events_from_their_stage(session, settings):
    from dataclasses import replace

    _, payment = make_enrollment(session)
    event = stored_callback(session, settings, callback_body(payment))
    runner.run_stage("signature_check", event.id, 1, settings)
    sent = []
    assert runner.sweep(session, settings, lambda e, s: sent.append((e, s))) == []
    eager = replace(settings, pipeline_stale_after_seconds=-1)
    assert runner.sweep(session, eager, lambda e, s: sent.append((e, s))) == [event.id]
    session.commit()
    assert sent == [(event.id, "payment_type_detection")]


def test_backoff_grows_with_jitter_and_stays_bounded(settings):
    from dataclasses import replace

    s = replace(settings, pipeline_retry_base_seconds=1, pipeline_retry_max_seconds=30)
    first = [runner.backoff_seconds(0, s) for _ in range(50)]
    later = [runner.backoff_seconds(10, s) for _ in range(50)]
    assert all(0.5 <= x <= 1 for x in first)
    assert all(15 <= x <= 30 for x in later)
    assert len(set(later)) > 1
