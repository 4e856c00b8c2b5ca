"""POST /webhooks/ikhokha: authenticate, store durably, enqueue after commit, answer at once."""

from __future__ import annotations

import structlog
from flask import Blueprint, jsonify, request
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.exceptions import RequestEntityTooLarge

from models import autocommit
from pipeline.errors import SkillpayError
from pipeline.inbox import store_callback
from web import metrics
from web.extensions import settings, task_queue

log = structlog.get_logger(__name__)
bp = Blueprint("webhooks", __name__)


@bp.post("/webhooks/ikhokha")
def ikhokha_callback():
    """Errors leave through web.errors like any other: 401 and 400 say why; a database that
    cannot store the callback is a 503, and iKhokha delivers it again.

    The lean path: the signature is checked, then one autocommitted statement stores the
    event durably (no ORM session, no BEGIN or COMMIT round trips), and only then is it
    enqueued. If that publish fails, the row is stored and the sweeper sends it later."""
    try:
        body = request.get_data(cache=False)
    except RequestEntityTooLarge:  # over the size limit: 413
        metrics.CALLBACKS_REFUSED.labels(reason="too_large").inc()
        raise
    try:
        with autocommit() as conn:
            received = store_callback(
                conn, settings(), path=request.path, headers=request.headers, body=body
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
    if not received.duplicate:
        task_queue().stage(received.event_id)
    metrics.WEBHOOKS.labels(outcome="duplicate" if received.duplicate else "accepted").inc()
    log.info("webhook.received", event_id=received.event_id, duplicate=received.duplicate)
    return jsonify({"event_id": received.event_id, "duplicate": received.duplicate}), 200
