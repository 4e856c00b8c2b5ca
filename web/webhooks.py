"""POST /webhooks/ikhokha: authenticate, store durably, enqueue after commit, answer at once."""

from __future__ import annotations

import structlog
from flask import Blueprint, jsonify, request
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.exceptions import RequestEntityTooLarge

from models import session_scope
from pipeline.errors import SkillpayError
from pipeline.inbox import receive_callback
from web import metrics
from web.extensions import settings, task_queue

log = structlog.get_logger(__name__)
bp = Blueprint("webhooks", __name__)


@bp.post("/webhooks/ikhokha")
def ikhokha_callback():
    """Errors leave through web.errors like any other: 401 and 400 say why; a database that
    cannot store the callback is a 503, and iKhokha delivers it again."""
    try:
        body = request.get_data(cache=False)
    except RequestEntityTooLarge:  # over the size limit: 413
        metrics.CALLBACKS_REFUSED.labels(reason="too_large").inc()
        raise
    try:
        with session_scope() as session:
            received = receive_callback(
                session,
                settings(),
                path=request.path,
                headers=dict(request.headers),
                body=body,
                enqueue=task_queue().stage,
            )
    except SkillpayError as exc:
        metrics.WEBHOOKS.labels(outcome=exc.code).inc()
        if exc.http_status < 500:
            metrics.CALLBACKS_REFUSED.labels(reason=exc.code).inc()
        log.warning("webhook.rejected", code=exc.code, reason=exc.message, bytes=len(body))
        raise
    except SQLAlchemyError:
        metrics.WEBHOOKS.labels(outcome="unavailable").inc()
        raise
    metrics.WEBHOOKS.labels(outcome="duplicate" if received.duplicate else "accepted").inc()
    log.info("webhook.received", event_id=received.event_id, duplicate=received.duplicate)
    return jsonify({"event_id": received.event_id, "duplicate": received.duplicate}), 200
