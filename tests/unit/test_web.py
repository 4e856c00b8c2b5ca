"""The Flask app through its test client, against PostgreSQL; the broker is replaced by a
recorder (the integration tests use the real one)."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from models import EnrollmentHistory, State, WebhookEvent
from tests.support import callback_body, make_enrollment, make_user, signed
from web.app import create_app


@pytest.fixture
def enqueued(mocker):
    sent: list[tuple[int, str]] = []
    mocker.patch(
        "web.webhooks.enqueue_pipeline",
        side_effect=lambda e, s="signature_check": sent.append((e, s)),
    )
    return sent


@pytest.fixture
def client(settings, session):
    return create_app(settings).test_client()


def post_callback(client, body, **kwargs):
    raw, headers = signed(body, **kwargs)
    return client.post("/webhooks/ikhokha", data=raw, headers=headers)


def count_events(session):
    return session.scalar(select(func.count()).select_from(WebhookEvent))


def test_signed_callback_is_stored_and_enqueued_after_commit(client, session, enqueued):
    _, payment = make_enrollment(session)
    response = post_callback(client, callback_body(payment))
    assert response.status_code == 200
    event = session.get(WebhookEvent, response.json["event_id"])
    assert event.state == "received" and event.paylink_id == payment.paylink_id
    assert event.headers["ik-appid"] and b'"status":"SUCCESS"' in event.body
    assert enqueued == [(event.id, "signature_check")]


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
        "web.webhooks.receive_callback", side_effect=OperationalError("x", {}, Exception("down"))
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


def test_gateway_outage_gives_a_clear_error_and_leaves_nothing_behind(client, session):
    from models import Enrollment, EnrollmentHistory, Payment
    from pipeline.errors import GatewayError
    from pipeline.ikhokha import STUDENT_MESSAGES, set_gateway
    from tests.support import make_course

    class Down:
        def create_payment_link(self, request):
            raise GatewayError(
                "iKhokha POST unreachable",
                kind="network",
                retryable=True,
                student_message=STUDENT_MESSAGES["network"],
            )

    course = make_course(session)
    _, token = make_user(session)
    session.commit()
    counts = [
        session.scalar(select(func.count()).select_from(t))
        for t in (Enrollment, Payment, EnrollmentHistory)
    ]
    set_gateway(Down())
    try:
        response = client.post(
            "/api/enrollments",
            json={"course_id": course.id, "payment_method": "card"},
            headers={"Authorization": f"Bearer {token}"},
        )
    finally:
        set_gateway(None)
    assert response.status_code == 503
    assert response.json["error"] == {
        "code": "gateway_network",
        "message": STUDENT_MESSAGES["network"],
    }
    assert [
        session.scalar(select(func.count()).select_from(t))
        for t in (Enrollment, Payment, EnrollmentHistory)
    ] == counts


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
