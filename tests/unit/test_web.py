"""The Flask app through its test client, against PostgreSQL; the broker is replaced by a
recorder and iKhokha by the in-memory gateway (the integration tests use the real ones)."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from models import EnrollmentHistory, State, WebhookEvent
from pipeline.ikhokha import MemoryGateway
from tests.support import (
    RecordingQueue,
    callback_body,
    make_enrollment,
    make_user,
    post_callback,
    signed,
)
from web.app import create_app


@pytest.fixture
def gateway():
    return MemoryGateway()


@pytest.fixture
def app(settings, session, gateway):
    app = create_app(settings, gateway=gateway)
    app.extensions["skillpay.celery"].queue = RecordingQueue()
    return app


@pytest.fixture
def enqueued(app) -> list:
    return app.extensions["skillpay.celery"].queue.sent


@pytest.fixture
def client(app):
    return app.test_client()


def count_events(session):
    return session.scalar(select(func.count()).select_from(WebhookEvent))


def test_signed_callback_is_stored_and_enqueued_after_commit(client, session, enqueued):
    _, payment = make_enrollment(session)
    response = post_callback(client, callback_body(payment))
    assert response.status_code == 200
    event = session.get(WebhookEvent, response.json["event_id"])
    assert event.state == "received" and event.paylink_id == payment.paylink_id
    assert event.headers["ik-appid"] and b'"status":"SUCCESS"' in event.body
    assert enqueued == [("stage", event.id, "signature_check")]


def test_duplicate_delivery_answers_200_and_is_not_enqueued_again(client, session, enqueued):
    _, payment = make_enrollment(session)
    first = post_callback(client, callback_body(payment))
    second = post_callback(client, callback_body(payment))
    assert second.status_code == 200 and second.json == {
        "event_id": first.json["event_id"],
        "duplicate": True,
    }
    assert len(enqueued) == 1
    assert session.get(WebhookEvent, first.json["event_id"]).deliveries == 2


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [({"secret": "wrong"}, "bad_signature"), ({"app_id": "someone-else"}, "bad_app_id")],
)
def test_unauthenticated_callbacks_get_401_and_store_nothing(
    client, session, enqueued, kwargs, code
):
    _, payment = make_enrollment(session)
    before = count_events(session)
    response = post_callback(client, callback_body(payment), **kwargs)
    assert response.status_code == 401 and response.json["error"]["code"] == code
    assert count_events(session) == before and enqueued == []


def test_signed_but_malformed_gets_400(client, session, enqueued):
    response = post_callback(client, {"status": "SUCCESS"})
    assert response.status_code == 400
    assert response.json["error"] == {
        "code": "malformed",
        "message": "paylinkID or externalTransactionID is required",
    }


def test_too_large_gets_413(client, settings, enqueued):
    raw, headers = signed(b'{"x":"' + b"a" * settings.webhook_max_bytes + b'"}')
    response = client.post("/webhooks/ikhokha", data=raw, headers=headers)
    assert (
        response.status_code == 413 and response.json["error"]["code"] == "request_entity_too_large"
    )


def test_storage_failure_gets_503_so_ikhokha_retries(client, session, enqueued, mocker):
    from sqlalchemy.exc import OperationalError

    mocker.patch(
        "web.webhooks.store_callback", side_effect=OperationalError("x", {}, Exception("down"))
    )
    _, payment = make_enrollment(session)
    response = post_callback(client, callback_body(payment))
    assert response.status_code == 503 and response.headers["Retry-After"]


def test_enrollment_is_visible_to_its_student_and_admins_only(client, session):
    enrollment, _ = make_enrollment(session)
    owner_token = None
    from models import User
    from pipeline.accounts import issue_token

    owner_token = issue_token(session, session.get(User, enrollment.user_id))
    _, other = make_user(session)
    _, admin = make_user(session, role="admin")
    session.commit()
    url = f"/api/enrollments/{enrollment.id}"
    assert client.get(url).status_code == 401
    assert client.get(url, headers={"Authorization": "Bearer nonsense"}).status_code == 401
    assert client.get(url, headers={"Authorization": f"Bearer {other}"}).status_code == 404
    mine = client.get(url, headers={"Authorization": f"Bearer {owner_token}"})
    assert mine.status_code == 200
    assert mine.json["state"] == "pending_payment" and mine.json["course_access"] is False
    assert mine.json["payment_method"] == "card" and "history" in mine.json
    assert client.get(url, headers={"Authorization": f"Bearer {admin}"}).status_code == 200


def test_health_and_metrics(client):
    assert client.get("/healthz").json == {"status": "ok"}
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and b"skillpay_inbox_events" in metrics.data


def test_unknown_routes_and_methods_are_json_errors(client):
    assert client.get("/nope").json["error"]["code"] == "not_found"
    response = client.get("/webhooks/ikhokha")
    assert response.status_code == 405 and response.json["error"]["code"] == "method_not_allowed"


def test_history_is_returned_in_order(client, session):
    from pipeline.state_machine import transition_enrollment

    _, admin = make_user(session, role="admin")
    enrollment, _ = make_enrollment(session, method="eft", state=State.PENDING_APPROVAL)
    transition_enrollment(session, enrollment.id, State.APPROVED, actor="admin:1", source="admin")
    session.commit()
    body = client.get(
        f"/api/enrollments/{enrollment.id}", headers={"Authorization": f"Bearer {admin}"}
    ).json
    assert [(h["from"], h["to"]) for h in body["history"]] == [("pending_approval", "approved")]
    assert session.scalar(select(func.count()).select_from(EnrollmentHistory)) >= 1


def test_gateway_outage_gives_a_clear_error_and_leaves_nothing_behind(client, session, gateway):
    from models import Enrollment, EnrollmentHistory, Payment
    from pipeline.errors import GatewayError
    from pipeline.ikhokha import STUDENT_MESSAGES
    from tests.support import make_course

    course = make_course(session)
    _, token = make_user(session)
    session.commit()
    counts = [
        session.scalar(select(func.count()).select_from(t))
        for t in (Enrollment, Payment, EnrollmentHistory)
    ]
    gateway.failure = GatewayError(
        "iKhokha POST unreachable",
        kind="network",
        retryable=True,
        student_message=STUDENT_MESSAGES["network"],
    )
    response = client.post(
        "/api/enrollments",
        json={"course_id": course.id, "payment_method": "card"},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status_code == 503 and response.headers["Retry-After"]
    assert response.json["error"] == {
        "code": "gateway_network",
        "message": STUDENT_MESSAGES["network"],
    }
    assert [
        session.scalar(select(func.count()).select_from(t))
        for t in (Enrollment, Payment, EnrollmentHistory)
    ] == counts


def test_card_checkout_makes_one_link_and_a_retry_answers_200(client, session, gateway):
    from tests.support import make_course

    course = make_course(session)
    _, token = make_user(session)
    session.commit()
    auth = {"Authorization": f"Bearer {token}"}
    body = {"course_id": course.id, "payment_method": "card"}
    first = client.post("/api/enrollments", json=body, headers=auth)
    assert first.status_code == 201 and first.json["created"] is True
    assert first.json["paylink_url"].startswith("https://pay.ikhokha.invalid/")
    [request] = gateway.requests
    assert request.external_transaction_id == first.json["payment"]["id"]
    assert request.callback_url == "http://127.0.0.1:8000/webhooks/ikhokha"
    again = client.post("/api/enrollments", json=body, headers=auth)
    assert again.status_code == 200 and again.json["id"] == first.json["id"]
    assert len(gateway.requests) == 1  # the open enrollment is returned: no second link
    from pipeline.state_machine import transition_enrollment

    transition_enrollment(
        session, first.json["id"], State.PAYMENT_FAILED, actor="pipeline", source="webhook"
    )
    session.commit()
    retry = client.post("/api/enrollments", json=body, headers=auth)
    # "Retry Payment": the same enrollment, a new payment and link; nothing was created.
    assert retry.status_code == 200 and retry.json["id"] == first.json["id"]
    assert (retry.json["created"], retry.json["new_payment"]) == (False, True)
    assert retry.json["state"] == "pending_payment" and len(gateway.requests) == 2
    assert retry.json["payment"]["id"] != first.json["payment"]["id"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"course_id": "1", "payment_method": "card"}, "course_id: Not a valid integer."),
        ({"course_id": 1, "payment_method": "cash"}, "payment_method: Must be one of: card, eft."),
        ({"course_id": 1}, "payment_method: Missing data for required field."),
        ({"course_id": 1, "payment_method": "card", "admin": True}, "admin: Unknown field."),
        ([1, 2], "the body must be a JSON object"),
    ],
)
def test_enrollment_requests_are_validated(client, session, body, message):
    _, token = make_user(session)
    session.commit()
    response = client.post(
        "/api/enrollments", json=body, headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 400
    assert response.json["error"]["message"] == message


def test_malformed_json_is_a_400(client, session):
    _, token = make_user(session)
    session.commit()
    response = client.post(
        "/api/enrollments", data=b"{not json", headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 400 and response.json["error"]["code"] == "invalid_request"


def test_a_revoked_token_is_refused(client, session):
    from models import User
    from pipeline.accounts import revoke_tokens

    user, token = make_user(session, role="admin")
    session.commit()
    assert (
        client.get(
            "/api/admin/dead-letters", headers={"Authorization": f"Bearer {token}"}
        ).status_code
        == 200
    )
    assert revoke_tokens(session, session.get(User, user.id).email) == 1
    session.commit()
    refused = client.get("/api/admin/dead-letters", headers={"Authorization": f"Bearer {token}"})
    assert refused.status_code == 401 and refused.json["error"]["code"] == "unauthenticated"


def hostile_requests(enrollment_id: int):
    """Each of these got a 500 (or a 503 that blamed the database) before."""
    deep = b"[" * 50_000 + b"]" * 50_000
    return [
        ("POST", "/api/enrollments", {"data": deep}),
        ("GET", "/api/admin/enrollments?older_than_minutes=99999999999", {}),
        ("GET", "/api/enrollments/99999999999999999999", {}),
        ("GET", "/api/courses/9223372036854775808/enrollment-state", {}),
        ("GET", "/api/admin/audit?admin_id=99999999999999999999", {}),
        ("GET", "/api/notifications?after=99999999999999999999", {}),
        ("POST", "/api/enrollments", {"json": {"course_id": 2**64, "payment_method": "card"}}),
        ("POST", "/api/admin/enrollments/bulk-approve", {"json": {"ids": [2**63]}}),
        (
            "POST",
            f"/api/admin/enrollments/{enrollment_id}/reject",
            {"json": {"reason": "bad\x00reason"}},
        ),
    ]


def test_hostile_api_requests_get_a_4xx_json_error(client, session):
    enrollment, _ = make_enrollment(session, method="eft", state=State.PENDING_APPROVAL)
    _, admin = make_user(session, role="admin")
    session.commit()
    auth = {"Authorization": f"Bearer {admin}"}
    for method, path, kwargs in hostile_requests(enrollment.id):
        response = client.open(path, method=method, headers=auth, **kwargs)
        assert 400 <= response.status_code < 500, (path, response.status_code, response.data[:200])
        assert set(response.json["error"]) == {"code", "message"}, path
    session.expire_all()
    assert session.get(type(enrollment), enrollment.id).state == "pending_approval"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        # A lone surrogate: valid JSON, but no UTF-8 text to store or re-sign.
        (b'{"paylinkID":"\\ud800","status":"SUCCESS"}', "paylinkid is not valid UTF-8 text"),
        (b'{"paylinkID":"PL\\u0000x","status":"SUCCESS"}', "paylinkid contains a NUL character"),
        (b'{"paylinkID":"PL1","status":"SUCCE\\u0000SS"}', "status contains a NUL character"),
        (
            b'{"paylinkID":"PL1","status":"FAILURE","Status":"SUCCESS"}',
            "the body names a field twice",
        ),
    ],
)
def test_signed_callbacks_that_cannot_be_stored_are_400(client, session, enqueued, body, message):
    before = count_events(session)
    response = post_callback(client, body)
    assert response.status_code == 400 and response.json["error"]["message"] == message
    assert count_events(session) == before and enqueued == []


def test_a_lone_surrogate_with_a_wrong_signature_is_401(client, session, enqueued):
    response = post_callback(
        client, b'{"paylinkID":"\\ud800","status":"SUCCESS"}', secret="not-ours"
    )
    assert response.status_code == 401 and response.json["error"]["code"] == "bad_signature"


def test_pages_run_only_their_own_nonced_scripts_and_cannot_be_framed(client):
    import re

    for path in ("/", "/admin"):
        response = client.get(path)
        policy = response.headers["Content-Security-Policy"]
        nonce = re.search(r"'nonce-([^']+)'", policy).group(1)
        scripts = re.findall(rb"<script[^>]*>", response.data)
        assert scripts and all(f'nonce="{nonce}"'.encode() in tag for tag in scripts), path
        assert (
            "frame-ancestors 'none'" in policy
            and "'unsafe-inline'" not in policy.split("script-src")[1].split(";")[0]
        )
        assert response.headers["Referrer-Policy"] == "no-referrer"
        assert "Strict-Transport-Security" not in response.headers  # not in test
    assert (
        client.get("/").headers["Content-Security-Policy"]
        != client.get("/").headers["Content-Security-Policy"]
    )  # a new nonce each time
    assert "script-src 'none'" in client.get("/healthz").headers["Content-Security-Policy"]


def test_production_adds_hsts(app, settings):
    from dataclasses import replace

    from flask import Response

    from web.app import add_security_headers

    with app.test_request_context("/"):
        response = Response("x")
        add_security_headers(response, replace(settings, app_env="production"))
    assert response.headers["Strict-Transport-Security"].startswith("max-age=")


def test_expired_tokens_are_refused(client, session):
    from datetime import timedelta

    from freezegun import freeze_time

    from pipeline.accounts import issue_token

    user, _ = make_user(session)
    token = issue_token(session, user, timedelta(hours=1))
    session.commit()
    auth = {"Authorization": f"Bearer {token}"}
    assert client.get("/api/me", headers=auth).json == {
        "id": user.id,
        "email": user.email,
        "role": "student",
    }
    with freeze_time(timedelta(hours=2), tick=True):
        refused = client.get("/api/me", headers=auth)
    assert refused.status_code == 401


def test_only_allowlisted_headers_are_stored_with_a_callback(client, session, enqueued):
    _, payment = make_enrollment(session)
    raw, headers = signed(callback_body(payment))
    headers |= {"Cookie": "session=abc", "X-Api-Key": "k", "User-Agent": "iKhokha"}
    response = client.post("/webhooks/ikhokha", data=raw, headers=headers)
    stored = session.get(WebhookEvent, response.json["event_id"]).headers
    assert {"ik-appid", "ik-sign", "content-type", "user-agent"} <= set(stored)
    assert "cookie" not in stored and "x-api-key" not in stored


def test_return_pages_ask_ikhokha_off_the_request_path_and_at_most_once(
    client, session, gateway, enqueued
):
    _, payment = make_enrollment(session)
    session.commit()
    gateway.failure = AssertionError("the request must not call iKhokha")
    for outcome in ("success", "success", "failure"):
        page = client.get(f"/payments/{payment.id}/{outcome}")
        assert page.status_code == 200 and b"pending_payment" in page.data
    assert enqueued == [("payment_check", payment.id, None)]


def test_return_pages_are_rate_limited_per_address(settings, session):
    from dataclasses import replace

    app = create_app(replace(settings, return_page_rate_limit="3/minute"), gateway=MemoryGateway())
    app.extensions["skillpay.celery"].queue = RecordingQueue()
    client = app.test_client()
    _, payment = make_enrollment(session)
    session.commit()
    codes = [client.get(f"/payments/{payment.id}/success").status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    limited = client.get(f"/payments/{payment.id}/success")
    assert limited.json["error"]["code"] == "too_many_requests"


def test_metrics_and_readiness_answer_only_to_the_operators_token_when_set(settings, session):
    from dataclasses import replace

    app = create_app(replace(settings, metrics_token="ops-token"), gateway=MemoryGateway())
    client = app.test_client()
    for path in ("/metrics", "/readyz"):
        assert client.get(path).status_code == 401
        wrong = client.get(path, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json["error"]["code"] == "unauthenticated"
    allowed = client.get("/metrics", headers={"Authorization": "Bearer ops-token"})
    assert allowed.status_code == 200 and b"skillpay_enrollments" in allowed.data


def test_database_gauges_are_counted_once_per_interval(session, settings, mocker):
    from web import metrics

    depth = mocker.Mock(return_value=7)
    collector = metrics.OperatorGauges(settings, depth)
    count = mocker.spy(metrics, "database_gauges")
    for _ in range(5):
        names = [family.name for family in collector.collect()]
    assert count.call_count == 1 and depth.call_count == 1
    assert "skillpay_enrollments" in names and "skillpay_queue_depth" in names


def test_a_database_that_does_not_answer_is_a_gauge_not_a_failed_scrape(session, settings, mocker):
    from web import metrics

    mocker.patch.object(metrics, "database_gauges", side_effect=OSError("connection refused"))
    collector = metrics.OperatorGauges(settings, lambda: None)
    families = {family.name: family for family in collector.collect()}
    assert list(families) == ["skillpay_database_up"]
    assert families["skillpay_database_up"].samples[0].value == 0
    list(collector.collect())
    assert metrics.database_gauges.call_count == 2  # a failure is not cached
