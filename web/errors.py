"""Every error leaves as {"error": {"code", "message"}}; nothing malformed gets a 500."""

from __future__ import annotations

import structlog
from flask import Flask, jsonify
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.exceptions import HTTPException

from pipeline.errors import GatewayError, SkillpayError

log = structlog.get_logger(__name__)


def error_response(status: int, code: str, message: str, **extra: object):
    body: dict[str, object] = {"code": code, "message": message, **extra}
    response = jsonify({"error": body})
    response.status_code = status
    return response


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(SkillpayError)
    def _skillpay(exc: SkillpayError):
        if isinstance(exc, GatewayError):
            log.warning("gateway.error", kind=exc.kind, error=exc.message)
            status = 503 if exc.retryable else 502
            return error_response(status, f"gateway_{exc.kind}", exc.student_message)
        return error_response(exc.http_status, exc.code, exc.message)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):
        code = (exc.name or "error").lower().replace(" ", "_")
        response = error_response(exc.code or 500, code, exc.description or exc.name)
        if exc.code == 405 and exc.valid_methods:  # type: ignore[attr-defined]
            response.headers["Allow"] = ", ".join(exc.valid_methods)  # type: ignore[attr-defined]
        return response

    @app.errorhandler(SQLAlchemyError)
    def _database(exc: SQLAlchemyError):
        log.error("database.error", error=type(exc).__name__)
        response = error_response(
            503, "unavailable", "The service cannot reach its database; try again shortly."
        )
        response.headers["Retry-After"] = "5"
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("request.unhandled", error=type(exc).__name__)
        return error_response(500, "internal_error", "Something went wrong on our side.")
