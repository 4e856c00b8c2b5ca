"""The Celery app, made from the settings it is handed (Flask's `celery_init_app` pattern).

The worker's entry module (workers/app.py) makes one from the environment; the web app and
the CLI make theirs from the settings they were made with, so a process and its broker can
never disagree. TaskQueue is how they send work to the workers.
"""

from __future__ import annotations

from functools import cached_property

import structlog
from celery import Celery, current_app, signals
from kombu import Exchange, Queue

from config import Settings
from config.logging import configure_logging
from models import configure_database, reset_engine
from pipeline.ikhokha import Gateway, make_gateway
from pipeline.inbox import FIRST_STAGE

log = structlog.get_logger(__name__)

EXPIRY_INTERVAL_SECONDS = 300.0


class SkillpayCelery(Celery):
    """A Celery app that carries the settings it was made with, and the gateway they name."""

    def __init__(self, settings: Settings, **kwargs: object) -> None:
        super().__init__("skillpay", **kwargs)  # type: ignore[arg-type]
        self.settings = settings

    @cached_property
    def gateway(self) -> Gateway:
        return make_gateway(self.settings)

    @cached_property
    def queue(self) -> TaskQueue:
        return TaskQueue(self)


def keep_unacked_redis_messages_when_the_connection_is_gone() -> None:
    """kombu's Redis channel, closed after its broker connection dropped, puts its
    unacknowledged messages back through a connection object that no longer exists: an
    AttributeError, which Celery takes as fatal, and the worker exits mid-outage (kombu's
    `_connparams` on `connection.client is None`; tests/unit/test_tasks.py reproduces it).
    Those messages are safe where they are, in Redis's unacked hash (delivered again after the
    visibility timeout), and the sweeper re-drives their events sooner; so with no connection
    left, leave them there and let the worker reconnect."""
    from kombu.transport import redis as kombu_redis

    restore = kombu_redis.QoS.restore_unacked
    if getattr(restore, "skillpay_guarded", False):
        return

    def restore_unacked(qos: kombu_redis.QoS, client: object = None) -> None:
        if client is None and qos.channel.connection.client is None:
            log.warning("broker.unacked_left_for_redelivery", messages=len(qos._delivered))
            qos._delivered.clear()
            return
        restore(qos, client)

    restore_unacked.skillpay_guarded = True  # type: ignore[attr-defined]
    kombu_redis.QoS.restore_unacked = restore_unacked  # type: ignore[method-assign]


def make_celery(settings: Settings) -> SkillpayCelery:
    settings.check()  # a worker refuses an unsafe configuration too
    if settings.broker_kind == "redis":
        keep_unacked_redis_messages_when_the_connection_is_gone()
    configure_database(settings.database_url, settings.db_lock_timeout_ms)
    app = SkillpayCelery(settings, broker=settings.celery_broker_url)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=settings.celery_queue,
        task_queues=[task_queue(settings)],
        task_time_limit=settings.task_time_limit_seconds,
        # A message is acknowledged only once its stage has committed; a worker that dies
        # mid-stage leaves the message to be delivered again, and the stage is idempotent.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        worker_prefetch_multiplier=1,
        broker_transport_options=transport_options(settings),
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
            name: {"task": task, "schedule": every, "kwargs": {"period_seconds": every}}
            for name, task, every in (
                (
                    "sweep-stalled-work",
                    "skillpay.sweep_stalled_work",
                    settings.sweep_interval_seconds,
                ),
                (
                    "reconcile-waiting-payments",
                    "skillpay.reconcile",
                    settings.reconcile_interval_seconds,
                ),
                (
                    "expire-unpaid-enrollments",
                    "skillpay.expire_enrollments",
                    EXPIRY_INTERVAL_SECONDS,
                ),
            )
        },
    )
    import workers.tasks  # noqa: F401 - registers the shared tasks with this app

    app.set_default()
    return app


def task_queue(settings: Settings) -> Queue:
    """The one queue every task goes to. On RabbitMQ a quorum queue: durable and replicated,
    and it counts deliveries, so that a message no worker survives stops coming back
    (workers.tasks moves its event to the dead-letter table before the broker's limit)."""
    arguments: dict[str, object] = {}
    if settings.uses_quorum_queues:
        arguments = {
            "x-queue-type": "quorum",
            "x-delivery-limit": settings.broker_delivery_limit,
        }
    # On RabbitMQ a topic exchange: Celery's native delayed delivery (retries with a
    # countdown, on quorum queues) routes through it; a direct exchange would hold retries in
    # the worker. Elsewhere a direct one: Celery then publishes straight to the queue, where
    # kombu's emulated topic exchange on Redis reads its bindings (SMEMBERS) on every send.
    kind = "topic" if settings.broker_kind == "rabbitmq" else "direct"
    return Queue(
        settings.celery_queue,
        Exchange(settings.celery_queue, type=kind),
        routing_key=settings.celery_queue,
        durable=True,
        queue_arguments=arguments or None,
    )


def transport_options(settings: Settings) -> dict[str, object]:
    if settings.broker_kind == "redis":
        return {
            "visibility_timeout": settings.broker_visibility_timeout,
            "socket_timeout": 5,
            "socket_connect_timeout": 3,
        }
    if settings.broker_kind == "rabbitmq":
        # Publisher confirms: a send returns only once the broker has taken the message (a
        # committed row is never reported as sent when it was not).
        return {"confirm_publish": True}
    return {}


def broker_report(settings: Settings) -> tuple[list[str], list[str]]:
    """Connect to the broker and check that its task queue is what these settings declare.
    Returns (facts, problems). On RabbitMQ, declaring a queue that exists with other
    arguments (a classic queue where a quorum queue is wanted) fails with PRECONDITION_FAILED:
    workers would fail the same way, so it is a problem to fix before they start."""
    from amqp.exceptions import PreconditionFailed
    from kombu import Connection

    facts = [f"broker: {settings.broker_kind}"]
    queue = task_queue(settings)
    try:
        with Connection(
            settings.celery_broker_url,
            connect_timeout=5,
            transport_options=transport_options(settings),
        ) as conn:
            conn.ensure_connection(max_retries=1)
            queue(conn.default_channel).declare()
    except PreconditionFailed as exc:
        return facts, [
            f"queue {settings.celery_queue!r} exists on the broker with other arguments "
            f"({exc.reply_text}); drain it and delete it, or set SKILLPAY_CELERY_QUEUE to a "
            "new name"
        ]
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return facts, [f"cannot reach the broker: {type(exc).__name__}: {exc}"]
    if settings.broker_kind == "rabbitmq":
        kind = "quorum" if settings.uses_quorum_queues else "classic"
        facts.append(f"queue {settings.celery_queue!r}: {kind}, durable")
        if settings.uses_quorum_queues:
            facts.append(f"delivery limit: {settings.broker_delivery_limit} (broker)")
        facts.append("publisher confirms: on")
        facts.append(f"consumer timeout assumed: {settings.broker_consumer_timeout:g} s")
    elif settings.broker_kind == "redis":
        facts.append(f"visibility timeout: {settings.broker_visibility_timeout} s")
    facts.append(f"dead letter after {settings.pipeline_max_redeliveries} redeliveries")
    return facts, []


class TaskQueue:
    """Sends work to the workers through one Celery app. Messages carry ids only.

    Each send returns False instead of raising when the broker will not take the message:
    the row is committed by then, and the sweeper sends it later.
    """

    def __init__(self, celery: Celery) -> None:
        self.celery = celery

    def stage(self, event_id: int, stage: str = FIRST_STAGE) -> bool:
        """Send the event to `stage`. Each stage task sends the next after its commit, so the
        six tasks run as a chain with one small message per hop (a Celery canvas chain would
        carry the rest of the chain in every message and cost several ms per request)."""
        return self._send(f"skillpay.stage.{stage}", event_id)

    def bulk_job(self, job_id: str) -> bool:
        return self._send("skillpay.bulk_approve", job_id)

    def payment_check(self, payment_id: str) -> bool:
        return self._send("skillpay.check_payment", payment_id)

    def depth(self) -> int | None:
        """Messages waiting in the queue (not those a worker holds), or None if the broker
        cannot say right now."""
        name = self.celery.conf.task_default_queue
        try:
            with self.celery.connection_for_read() as conn:
                channel = conn.default_channel
                size = getattr(channel, "_size", None)  # kombu's virtual transports (Redis)
                if size is not None:
                    return int(size(name))
                return int(channel.queue_declare(queue=name, passive=True).message_count)
        except Exception as exc:  # noqa: BLE001 - unknown depth: sweep as usual
            log.warning("queue.depth_unknown", error=type(exc).__name__)
            return None

    def _send(self, task: str, object_id: int | str) -> bool:
        try:
            self.celery.send_task(task, (object_id,))
        except Exception as exc:  # noqa: BLE001 - the sweeper sends it later
            log.warning("task.enqueue_failed", task=task, id=object_id, error=type(exc).__name__)
            return False
        return True


@signals.worker_process_init.connect
def _after_fork(**_: object) -> None:
    # Connections opened before the fork must not be shared with the child.
    reset_engine()


@signals.setup_logging.connect
def _logging(**_: object) -> None:
    configure_logging(current_app.settings)
