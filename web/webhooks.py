"""POST /webhooks/ikhokha: authenticate, store durably, enqueue after commit, answer at once."""

from __future__ import annotations

import structlog
from flask import Blueprint, current_app, jsonify, request
from sqlalchemy.exc import SQLAlchemyError

from models import session_scope
from pipeline.errors import SkillpayError
from pipeline.inbox import receive_callback
from web import metrics
from web.errors import error_response
from workers.tasks import enqueue_pipeline

log = structlog.get_logger(__name__)
bp = Blueprint("webhooks", __name__)


@bp.post("/webhooks/ikhokha")
def ikhokha_callback():
    settings = current_app.config["SETTINGS"]
    body = request.get_data(cache=False)  # over the size limit: 413 from Werkzeug
    try:
        with session_scope() as session:
            received = receive_callback(
                session,
                settings,
                path=request.path,
                headers=dict(request.headers),
                body=body,
                enqueue=enqueue_pipeline,
            )
    except SkillpayError as exc:
        metrics.WEBHOOKS.labels(outcome=exc.code).inc()
        log.warning("webhook.rejected", code=exc.code, reason=exc.message, bytes=len(body))
        return error_response(exc.http_status, exc.code, exc.message)
    except SQLAlchemyError as exc:
        # Not stored: say so, and iKhokha delivers it again.
        metrics.WEBHOOKS.labels(outcome="unavailable").inc()
        log.error("webhook.store_failed", error=type(exc).__name__)
        response = error_response(
            503, "unavailable", "The callback could not be stored; retry later."
        )
        response.headers["Retry-After"] = "10"
        return response
    metrics.WEBHOOKS.labels(outcome="duplicate" if received.duplicate else "accepted").inc()
    log.info("webhook.received", event_id=received.event_id, duplicate=received.duplicate)
    return jsonify({"event_id": received.event_id, "duplicate": received.duplicate}), 200
