"""What a view reaches through the app it runs in: its settings, its Celery app and task
queue, its iKhokha gateway. create_app() puts them there; no view imports workers/."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flask import current_app
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address

from config import Settings
from pipeline.ikhokha import Gateway

# Rate limits per client address (behind a proxy, run it with ProxyFix or the limit is the
# proxy's). Counted in Redis when REDIS_URL is set, so every web process shares them.
limiter = Limiter(key_func=get_remote_address)

if TYPE_CHECKING:
    from workers.celery_app import SkillpayCelery, TaskQueue


def settings() -> Settings:
    return current_app.extensions["skillpay.settings"]  # type: ignore[no-any-return]


def celery() -> SkillpayCelery:
    return current_app.extensions["skillpay.celery"]  # type: ignore[no-any-return]


def task_queue() -> TaskQueue:
    return celery().queue


def gateway() -> Gateway:
    return current_app.extensions["skillpay.gateway"]  # type: ignore[no-any-return]
