"""The receiving end: authenticate a callback, store it once, enqueue it after commit."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from sqlalchemy import Connection, Insert, Table, bindparam
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from config import Settings
from models import EventState, WebhookEvent, on_commit, utcnow
from pipeline.callbacks import callback_body, parse_callback
from pipeline.signing import signed_callback, verify_callback

_EVENTS: Table = WebhookEvent.__table__  # type: ignore[assignment]
# Where every event starts (pipeline.stages checks that its registry agrees).
FIRST_STAGE = "signature_check"
# The only headers stored with an event: what the signature check needs, and what helps an
# operator trace a delivery. Anything else (cookies, credentials of a proxy) is not kept.
KEPT_HEADERS = frozenset(
    {
        "ik-appid",
        "ik-sign",
        "content-type",
        "content-length",
        "user-agent",
        "x-forwarded-for",
        "x-request-id",
        "x-skillpay-source",
    }
)


@dataclass(frozen=True)
class Received:
    event_id: int
    duplicate: bool


def signing_paths(settings: Settings, request_path: str) -> list[str]:
    """The callback URL path we gave iKhokha, and the path the request actually reached."""
    return [settings.webhook_path, request_path]


def authenticate(settings: Settings, headers: Mapping[str, str], path: str, body: bytes) -> None:
    verify_callback(
        headers,
        signing_paths(settings, path),
        body,
        app_id=settings.ikhokha_app_id,
        secret=settings.ikhokha_app_secret,
    )


def store_callback(
    db: Connection | Session,
    settings: Settings,
    *,
    path: str,
    headers: Mapping[str, str],
    body: bytes,
) -> Received:
    """Verify a callback and store it in the inbox, or count it again if it is a repeat.

    One statement: an insert that, on a dedupe key already stored, counts one more delivery
    instead (a repeat is never processed twice). Enqueueing is the caller's, after commit,
    and only for a new event (not `duplicate`).

    Raises AppIdMismatch or SignatureMismatch (nothing stored: an unauthenticated request
    never reaches the queue) or MalformedCallback (signed, but unusable).
    """
    authenticate(settings, headers, path, body)
    callback = parse_callback(body)
    kept = {k.lower(): v[:512] for k, v in headers.items() if k.lower() in KEPT_HEADERS}
    now = utcnow()
    dialect = db.get_bind().dialect if isinstance(db, Session) else db.dialect
    params = {
        "dedupe_key": callback.dedupe_key,
        "received_at": now,
        "updated_at": now,
        "path": path[:300],
        "headers": kept,
        "body": body,
        "deliveries": 1,
        "state": EventState.RECEIVED,
        "stage": FIRST_STAGE,
        "paylink_id": callback.paylink_id,
        "external_transaction_id": callback.external_transaction_id,
        "callback_status": callback.status,
    }
    stmt = _store_statement(dialect.name, tuple(params))
    event_id, deliveries = db.execute(stmt, params).one()
    return Received(event_id, duplicate=deliveries > 1)


@functools.cache
def _store_statement(dialect: str, columns: tuple[str, ...]) -> Insert:
    """store_callback()'s statement, built once per dialect: its values are bound per call,
    so a request does not build (and SQLAlchemy does not key and look up) a new statement."""
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    return (
        insert(_EVENTS)
        .values({name: bindparam(name, type_=_EVENTS.c[name].type) for name in columns})
        .on_conflict_do_update(
            index_elements=[_EVENTS.c.dedupe_key],
            set_={"deliveries": _EVENTS.c.deliveries + 1},
        )
        .returning(_EVENTS.c.id, _EVENTS.c.deliveries)
    )


def receive_callback(
    session: Session,
    settings: Settings,
    *,
    path: str,
    headers: Mapping[str, str],
    body: bytes,
    enqueue: Callable[[int, str], object],
) -> Received:
    """store_callback() in the session's transaction; a new event is enqueued after commit."""
    received = store_callback(session, settings, path=path, headers=headers, body=body)
    if not received.duplicate:
        on_commit(session, lambda: enqueue(received.event_id, FIRST_STAGE))
    return received


def receive_status_answer(
    session: Session,
    settings: Settings,
    *,
    paylink_id: str,
    external_transaction_id: str,
    status: str,
    source: str,
    enqueue: Callable[[int, str], object],
) -> Received:
    """Feed an outcome learnt from iKhokha's status endpoint (a return page, reconciliation)
    into the pipeline as a callback signed with our own secret, so it takes the same
    idempotent path as the webhook: whichever arrives second changes nothing.
    """
    fields = callback_body(
        paylink_id=paylink_id,
        external_transaction_id=external_transaction_id,
        status=status,
        source=source,
    )
    path = settings.webhook_path
    body, headers = signed_callback(
        fields, path=path, app_id=settings.ikhokha_app_id, secret=settings.ikhokha_app_secret
    )
    headers["x-skillpay-source"] = source
    return receive_callback(
        session, settings, path=path, headers=headers, body=body, enqueue=enqueue
    )
