"""The worker's entry module: `celery -A workers.app worker` and `celery -A workers.app beat`."""

from __future__ import annotations

from celery import Celery, signals

from config import get_settings
from config.logging import configure_logging
from models import reset_engine


def make_celery() -> Celery:
    settings = get_settings()
    app = Celery("skillpay", broker=settings.celery_broker_url, include=["workers.tasks"])
    transport: dict[str, object] = {}
    if settings.celery_broker_url.startswith(("redis", "rediss")):
        transport = {
            "visibility_timeout": settings.broker_visibility_timeout,
            "socket_timeout": 5,
            "socket_connect_timeout": 3,
        }
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=settings.celery_queue,
        # A message is acknowledged only once its stage has committed; a worker that dies
        # mid-stage leaves the message to be delivered again, and the stage is idempotent.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        worker_prefetch_multiplier=1,
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=3,
        # Publishing from the web request gives up quickly: the inbox row is already stored
        # and the sweeper enqueues it later.
        task_publish_retry_policy={
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.5,
        },
        worker_send_task_events=True,
        worker_hijack_root_logger=False,
        # When the broker connection drops, a running stage can no longer acknowledge its
        # message (its channel is gone): cancel it and let the message come back. Stages are
        # idempotent, so running one again is harmless (Celery 6 makes this the default).
        worker_cancel_long_running_tasks_on_connection_loss=True,
        beat_schedule={
            "sweep-stalled-events": {
                "task": "skillpay.sweep_stalled_events",
                "schedule": settings.sweep_interval_seconds,
            },
            "reconcile-waiting-payments": {
                "task": "skillpay.reconcile",
                "schedule": settings.reconcile_interval_seconds,
            },
            "expire-stale-enrollments": {
                "task": "skillpay.expire_enrollments",
                "schedule": 300.0,
            },
        },
    )
    return app


celery = make_celery()
app = celery


@signals.worker_process_init.connect
def _after_fork(**_: object) -> None:
    # Connections opened before the fork must not be shared with the child.
    reset_engine()


@signals.setup_logging.connect
def _logging(**_: object) -> None:
    configure_logging(get_settings())
