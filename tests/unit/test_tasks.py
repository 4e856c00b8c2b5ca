"""The stage and bulk tasks as the worker runs them, with the broker replaced by a recorder:
retry what is transient, dead-letter the rest, send the next stage after commit."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from celery.exceptions import Retry
from freezegun import freeze_time
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from models import DeadLetter, StageAttempt, WebhookEvent
from pipeline.errors import SignatureMismatch
from pipeline.ikhokha import MemoryGateway
from tests.support import RecordingQueue, callback_body, make_enrollment, stored_callback
from workers.celery_app import make_celery


@pytest.fixture
def celery(settings, session):
    app = make_celery(settings)
    app.queue = RecordingQueue()
    app.gateway = MemoryGateway()
    return app


@pytest.fixture
def event(session, settings):
    _, payment = make_enrollment(session)
    event = stored_callback(session, settings, callback_body(payment))
    session.commit()
    return event


def run(celery, mocker, name, *args, retries=0, redelivered=False, **kwargs):
    """Run a task's body as a worker would on its (retries+1)th delivery; `redelivered`: the
    broker hands the message out again (its worker died holding it)."""
    task = celery.tasks[name]
    retry = mocker.patch.object(task, "retry", side_effect=Retry())
    task.push_request(retries=retries, delivery_info={"redelivered": redelivered})
    try:
        task.run(*args, **kwargs)
    finally:
        task.pop_request()
    return retry


def attempts(session, event_id):
    session.expire_all()
    return session.scalars(
        select(StageAttempt.outcome)
        .where(StageAttempt.event_id == event_id)
        .order_by(StageAttempt.id)
    ).all()


def test_success_enqueues_the_next_stage_after_commit(celery, session, event, mocker):
    run(celery, mocker, "skillpay.stage.signature_check", event.id)
    assert celery.queue.sent == [("stage", event.id, "payment_type_detection")]
    assert attempts(session, event.id) == ["ok"]


def test_duplicate_message_enqueues_nothing(celery, session, event, mocker):
    run(celery, mocker, "skillpay.stage.signature_check", event.id)
    run(celery, mocker, "skillpay.stage.signature_check", event.id)
    assert len(celery.queue.sent) == 1


def test_transient_error_is_retried_with_backoff(celery, session, event, settings, mocker):
    mocker.patch(
        "pipeline.runner.run_stage", side_effect=OperationalError("SELECT", {}, Exception("gone"))
    )
    with pytest.raises(Retry):
        run(celery, mocker, "skillpay.stage.signature_check", event.id, retries=1)
    kwargs = celery.tasks["skillpay.stage.signature_check"].retry.call_args.kwargs
    assert (
        settings.pipeline_retry_base_seconds
        <= kwargs["countdown"]
        <= settings.pipeline_retry_max_seconds
    )
    assert kwargs["max_retries"] == settings.pipeline_max_retries
    assert attempts(session, event.id) == ["retry"]
    assert session.scalar(select(DeadLetter)) is None
    assert celery.queue.sent == []


def test_last_try_writes_a_dead_letter(celery, session, event, settings, mocker):
    mocker.patch(
        "pipeline.runner.run_stage", side_effect=OperationalError("SELECT", {}, Exception("gone"))
    )
    retry = run(
        celery,
        mocker,
        "skillpay.stage.signature_check",
        event.id,
        retries=settings.pipeline_max_retries,
    )
    retry.assert_not_called()
    session.expire_all()
    letter = session.scalar(select(DeadLetter))
    assert (letter.stage, letter.error_code) == ("signature_check", "OperationalError")
    assert session.get(WebhookEvent, event.id).state == "dead"


def test_error_that_cannot_pass_is_not_retried(celery, session, event, mocker):
    mocker.patch("pipeline.runner.run_stage", side_effect=SignatureMismatch())
    retry = run(celery, mocker, "skillpay.stage.signature_check", event.id)
    retry.assert_not_called()
    assert session.scalar(select(DeadLetter)).error_code == "bad_signature"
    assert attempts(session, event.id) == ["failed"]


def test_bulk_job_retries_a_lost_connection_and_raises_anything_else(celery, mocker):
    lost = OperationalError("SELECT", {}, Exception("gone"))
    mocker.patch("pipeline.bulk.run_job", side_effect=lost)
    with pytest.raises(Retry):
        run(celery, mocker, "skillpay.bulk_approve", "job-1")
    mocker.patch("pipeline.bulk.run_job", side_effect=ValueError("a bug"))
    with pytest.raises(ValueError, match="a bug"):
        run(celery, mocker, "skillpay.bulk_approve", "job-1")


def test_stage_tasks_use_the_settings_of_the_app_that_made_them(celery, settings):
    task = celery.tasks["skillpay.stage.approval_routing"]
    assert task.settings is settings
    assert celery.conf.task_default_queue == settings.celery_queue
    assert celery.conf.broker_url == settings.celery_broker_url


def test_check_payment_feeds_ikhokhas_answer_into_the_pipeline(celery, session, mocker):
    _, payment = make_enrollment(session)
    session.commit()
    celery.gateway.settle(payment.paylink_id, "SUCCESS", payment.amount_cents)
    run(celery, mocker, "skillpay.check_payment", payment.id)
    event = session.scalar(
        select(WebhookEvent).where(WebhookEvent.paylink_id == payment.paylink_id)
    )
    assert event.headers["x-skillpay-source"] == "return_page"
    assert celery.queue.sent == [("stage", event.id, "signature_check")]
    run(celery, mocker, "skillpay.check_payment", payment.id)  # the same answer: one event
    assert len(celery.queue.sent) == 1


def test_the_sweeper_waits_while_the_queue_has_a_backlog(celery, session, settings, mocker):

    _, payment = make_enrollment(session)
    event = stored_callback(session, settings, callback_body(payment))
    session.commit()
    celery.settings = replace(settings, pipeline_stale_after_seconds=-1, sweep_max_queue_depth=10)
    celery.queue.queued = 11
    run(celery, mocker, "skillpay.sweep_stalled_work")
    assert celery.queue.sent == []  # a backlog: nothing re-driven
    celery.queue.queued = 3
    run(celery, mocker, "skillpay.sweep_stalled_work")
    assert celery.queue.sent == [("stage", event.id, "signature_check")]


def test_a_message_that_keeps_coming_back_ends_in_the_dead_letter_table(
    celery, session, event, settings, mocker
):
    name = "skillpay.stage.signature_check"
    died = mocker.patch("pipeline.runner.run_stage", side_effect=SystemExit)
    for _ in range(settings.pipeline_max_redeliveries):
        # Each time, the worker running it died (SystemExit stands in for SIGKILL here).
        with pytest.raises(SystemExit):
            run(celery, mocker, name, event.id, redelivered=True)
    assert died.call_count == settings.pipeline_max_redeliveries
    run(celery, mocker, name, event.id, redelivered=True)
    assert died.call_count == settings.pipeline_max_redeliveries  # not run once more: buried
    session.expire_all()
    letter = session.scalar(select(DeadLetter).where(DeadLetter.event_id == event.id))
    assert (letter.stage, letter.error_code) == ("signature_check", "redelivery_limit")
    assert letter.attempts == settings.pipeline_max_redeliveries + 1
    assert session.get(WebhookEvent, event.id).state == "dead"
    assert celery.queue.sent == []


def test_a_stage_that_finishes_clears_its_redelivery_count(celery, session, event, mocker):
    run(celery, mocker, "skillpay.stage.signature_check", event.id, redelivered=True)
    session.expire_all()
    stored = session.get(WebhookEvent, event.id)
    assert (stored.stage, stored.redeliveries) == ("payment_type_detection", 0)


def test_a_redelivered_message_for_a_stage_already_done_sends_the_current_stage(
    celery, session, event, mocker
):
    # The first holder committed the stage, then died before sending the next message: its
    # message comes back, and the event must not wait for the sweeper.
    name = "skillpay.stage.signature_check"
    run(celery, mocker, name, event.id)
    celery.queue.sent.clear()  # the next message is lost with the worker
    run(celery, mocker, name, event.id)
    assert celery.queue.sent == []  # a plain duplicate: whoever ran it sent what follows
    run(celery, mocker, name, event.id, redelivered=True)
    assert celery.queue.sent == [("stage", event.id, "payment_type_detection")]


def test_a_failed_stage_is_not_stalled_until_its_retry_is_due(
    celery, session, event, settings, mocker
):
    mocker.patch(
        "pipeline.runner.run_stage", side_effect=OperationalError("SELECT", {}, Exception("gone"))
    )
    with pytest.raises(Retry):
        run(celery, mocker, "skillpay.stage.signature_check", event.id)
    mocker.stopall()
    session.expire_all()
    stored = session.get(WebhookEvent, event.id)
    assert stored.retry_at > stored.updated_at
    celery.settings = replace(settings, pipeline_stale_after_seconds=0.0)
    celery.queue.queued = 0
    run(celery, mocker, "skillpay.sweep_stalled_work")
    assert celery.queue.sent == []  # its retry is on its way
    with freeze_time(stored.retry_at + timedelta(seconds=1), tick=True):
        run(celery, mocker, "skillpay.sweep_stalled_work")
    assert celery.queue.sent == [("stage", event.id, "signature_check")]


def test_scheduled_work_runs_once_per_period_however_many_beats_send_it(
    celery, session, settings, mocker
):
    celery.settings = replace(settings, pipeline_stale_after_seconds=-1)
    celery.queue.queued = 0
    _, payment = make_enrollment(session)
    event = stored_callback(session, settings, callback_body(payment))
    session.commit()
    sweep = "skillpay.sweep_stalled_work"
    soon = datetime.fromtimestamp((time.time() // 30 + 1) * 30 + 5, UTC)  # 5 s into a period
    with freeze_time(soon):
        run(celery, mocker, sweep, period_seconds=30.0)  # beat one
        run(celery, mocker, sweep, period_seconds=30.0)  # beat two, same period: nothing
        assert celery.queue.sent == [("stage", event.id, "signature_check")]
        run(celery, mocker, sweep)  # sent by hand: always runs
        assert len(celery.queue.sent) == 2
    with freeze_time(soon + timedelta(seconds=30)):
        run(celery, mocker, sweep, period_seconds=30.0)  # the next period
    assert len(celery.queue.sent) == 3


def test_a_redis_channel_closing_after_its_connection_dropped_does_not_kill_the_worker(settings):
    """kombu would raise AttributeError here (fatal to a Celery worker) while putting back a
    message it holds; the message stays in Redis's unacked hash instead."""
    import redis as redis_client
    from kombu import Connection

    from tests.support import REDIS_URL
    from workers.celery_app import keep_unacked_redis_messages_when_the_connection_is_gone

    keep_unacked_redis_messages_when_the_connection_is_gone()
    queue = f"skillpay-unacked-{time.monotonic_ns()}"
    with Connection(REDIS_URL) as conn:
        channel = conn.channel()
        channel.queue_declare(queue)
        channel.basic_publish(channel.prepare_message("event 1"), exchange="", routing_key=queue)
        message = channel.basic_get(queue, no_ack=False)
        assert message is not None
        channel._disconnect_pools()
        channel.connection.client = None  # what a dropped connection leaves behind
        channel.qos.restore_unacked_once()  # raised AttributeError before
        unacked = redis_client.Redis.from_url(REDIS_URL).hget("unacked", message.delivery_tag)
        assert unacked is not None  # still held for redelivery, not lost
