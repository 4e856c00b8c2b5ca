"""Thin Celery tasks around pipeline/ functions. Messages carry ids, never payloads.

The tasks are shared: they run in whichever app made them (workers.celery_app.make_celery),
and reach its settings, gateway and queue through `self.app`.
"""

from __future__ import annotations

import math
from typing import NoReturn

import structlog
from celery import Task, shared_task, signals

from config import Settings
from models import session_scope
from pipeline import bulk, runner
from pipeline.errors import describe, is_transient
from pipeline.expiry import expire_unpaid_enrollments, expire_waiting_transfers
from pipeline.reconcile import check_payment, reconcile
from pipeline.schedule import claim_period
from pipeline.stages import STAGE_NAMES, StageContext
from pipeline.sweeper import redrive_stalled_events, redrive_stalled_jobs

log = structlog.get_logger(__name__)


@signals.task_prerun.connect
def _bind_log_context(task_id: str, task: Task, args: tuple, **_: object) -> None:
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(task_id=task_id, task=task.name)
    if args and task.name.startswith("skillpay.stage."):
        structlog.contextvars.bind_contextvars(event_id=args[0])


class SkillpayTask(Task):
    """Every Skillpay task: the app's settings, and one retry policy. Only what may pass by
    itself is retried (lost connections, lock timeouts, iKhokha 5xx), with exponential backoff
    and jitter bounded below the broker's visibility timeout, and at most
    SKILLPAY_PIPELINE_MAX_RETRIES times; the caller decides what the last failure means."""

    @property
    def settings(self) -> Settings:
        return self.app.settings  # type: ignore[attr-defined, no-any-return]

    def may_retry(self, exc: BaseException) -> bool:
        return is_transient(exc) and self.request.retries < self.settings.pipeline_max_retries

    @property
    def redelivered(self) -> bool:
        """This message came back from the broker: a worker died (or lost its connection)
        while holding it."""
        return bool((self.request.delivery_info or {}).get("redelivered"))

    def first_in_period(self, period_seconds: float | None) -> bool:
        """A scheduled run (beat sends `period_seconds`) goes ahead only if it is the first
        of its period: a second beat started by mistake doubles the messages, not the work."""
        if period_seconds is None:
            return True  # sent by hand
        with session_scope() as session:
            claimed = claim_period(session, self.name, period_seconds)
        if not claimed:
            log.info("schedule.period_taken", period_seconds=period_seconds)
        return claimed

    def retry_countdown(self) -> float:
        countdown = runner.backoff_seconds(self.request.retries, self.settings)
        if self.settings.uses_quorum_queues:
            # RabbitMQ delays the retry in whole seconds (Celery's native delayed delivery).
            countdown = float(math.ceil(countdown))
        return countdown

    def retry_later(self, exc: BaseException, countdown: float | None = None) -> NoReturn:
        if countdown is None:
            countdown = self.retry_countdown()
        log.warning(
            "task.retry",
            attempt=self.request.retries + 1,
            countdown=round(countdown, 2),
            error=type(exc).__name__,
        )
        raise self.retry(
            countdown=countdown, exc=exc, max_retries=self.settings.pipeline_max_retries
        ) from exc


def run_pipeline_stage(task: SkillpayTask, stage: str, event_id: int) -> None:
    """Run one stage; on failure record the attempt, then retry, or dead-letter the event."""
    attempt = task.request.retries + 1
    ctx = StageContext(task.settings, task.app.gateway)  # type: ignore[attr-defined]
    redelivered = task.redelivered
    try:
        if redelivered and not runner.note_redelivery(stage, event_id, task.settings):
            return  # dead-lettered: it was handed out too often without finishing
        following = runner.run_stage(stage, event_id, attempt, ctx, redelivered=redelivered)
    except Exception as exc:  # noqa: BLE001 - recorded, then retried or dead-lettered
        final = not task.may_retry(exc)
        countdown = 0.0 if final else task.retry_countdown()
        try:
            runner.record_failure(
                stage, event_id, attempt, exc, task.settings, final=final, retry_in=countdown
            )
        except Exception as record_exc:  # noqa: BLE001 - the sweeper re-drives it later
            log.error(
                "pipeline.record_failure_failed", stage=stage, error=type(record_exc).__name__
            )
            if final:
                return
        if final:
            return
        task.retry_later(exc, countdown)
    if following is not None:
        # After the stage's commit. If this publish is lost, the sweeper sends it later.
        task.app.queue.stage(event_id, following)  # type: ignore[attr-defined]


def _stage_task(stage: str) -> Task:
    @shared_task(name=f"skillpay.stage.{stage}", base=SkillpayTask, bind=True)
    def stage_task(self: SkillpayTask, event_id: int) -> None:
        run_pipeline_stage(self, stage, event_id)

    return stage_task


STAGE_TASKS: dict[str, Task] = {stage: _stage_task(stage) for stage in STAGE_NAMES}


@shared_task(name="skillpay.bulk_approve", base=SkillpayTask, bind=True)
def bulk_approve(self: SkillpayTask, job_id: str) -> None:
    try:
        bulk.run_job(self.settings, job_id)
    except Exception as exc:
        if self.may_retry(exc):
            self.retry_later(exc)
        raise


@shared_task(name="skillpay.sweep_stalled_work", base=SkillpayTask, bind=True)
def sweep_stalled_work(self: SkillpayTask, period_seconds: float | None = None) -> int:
    """Re-drive events and bulk jobs that made no progress for a while.

    Not while the queue has a backlog: an event whose message is merely waiting in line looks
    stalled too, and re-driving it would add a duplicate to the line, which makes it longer,
    which makes more events look stalled. Lost messages are re-driven once the line is short.
    """
    if not self.first_in_period(period_seconds):
        return 0
    queue = self.app.queue  # type: ignore[attr-defined]
    depth = queue.depth()
    if depth is not None and depth > self.settings.sweep_max_queue_depth:
        log.info("pipeline.sweep_deferred", queue_depth=depth)
        return 0
    with session_scope() as session:
        events = redrive_stalled_events(session, self.settings, queue.stage)
        jobs = redrive_stalled_jobs(session, self.settings, queue.bulk_job)
    if events or jobs:
        log.info("pipeline.swept", events=events[:20], jobs=jobs[:20])
    return len(events) + len(jobs)


@shared_task(name="skillpay.reconcile", base=SkillpayTask, bind=True)
def reconcile_payments(
    self: SkillpayTask, period_seconds: float | None = None, trigger: str = "beat"
) -> int:
    """Reconciliation in both directions (beat runs it; an admin may ask for a run)."""
    if not self.first_in_period(period_seconds):
        return 0
    with session_scope() as session:
        report = reconcile(
            session,
            self.settings,
            self.app.gateway,  # type: ignore[attr-defined]
            self.app.queue.stage,  # type: ignore[attr-defined]
            trigger=trigger,
        )
    if report.findings:
        log.info("reconcile.done", run_id=report.run_id, checked=report.checked, **report.counts)
    return len(report.findings)


@shared_task(name="skillpay.check_payment", base=SkillpayTask, bind=True)
def check_payment_status(self: SkillpayTask, payment_id: str) -> None:
    """Ask iKhokha about one payment a student came back for (sent by the return page)."""
    try:
        with session_scope() as session:
            check_payment(
                session, self.settings, self.app.gateway, payment_id, self.app.queue.stage
            )  # type: ignore[attr-defined]
    except Exception as exc:  # noqa: BLE001 - the callback or reconciliation settles it anyway
        if self.may_retry(exc):
            self.retry_later(exc)
        log.warning("check_payment.failed", payment_id=payment_id, error=describe(exc)[1])


@shared_task(name="skillpay.expire_enrollments", base=SkillpayTask, bind=True)
def expire_enrollments(self: SkillpayTask, period_seconds: float | None = None) -> int:
    if not self.first_in_period(period_seconds):
        return 0
    with session_scope() as session:
        return expire_unpaid_enrollments(session, self.settings) + expire_waiting_transfers(
            session, self.settings
        )
