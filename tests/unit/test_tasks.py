"""The stage and bulk tasks as the worker runs them, with the broker replaced by a recorder:
retry what is transient, dead-letter the rest, send the next stage after commit."""

from __future__ import annotations

import pytest
from celery.exceptions import Retry
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


def run(celery, mocker, name, *args, retries=0):
    """Run a task's body as a worker would on its (retries+1)th delivery."""
    task = celery.tasks[name]
    retry = mocker.patch.object(task, "retry", side_effect=Retry())
    task.push_request(retries=retries)
    try:
        task.run(*args)
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
    from dataclasses import replace

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
