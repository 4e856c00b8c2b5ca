"""Every error leaves as {"error": {"code", "message"}}; nothing malformed gets a 500."""

from __future__ import annotations

import structlog
from flask import Flask, jsonify
from sqlalchemy.exc import DataError, SQLAlchemyError
from werkzeug.exceptions import HTTPException

from pipeline.errors import GatewayError, SkillpayError

log = structlog.get_logger(__name__)
# When a client (iKhokha included) should try again after a 503.
RETRY_AFTER_SECONDS = "5"


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
            if not exc.retryable:
                return error_response(502, f"gateway_{exc.kind}", exc.student_message)
            response = error_response(503, f"gateway_{exc.kind}", exc.student_message)
            response.headers["Retry-After"] = RETRY_AFTER_SECONDS
            return response
        return error_response(exc.http_status, exc.code, exc.message)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):
        code = (exc.name or "error").lower().replace(" ", "_")
        response = error_response(exc.code or 500, code, exc.description or exc.name)
        if exc.code == 405 and exc.valid_methods:  # type: ignore[attr-defined]
            response.headers["Allow"] = ", ".join(exc.valid_methods)  # type: ignore[attr-defined]
        return response

    @app.errorhandler(DataError)
    def _invalid_data(exc: DataError):
        # The database refused a value (out of range, not storable text): the request's
        # fault, whatever slipped past validation. Not a 503: nothing is down.
        log.warning("database.invalid_value", error=type(exc.orig).__name__)
        return error_response(
            400, "invalid_request", "A value in the request is out of range or not valid text."
        )

    @app.errorhandler(SQLAlchemyError)
    def _database(exc: SQLAlchemyError):
        log.error("database.error", error=type(exc).__name__)
        response = error_response(
            503, "unavailable", "The service cannot reach its database; try again shortly."
        )
        response.headers["Retry-After"] = RETRY_AFTER_SECONDS
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("request.unhandled", error=type(exc).__name__)
        return error_response(500, "internal_error", "Something went wrong on our side.")
