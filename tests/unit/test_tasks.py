"""The stage task wrapper as a plain function: retry what is transient, dead-letter the rest."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from celery.exceptions import Retry
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from models import DeadLetter, StageAttempt, WebhookEvent
from pipeline.errors import SignatureMismatch
from tests.support import callback_body, make_enrollment, stored_callback
from workers import tasks


@pytest.fixture
def event(session, settings):
    _, payment = make_enrollment(session)
    event = stored_callback(session, settings, callback_body(payment))
    session.commit()
    return event


def fake_task(mocker, retries=0):
    return SimpleNamespace(
        request=SimpleNamespace(retries=retries), retry=mocker.Mock(side_effect=Retry())
    )


def attempts(session, event_id):
    session.expire_all()
    return session.scalars(
        select(StageAttempt.outcome)
        .where(StageAttempt.event_id == event_id)
        .order_by(StageAttempt.id)
    ).all()


def test_success_enqueues_the_next_stage_after_commit(session, event, mocker):
    sent = mocker.patch("workers.tasks.enqueue_pipeline")
    tasks.run_pipeline_stage(fake_task(mocker), "signature_check", event.id)
    sent.assert_called_once_with(event.id, "payment_type_detection")
    assert attempts(session, event.id) == ["ok"]


def test_duplicate_message_enqueues_nothing(session, event, mocker):
    sent = mocker.patch("workers.tasks.enqueue_pipeline")
    tasks.run_pipeline_stage(fake_task(mocker), "signature_check", event.id)
    tasks.run_pipeline_stage(fake_task(mocker), "signature_check", event.id)
    assert sent.call_count == 1


def test_transient_error_is_retried_with_backoff(session, event, settings, mocker):
    mocker.patch(
        "pipeline.runner.run_stage", side_effect=OperationalError("SELECT", {}, Exception("gone"))
    )
    task = fake_task(mocker, retries=1)
    with pytest.raises(Retry):
        tasks.run_pipeline_stage(task, "signature_check", event.id)
    kwargs = task.retry.call_args.kwargs
    assert (
        settings.pipeline_retry_base_seconds
        <= kwargs["countdown"]
        <= settings.pipeline_retry_max_seconds
    )
    assert kwargs["max_retries"] == settings.pipeline_max_retries
    assert attempts(session, event.id) == ["retry"]
    assert session.scalar(select(DeadLetter)) is None


def test_last_try_writes_a_dead_letter(session, event, settings, mocker):
    mocker.patch(
        "pipeline.runner.run_stage", side_effect=OperationalError("SELECT", {}, Exception("gone"))
    )
    task = fake_task(mocker, retries=settings.pipeline_max_retries)
    tasks.run_pipeline_stage(task, "signature_check", event.id)
    task.retry.assert_not_called()
    session.expire_all()
    letter = session.scalar(select(DeadLetter))
    assert (letter.stage, letter.error_code) == ("signature_check", "OperationalError")
    assert session.get(WebhookEvent, event.id).state == "dead"


def test_error_that_cannot_pass_is_not_retried(session, event, mocker):
    mocker.patch("pipeline.runner.run_stage", side_effect=SignatureMismatch())
    task = fake_task(mocker)
    tasks.run_pipeline_stage(task, "signature_check", event.id)
    task.retry.assert_not_called()
    assert session.scalar(select(DeadLetter)).error_code == "bad_signature"
    assert attempts(session, event.id) == ["failed"]
