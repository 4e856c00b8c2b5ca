"""The receiving end: authenticate a callback, store it once, enqueue it after commit."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from sqlalchemy import update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from config import Settings
from models import EventState, WebhookEvent, on_commit, utcnow
from pipeline.callbacks import callback_body, parse_callback
from pipeline.signing import signed_callback, verify_callback

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


def receive_callback(
    session: Session,
    settings: Settings,
    *,
    path: str,
    headers: Mapping[str, str],
    body: bytes,
    enqueue: Callable[[int, str], object],
) -> Received:
    """Verify and store a callback; enqueue it after commit unless it is a duplicate.

    Raises AppIdMismatch or SignatureMismatch (nothing stored: an unauthenticated request
    never reaches the queue) or MalformedCallback (signed, but unusable).
    """
    authenticate(settings, headers, path, body)
    callback = parse_callback(body)
    kept = {k.lower(): v[:512] for k, v in headers.items() if k.lower() in KEPT_HEADERS}
    now = utcnow()
    values = {
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
    insert = postgresql.insert if session.bind.dialect.name == "postgresql" else sqlite.insert  # type: ignore[union-attr]
    stmt = (
        insert(WebhookEvent)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["dedupe_key"])
        .returning(WebhookEvent.id)
    )
    event_id = session.execute(stmt).scalar_one_or_none()
    if event_id is not None:
        on_commit(session, lambda: enqueue(event_id, FIRST_STAGE))
        return Received(event_id, duplicate=False)
    # A repeat delivery: count it, never process it twice.
    event_id = session.execute(
        update(WebhookEvent)
        .where(WebhookEvent.dedupe_key == callback.dedupe_key)
        .values(deliveries=WebhookEvent.deliveries + 1)
        .returning(WebhookEvent.id)
    ).scalar_one()
    return Received(event_id, duplicate=True)


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
