"""Named errors. Each says whether trying again could help; web/ maps them to HTTP."""

from __future__ import annotations

import traceback

import sqlalchemy.exc


class SkillpayError(Exception):
    code = "error"
    retryable = False
    http_status = 400

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.__doc__ or self.code)
        self.message = message or (self.__doc__ or self.code).strip()


class SignatureMismatch(SkillpayError):
    """The ik-sign header does not match the body signed with our App Secret."""

    code = "bad_signature"
    http_status = 401


class AppIdMismatch(SkillpayError):
    """The ik-appid header is missing or is not our App ID."""

    code = "bad_app_id"
    http_status = 401


class MalformedCallback(SkillpayError):
    """The callback body is not a JSON object with a paylink id or transaction id and a status."""

    code = "malformed"
    http_status = 400


class UnknownPayment(SkillpayError):
    """No payment of ours matches the callback's paylinkID or externalTransactionID."""

    code = "unknown_payment"
    # The callback can outrun the commit that stores the paylink id: try a few times.
    retryable = True


class UnrecognisedStatus(SkillpayError):
    """The callback's status is neither SUCCESS nor FAILURE."""

    code = "unrecognised_status"


class ClosedEnrollment(SkillpayError):
    """Money arrived for an enrollment that is rejected or refunded: a person must decide."""

    code = "closed_enrollment"


class InvalidRequest(SkillpayError):
    """A request the API cannot act on, with the reason."""

    code = "invalid_request"
    http_status = 400


class InvalidTransition(SkillpayError):
    code = "invalid_transition"
    http_status = 409


class NotFound(SkillpayError):
    code = "not_found"
    http_status = 404


class GatewayError(SkillpayError):
    """iKhokha could not be reached or answered with an error."""

    code = "gateway_error"
    http_status = 502

    def __init__(self, message: str, *, kind: str, retryable: bool, student_message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.retryable = retryable
        self.student_message = student_message


def canonical_uuid(value: str) -> str:
    """The id in canonical form, or NotFound: ids in URLs are UUIDs, nothing else reaches SQL."""
    import uuid

    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise NotFound("no such id") from None


def is_transient(exc: BaseException) -> bool:
    """True for errors that may pass by themselves: lost connections, lock timeouts, 5xx."""
    if isinstance(exc, SkillpayError):
        return exc.retryable
    if isinstance(exc, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError):
        # Connection refused or dropped, lock_timeout, serialization failure, deadlock.
        return True
    if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated:
        return True
    import kombu.exceptions
    import redis.exceptions
    import requests

    return isinstance(
        exc,
        ConnectionError
        | TimeoutError
        | redis.exceptions.ConnectionError
        | redis.exceptions.TimeoutError
        | kombu.exceptions.OperationalError
        | requests.ConnectionError
        | requests.Timeout,
    )


def describe(exc: BaseException) -> tuple[str, str]:
    """A code and a message for an error, with no secret in it (we never put one there)."""
    if isinstance(exc, SkillpayError):
        return exc.code, exc.message
    last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" at {last[0].filename.rsplit('/', 1)[-1]}:{last[0].lineno}" if last else ""
    return type(exc).__name__, f"{type(exc).__name__}: {str(exc)[:500]}{where}"


class Conflict(SkillpayError):
    """Somebody else changed the same thing at the same moment; look again and retry."""

    code = "conflict"
    http_status = 409
