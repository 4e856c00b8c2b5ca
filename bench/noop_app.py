"""The pipeline's baseline: six no-op Celery tasks in a chain, same broker and worker settings."""

from __future__ import annotations

import os
import time

import redis
from celery import Celery, chain

from config import get_settings
from workers.celery_app import make_celery

app: Celery = make_celery(get_settings())
app.conf.update(
    task_default_queue=os.environ.get("SKILLPAY_CELERY_QUEUE", "skillpay") + "-noop",
    include=[],
    beat_schedule={},
)
_redis = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/13"))


def _noop(self_name: str):
    @app.task(name=f"bench.noop.{self_name}")
    def task(event_id: int) -> None:
        return None

    return task


STAGES = [_noop(f"stage{i}") for i in range(5)]


@app.task(name="bench.noop.last")
def last(event_id: int) -> None:
    _redis.rpush("bench:noop:done", f"{event_id}:{time.time()}")


def noop_chain(event_id: int) -> chain:
    return chain(*(t.si(event_id) for t in STAGES), last.si(event_id))
