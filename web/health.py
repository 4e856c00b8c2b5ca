"""Liveness, readiness and metrics for operators.

/readyz and /metrics touch the database and the broker, so their answers are cached for a few
seconds: a load balancer or a scraper polling them (or anyone looping them) costs at most one
check per interval per process. With SKILLPAY_METRICS_TOKEN set they answer only to it.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from functools import wraps
from typing import Any

import redis
from flask import Blueprint, Response, current_app, jsonify
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text

from models import get_engine
from web.auth import Unauthenticated, bearer_token
from web.extensions import celery, settings
from web.metrics import render

bp = Blueprint("health", __name__)
READY_CACHE_SECONDS = 5.0
_ready: dict[str, Any] = {"at": float("-inf"), "answer": None}


def operators_only(view: Callable[..., Any]) -> Callable[..., Any]:
    """When SKILLPAY_METRICS_TOKEN is set, the view answers only to that bearer token."""

    @wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        expected = settings().metrics_token
        given = bearer_token() or ""
        if expected and not hmac.compare_digest(given.encode(), expected.encode()):
            raise Unauthenticated("this endpoint needs the operators' metrics token")
        return view(*args, **kwargs)

    return wrapper


@bp.get("/healthz")
def healthz():
    return jsonify({"status": "ok"})


def _check(probe: Callable[[], object]) -> str:
    try:
        probe()
    except Exception as exc:  # noqa: BLE001 - the answer is the error's name
        return type(exc).__name__
    return "ok"


def _database() -> None:
    with get_engine().connect() as conn:
        conn.execute(text("SELECT 1"))


def _broker() -> None:
    with celery().connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=2)


def _redis() -> None:
    client = redis.Redis.from_url(settings().redis_url, socket_timeout=2, socket_connect_timeout=2)
    try:
        client.ping()
    finally:
        client.close()


@bp.get("/readyz")
@operators_only
def readyz():
    now = time.monotonic()
    if now - _ready["at"] > READY_CACHE_SECONDS:
        checks = {"database": _check(_database), "broker": _check(_broker)}
        if settings().redis_url:
            checks["redis"] = _check(_redis)
        ready = all(detail == "ok" for detail in checks.values())
        _ready["answer"] = ({"status": "ready" if ready else "not_ready", "checks": checks}, ready)
        _ready["at"] = now
    body, ready = _ready["answer"]
    return jsonify(body), 200 if ready else 503


@bp.get("/metrics")
@operators_only
def metrics():
    return Response(render(current_app.extensions["skillpay.gauges"]), mimetype=CONTENT_TYPE_LATEST)
