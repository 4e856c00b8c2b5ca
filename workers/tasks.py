"""Thin Celery tasks around pipeline/ functions. Messages carry ids, never payloads."""

from __future__ import annotations

import structlog
from celery import Task, signals

from config import get_settings
from models import session_scope
from pipeline import runner
from pipeline.errors import describe, is_transient
from pipeline.stages import STAGE_NAMES
from workers.app import celery

log = structlog.get_logger(__name__)


@signals.task_prerun.connect
def _bind_log_context(task_id: str, task: Task, args: tuple, **_: object) -> None:
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(task_id=task_id, task=task.name)
    if args and task.name.startswith("skillpay.stage."):
        structlog.contextvars.bind_contextvars(event_id=args[0])


def run_pipeline_stage(task: Task, stage: str, event_id: int) -> None:
    settings = get_settings()
    retries = task.request.retries
    attempt = retries + 1
    try:
        following = runner.run_stage(stage, event_id, attempt, settings)
    except Exception as exc:
        final = not is_transient(exc) or retries >= settings.pipeline_max_retries
        try:
            runner.record_failure(stage, event_id, attempt, exc, final=final)
        except Exception as record_exc:  # noqa: BLE001 - the sweeper re-drives it later
            log.error(
                "pipeline.record_failure_failed", stage=stage, error=type(record_exc).__name__
            )
            if final:
                return
        if final:
            log.error("pipeline.dead_letter", stage=stage, error=describe(exc)[1])
            return
        countdown = runner.backoff_seconds(retries, settings)
        log.warning(
            "pipeline.retry",
            stage=stage,
            attempt=attempt,
            countdown=round(countdown, 2),
            error=type(exc).__name__,
        )
        raise task.retry(
            countdown=countdown, exc=exc, max_retries=settings.pipeline_max_retries
        ) from exc
    if following is not None:
        # After the stage's commit. If this publish is lost, the sweeper sends it later.
        enqueue_pipeline(event_id, following)


def _make_stage_task(stage: str) -> Task:
    @celery.task(name=f"skillpay.stage.{stage}", bind=True)
    def stage_task(self: Task, event_id: int) -> None:
        run_pipeline_stage(self, stage, event_id)

    return stage_task


STAGE_TASKS: dict[str, Task] = {stage: _make_stage_task(stage) for stage in STAGE_NAMES}


def enqueue_pipeline(event_id: int, from_stage: str = STAGE_NAMES[0]) -> bool:
    """Send the event to from_stage; each stage task sends the next after its commit, so the
    six tasks run as a chain with one small message per hop (a Celery canvas chain would
    carry the rest of the chain in every message and cost several ms to build per request).

    False if the broker would not take it: the event is stored, and the sweeper sends it later.
    """
    try:
        STAGE_TASKS[from_stage].apply_async((event_id,))
    except Exception as exc:  # noqa: BLE001
        log.warning("pipeline.enqueue_failed", event_id=event_id, error=type(exc).__name__)
        return False
    return True


@celery.task(name="skillpay.sweep_stalled_events")
def sweep_stalled_events() -> int:
    settings = get_settings()
    with session_scope() as session:
        ids = runner.sweep(session, settings, enqueue_pipeline)
    if ids:
        log.info("pipeline.swept", count=len(ids), event_ids=ids[:20])
    from pipeline import bulk

    with session_scope() as session:
        jobs = bulk.stalled_jobs(session, settings.pipeline_stale_after_seconds)
    for job_id in jobs:
        enqueue_bulk_job(job_id)
    return len(ids) + len(jobs)


@celery.task(name="skillpay.reconcile")
def reconcile_waiting_payments() -> int:
    from pipeline.ikhokha import get_gateway
    from pipeline.reconcile import reconcile

    settings = get_settings()
    with session_scope() as session:
        report = reconcile(session, settings, get_gateway(settings), enqueue_pipeline)
    if report.fed or report.errors:
        log.info(
            "reconcile.done", checked=report.checked, fed=len(report.fed), errors=report.errors[:5]
        )
    return len(report.fed)


@celery.task(name="skillpay.expire_enrollments")
def expire_enrollments() -> int:
    from pipeline.enrollments import expire_stale

    with session_scope() as session:
        return expire_stale(session, get_settings())


@celery.task(name="skillpay.bulk_approve", bind=True)
def bulk_approve(self: Task, job_id: str) -> None:
    from pipeline import bulk

    try:
        bulk.run_job(job_id)
    except Exception as exc:
        if is_transient(exc) and self.request.retries < get_settings().pipeline_max_retries:
            raise self.retry(
                countdown=runner.backoff_seconds(self.request.retries, get_settings()),
                exc=exc,
                max_retries=get_settings().pipeline_max_retries,
            ) from exc
        raise


def enqueue_bulk_job(job_id: str) -> bool:
    try:
        bulk_approve.apply_async((job_id,))
    except Exception as exc:  # noqa: BLE001 - the sweeper finds the queued job later
        log.warning("bulk.enqueue_failed", job_id=job_id, error=type(exc).__name__)
        return False
    return True
