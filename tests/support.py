"""Shared helpers for tests: servers, signed callbacks, row factories, waiting."""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from sqlalchemy import create_engine, text

from config import Settings
from models import Course, Enrollment, Payment, State, User, utcnow
from models.db import driver_url
from pipeline.accounts import issue_token
from pipeline.callbacks import callback_body as _callback_body
from pipeline.checkout import EFT_WAITING_REASON
from pipeline.payments import new_reference
from pipeline.signing import signed_callback

TEST_APP_ID = "test-app-id"
TEST_SECRET = "test-secret-with-'quotes'-and-\\backslash"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

PG_ADMIN_URL = os.environ.get(
    "SKILLPAY_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("SKILLPAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")


def unavailable(what: str, exc: BaseException) -> None:
    """Outside CI a missing server skips; in CI it fails, because CI must run everything."""
    message = f"{what} is not reachable ({type(exc).__name__}: {exc})"
    if IN_CI:
        pytest.fail(message + " and CI=true: the integration tests must run", pytrace=False)
    pytest.skip(f"{message}; skipped because CI is not set (with CI=true this fails)")


def create_database(prefix: str) -> str:
    """A fresh, empty PostgreSQL database; returns its URL."""
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = create_engine(driver_url(PG_ADMIN_URL), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    parts = urlsplit(PG_ADMIN_URL)
    return urlunsplit(parts._replace(path="/" + name))


@contextmanager
def migrated_database(prefix: str) -> Iterator[str]:
    """A fresh database with the migrations applied, dropped afterwards."""
    try:
        url = create_database(prefix)
    except Exception as exc:  # noqa: BLE001
        unavailable("PostgreSQL", exc)
    from migrations import upgrade

    try:
        upgrade(url)
        yield url
    finally:
        drop_database(url)


def drop_database(url: str) -> None:
    name = urlsplit(url).path.lstrip("/")
    admin = create_engine(driver_url(PG_ADMIN_URL), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {predicate}")
        time.sleep(interval)


def signed(
    body: dict[str, Any] | bytes,
    *,
    path: str = "/webhooks/ikhokha",
    app_id: str = TEST_APP_ID,
    secret: str = TEST_SECRET,
) -> tuple[bytes, dict[str, str]]:
    return signed_callback(body, path=path, app_id=app_id, secret=secret)


def post_callback(target: Any, body: dict[str, Any] | bytes, **sign_kwargs: Any):
    """POST a signed callback to a Flask test client, or to a base URL over real HTTP."""
    raw, headers = signed(body, **sign_kwargs)
    if isinstance(target, str):
        import requests

        return requests.post(f"{target}/webhooks/ikhokha", data=raw, headers=headers, timeout=10)
    return target.post("/webhooks/ikhokha", data=raw, headers=headers)


def callback_body(payment: Payment, status: str = "SUCCESS", **extra: Any) -> dict[str, Any]:
    return _callback_body(
        paylink_id=payment.paylink_id,
        external_transaction_id=payment.id,
        status=status,
        **extra,
    )


class RecordingQueue:
    """Stands in for the workers' queue in unit tests: records what would have been sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any, Any]] = []
        self.queued: int | None = 0  # what depth() reports

    def stage(self, event_id: int, stage: str = "signature_check") -> bool:
        self.sent.append(("stage", event_id, stage))
        return True

    def bulk_job(self, job_id: str) -> bool:
        self.sent.append(("bulk_job", job_id, None))
        return True

    def payment_check(self, payment_id: str) -> bool:
        self.sent.append(("payment_check", payment_id, None))
        return True

    def depth(self) -> int | None:
        return self.queued


# Row factories ---------------------------------------------------------------------------


def make_user(session, role: str = "student", email: str | None = None) -> tuple[User, str]:
    user = User(email=email or f"{role}-{uuid.uuid4().hex[:8]}@example.com", role=role)
    session.add(user)
    session.flush()
    return user, issue_token(session, user)


def make_course(session, price_cents: int = 150000) -> Course:
    course = Course(title=f"Course {uuid.uuid4().hex[:6]}", price_cents=price_cents)
    session.add(course)
    session.flush()
    return course


def make_enrollment(
    session,
    *,
    method: str = "card",
    state: State = State.PENDING_PAYMENT,
    user: User | None = None,
    course: Course | None = None,
    amount_cents: int | None = None,
) -> tuple[Enrollment, Payment]:
    user = user or make_user(session)[0]
    course = course or make_course(session)
    enrollment = Enrollment(
        user_id=user.id,
        course_id=course.id,
        state=state,
        payment_method=method,
        # As the state machine sets it: the approval queue's SLA clock.
        waiting_since=utcnow() if state == State.PENDING_APPROVAL else None,
    )
    session.add(enrollment)
    session.flush()
    payment = Payment(
        enrollment_id=enrollment.id,
        method=method,
        amount_cents=course.price_cents if amount_cents is None else amount_cents,
        currency="ZAR",
        reference=new_reference(),
        paylink_id=f"PL-{uuid.uuid4().hex[:12]}" if method == "card" else None,
    )
    session.add(payment)
    session.flush()
    return enrollment, payment


def metric_sample(text: str, series: str) -> float | None:
    """One series' value in /metrics text; `series` is the name with its labels as Prometheus
    writes them (sorted): 'skillpay_dead_letters_open{stage="notification"}'."""
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == series:
            return float(value)
    return None


REFUSED_SIGNATURE = 'skillpay_callbacks_refused_total{reason="bad_signature"}'


def as_json(response) -> Any:
    return json.loads(response.data if hasattr(response, "data") else response.content)


def make_settings(database_url: str, **overrides) -> Settings:
    values = {
        "app_env": "test",
        "database_url": database_url,
        "celery_broker_url": REDIS_URL,
        "redis_url": "",
        "ikhokha_api_url": "http://127.0.0.1:9",
        "ikhokha_app_id": TEST_APP_ID,
        "ikhokha_app_secret": TEST_SECRET,
        "public_base_url": "http://127.0.0.1:8000",
        "pipeline_max_retries": 3,
        "pipeline_retry_base_seconds": 0.05,
        "pipeline_retry_max_seconds": 0.5,
    }
    values.update(overrides)
    return Settings(**values)


def many_waiting_enrollments(session, n: int, tag: str) -> list[int]:
    """n EFT enrollments waiting for approval, one student each, inserted in bulk."""
    from sqlalchemy import select as _select
    from sqlalchemy import text as _text

    course = make_course(session)
    session.execute(
        _text(
            "INSERT INTO users (email, role, created_at) "
            "SELECT 'bulk-' || g || '-' || :tag || '@example.com', 'student', now() "
            "FROM generate_series(1, :n) AS g"
        ),
        {"tag": tag, "n": n},
    )
    session.execute(
        _text(
            "INSERT INTO enrollments (user_id, course_id, state, payment_method, waiting_reason, "
            "created_at, updated_at, waiting_since) "
            "SELECT id, :course, 'pending_approval', 'eft', :reason, now(), now(), now() "
            "FROM users WHERE email LIKE 'bulk-%-' || :tag || '@example.com' ORDER BY id"
        ),
        {"tag": tag, "course": course.id, "reason": EFT_WAITING_REASON},
    )
    session.commit()
    return list(
        session.scalars(
            _select(Enrollment.id).where(Enrollment.course_id == course.id).order_by(Enrollment.id)
        )
    )


def many_card_payments(session, n: int) -> list[tuple[str, str, int]]:
    """n card enrollments waiting for payment, each with a payment link: (payment id,
    paylink id, enrollment id), inserted in bulk."""
    from sqlalchemy import text as _text

    tag = uuid.uuid4().hex[:8]
    course = make_course(session, price_cents=1000)
    session.execute(
        _text(
            "INSERT INTO users (email, role, created_at) SELECT 'c' || g || '-' || :t || '@example.com', "
            "'student', now() FROM generate_series(1, :n) g"
        ),
        {"t": tag, "n": n},
    )
    session.execute(
        _text(
            "INSERT INTO enrollments (user_id, course_id, state, payment_method, created_at, updated_at) "
            "SELECT id, :c, 'pending_payment', 'card', now(), now() FROM users "
            "WHERE email LIKE '%-' || :t || '@example.com' ORDER BY id"
        ),
        {"c": course.id, "t": tag},
    )
    rows = session.execute(
        _text(
            "INSERT INTO payments (id, enrollment_id, method, amount_cents, currency, reference, paylink_id, "
            "created_at, updated_at) SELECT gen_random_uuid()::text, id, 'card', 1000, 'ZAR', "
            "'F' || id || :t, 'PL' || id || :t, now(), now() FROM enrollments WHERE course_id = :c "
            "RETURNING id, paylink_id, enrollment_id"
        ),
        {"c": course.id, "t": tag},
    ).all()
    session.commit()
    return [(r[0], r[1], r[2]) for r in rows]


def stored_callback(session, settings: Settings, body: dict[str, Any], **sign_kwargs: Any):
    """A signed callback received into the inbox (nothing enqueued); returns its event."""
    from models import WebhookEvent
    from pipeline.inbox import receive_callback

    raw, headers = signed(body, **sign_kwargs)
    received = receive_callback(
        session,
        settings,
        path="/webhooks/ikhokha",
        headers=headers,
        body=raw,
        enqueue=lambda *a: None,
    )
    return session.get(WebhookEvent, received.event_id)


def enroll(web: str, auth: dict[str, str], course_id: int, method: str = "card") -> Any:
    """A student enrolls over HTTP; the new (or open) enrollment."""
    import requests

    response = requests.post(
        f"{web}/api/enrollments",
        json={"course_id": course_id, "payment_method": method},
        headers=auth,
        timeout=10,
    )
    assert response.status_code in (200, 201), response.text
    return response.json()


def enrollment_state(web: str, auth: dict[str, str], enrollment_id: int) -> Any:
    """GET /api/enrollments/<id> as that caller sees it."""
    import requests

    return requests.get(f"{web}/api/enrollments/{enrollment_id}", headers=auth, timeout=10).json()


def settle_link(simulator: str, paylink_url: str, status: str = "SUCCESS", times: int = 1) -> str:
    """Settle a link at the simulator, delivering its callback `times` times (0: never).
    Returns the link id."""
    import requests

    link_id = paylink_url.rsplit("/", 1)[1]
    answer = requests.post(
        f"{simulator}/_sim/links/{link_id}/settle",
        json={"status": status, "times": times},
        timeout=10,
    )
    assert answer.ok and answer.json()["status"] == status, answer.text
    return link_id
