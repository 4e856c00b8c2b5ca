"""Each stage and the runner, called as plain functions against PostgreSQL."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest
from freezegun import freeze_time
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
from pipeline.dead_letters import replay_dead_letter
from pipeline.errors import (
    ClosedEnrollment,
    InvalidTransition,
    SignatureMismatch,
    UnknownPayment,
    UnrecognisedStatus,
)
from pipeline.ikhokha import MemoryGateway
from pipeline.stages import StageContext
from pipeline.sweeper import redrive_stalled_events
from tests.support import callback_body, make_enrollment, stored_callback


@pytest.fixture
def gateway():
    return MemoryGateway()


@pytest.fixture
def ctx(settings, gateway):
    return StageContext(settings, gateway)


def run_all(ctx, event_id):
    for stage in stages.STAGE_NAMES:
        runner.run_stage(stage, event_id, 1, ctx)


def route(session, event, ctx):
    for fn in (stages.detect_payment_type, stages.look_up_enrollment, stages.route_approval):
        fn(session, event, ctx)


def test_signature_check_reverifies_the_stored_event(session, settings, ctx):
    _, payment = make_enrollment(session)
    event = stored_callback(session, settings, callback_body(payment))
    stages.check_signature(session, event, ctx)
    event.body = event.body.replace(b"SUCCESS", b"FAILURE")
    with pytest.raises(SignatureMismatch):
        stages.check_signature(session, event, ctx)


def test_detection_records_type_confidence_and_indicators(session, settings, ctx):
    _, payment = make_enrollment(session, method="card")
    event = stored_callback(session, settings, callback_body(payment))
    stages.detect_payment_type(session, event, ctx)
    assert event.payment_id == payment.id
    assert event.payment_type == "card"
    assert event.detection["confidence"] == 0.8
    assert event.detection["indicators"][0]["field"] == "checkout.payment_method"


def test_detection_of_an_unknown_payment_is_retryable(session, settings, ctx):
    event = stored_callback(session, settings, {"paylinkID": "nope", "status": "SUCCESS"})
    with pytest.raises(UnknownPayment) as info:
        stages.detect_payment_type(session, event, ctx)
    assert info.value.retryable


def test_lookup_finds_the_enrollment_and_flags_mismatches(session, settings, ctx):
    enrollment, payment = make_enrollment(session)
    event = stored_callback(session, settings, callback_body(payment, amount=1, currency="USD"))
    stages.detect_payment_type(session, event, ctx)
    stages.look_up_enrollment(session, event, ctx)
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
def test_routing(session, settings, method, extra, target, reason_part, ctx):
    _, payment = make_enrollment(session, method=method)
    if method == "eft":
        payment.paylink_id = "PL-eft-" + payment.id[:8]
    event = stored_callback(session, settings, callback_body(payment, **extra))
    route(session, event, ctx)
    assert event.decision["target"] == target
    assert reason_part in event.decision["reason"]


def test_routing_failure_and_unknown_status(session, settings, ctx):
    _, payment = make_enrollment(session)
    event = stored_callback(session, settings, callback_body(payment, status="FAILURE"))
    for fn in (stages.detect_payment_type, stages.look_up_enrollment, stages.route_approval):
        fn(session, event, ctx)
    assert event.decision["target"] == "payment_failed"
    odd = stored_callback(session, settings, callback_body(payment, status="REVERSED"))
    stages.detect_payment_type(session, odd, ctx)
    stages.look_up_enrollment(session, odd, ctx)
    with pytest.raises(UnrecognisedStatus):
        stages.route_approval(session, odd, ctx)


def test_routing_success_for_a_rejected_enrollment_needs_a_person(session, settings, ctx):
    _, payment = make_enrollment(session, state=State.REJECTED)
    event = stored_callback(session, settings, callback_body(payment))
    stages.detect_payment_type(session, event, ctx)
    stages.look_up_enrollment(session, event, ctx)
    with pytest.raises(ClosedEnrollment):
        stages.route_approval(session, event, ctx)


def test_confirmation_with_ikhokha_holds_back_an_unconfirmed_success(session, settings, gateway):
    strict = StageContext(replace(settings, ikhokha_confirm_with_status=True), gateway)
    _, payment = make_enrollment(session)
    gateway.settle(payment.paylink_id, "PENDING")
    event = stored_callback(session, settings, callback_body(payment))
    stages.detect_payment_type(session, event, strict)
    session.commit()
    # iKhokha is asked before the routing transaction, with nothing locked.
    answer = stages.ask_ikhokha_for_status(event.id, strict)
    assert (answer.paylink_id, answer.status) == (payment.paylink_id, "PENDING")
    stages.look_up_enrollment(session, event, strict)
    stages.route_approval(session, event, replace(strict, fetched=answer))
    assert event.decision["target"] == "pending_approval"
    assert "status endpoint says PENDING" in event.decision["reason"]


def test_confirmed_success_runs_through_the_runner_and_approves(session, settings, gateway):
    confirm = StageContext(replace(settings, ikhokha_confirm_with_status=True), gateway)
    enrollment, payment = make_enrollment(session)
    gateway.settle(payment.paylink_id, "SUCCESS", payment.amount_cents)
    event = stored_callback(session, settings, callback_body(payment))
    session.commit()
    run_all(confirm, event.id)
    session.expire_all()
    assert enrollment.state == "approved"
    # A SUCCESS that iKhokha reports for another amount waits for an admin.
    other, other_payment = make_enrollment(session)
    gateway.settle(other_payment.paylink_id, "SUCCESS", 1)
    second = stored_callback(session, settings, callback_body(other_payment))
    session.commit()
    run_all(confirm, second.id)
    session.expire_all()
    assert other.state == "pending_approval" and "iKhokha reports 1 cents" in other.waiting_reason


def test_ask_ikhokha_only_when_the_setting_asks(session, settings, gateway):
    _, payment = make_enrollment(session)
    event = stored_callback(session, settings, callback_body(payment))
    gateway.failure = AssertionError("iKhokha must not be called")
    assert stages.ask_ikhokha_for_status(event.id, StageContext(settings, gateway)) is None


def test_whole_pipeline_approves_a_card_payment_once(session, settings, ctx):
    enrollment, payment = make_enrollment(session)
    event = stored_callback(session, settings, callback_body(payment))
    run_all(ctx, event.id)
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
        assert runner.run_stage(stage, event.id, 2, ctx) is None
    assert (
        session.scalar(
            select(func.count())
            .select_from(EnrollmentHistory)
            .where(EnrollmentHistory.enrollment_id == enrollment.id)
        )
        == 1
    )


def test_stage_out_of_turn_is_skipped(session, settings, ctx):
    _, payment = make_enrollment(session)
    event = stored_callback(session, settings, callback_body(payment))
    assert runner.run_stage("status_update", event.id, 1, ctx) is None


def test_failure_after_approval_changes_nothing(session, settings, ctx):
    enrollment, payment = make_enrollment(session)
    run_all(ctx, stored_callback(session, settings, callback_body(payment)).id)
    late = stored_callback(session, settings, callback_body(payment, status="FAILURE"))
    run_all(ctx, late.id)
    session.expire_all()
    assert enrollment.state == "approved"
    assert late.outcome == "no change: enrollment is approved"


def test_final_failure_writes_a_dead_letter_and_replay_completes(session, settings, ctx):
    enrollment, payment = make_enrollment(session)
    event = stored_callback(session, settings, callback_body(payment))
    runner.run_stage("signature_check", event.id, 1, ctx)
    runner.record_failure(
        "payment_type_detection", event.id, 1, UnknownPayment("gone"), settings, final=False
    )
    runner.record_failure(
        "payment_type_detection", event.id, 2, UnknownPayment("gone"), settings, final=True
    )
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
    replay_dead_letter(session, letter.id, lambda e, s: sent.append((e, s)))
    session.commit()
    assert sent == [(event.id, "payment_type_detection")]
    for stage in stages.STAGE_NAMES[1:]:
        runner.run_stage(stage, event.id, 1, ctx)
    session.expire_all()
    assert enrollment.state == "approved" and letter.replay_count == 1
    with pytest.raises(InvalidTransition, match="not dead"):
        replay_dead_letter(session, letter.id, lambda e, s: None)


def test_replay_refuses_an_unknown_stage(session, settings):
    _, payment = make_enrollment(session)
    event = stored_callback(session, settings, callback_body(payment))
    runner.record_failure("signature_check", event.id, 1, SignatureMismatch(), settings, final=True)
    letter = session.scalar(select(DeadLetter).where(DeadLetter.event_id == event.id))
    with pytest.raises(InvalidTransition, match="unknown stage"):
        replay_dead_letter(session, letter.id, lambda e, s: None, from_stage="nowhere")


def test_sweeper_redrives_stalled_events_from_their_stage(session, settings, ctx):
    _, payment = make_enrollment(session)
    event = stored_callback(session, settings, callback_body(payment))
    runner.run_stage("signature_check", event.id, 1, ctx)
    sent = []
    with freeze_time(timedelta(seconds=settings.pipeline_stale_after_seconds - 1), tick=True):
        assert redrive_stalled_events(session, settings, lambda e, s: sent.append((e, s))) == []
    with freeze_time(timedelta(seconds=settings.pipeline_stale_after_seconds + 1), tick=True):
        redriven = redrive_stalled_events(session, settings, lambda e, s: sent.append((e, s)))
    assert redriven == [event.id]
    assert sent == []  # only once the sweep commits
    session.commit()
    assert sent == [(event.id, "payment_type_detection")]


def test_backoff_grows_with_jitter_and_stays_bounded(settings):

    s = replace(settings, pipeline_retry_base_seconds=1, pipeline_retry_max_seconds=30)
    first = [runner.backoff_seconds(0, s) for _ in range(50)]
    later = [runner.backoff_seconds(10, s) for _ in range(50)]
    assert all(0.5 <= x <= 1 for x in first)
    assert all(15 <= x <= 30 for x in later)
    assert len(set(later)) > 1


@pytest.mark.parametrize("count", [3, 120])
def test_insert_many_returns_each_rows_id_in_order(session, count):
    """Few rows go in with RETURNING; many as one JSON document with ids drawn first. Either
    way each id is its own row's."""
    from models import Notification
    from models.db import insert_many

    enrollment, _ = make_enrollment(session)
    rows = [
        {
            "audience": "admins",
            "user_id": None,
            "enrollment_id": enrollment.id,
            "kind": f"kind.{i}",
            "payload": {"n": i, "text": 'quote " and é'},
            "created_at": enrollment.created_at,
        }
        for i in range(count)
    ]
    ids = insert_many(session, Notification.__table__, rows)
    assert len(set(ids)) == count and ids == sorted(ids)
    stored = {
        n.id: n for n in session.scalars(select(Notification).where(Notification.id.in_(ids)))
    }
    assert [(stored[i].kind, stored[i].payload) for i in ids] == [
        (row["kind"], row["payload"]) for row in rows
    ]
    assert stored[ids[0]].created_at == enrollment.created_at


@pytest.mark.parametrize("count", [3, 120])
def test_insert_many_gives_left_out_columns_the_models_defaults(session, count):
    from models import Notification
    from models.db import insert_many

    enrollment, _ = make_enrollment(session)
    rows = [
        {"audience": "admins", "user_id": None, "enrollment_id": enrollment.id, "kind": "k"}
        for _ in range(count)
    ]
    ids = insert_many(session, Notification.__table__, rows)
    stored = session.scalars(select(Notification).where(Notification.id.in_(ids))).all()
    assert len(stored) == count
    assert all(n.created_at is not None and n.payload == {} for n in stored)
