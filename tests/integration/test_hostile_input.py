"""A hostile-input corpus against the receiver and the API: no 5xx, a JSON error for each
refusal, and nothing changed by anything unauthenticated."""

from __future__ import annotations

import json

import pytest
import requests
from sqlalchemy import func, select

from models import Enrollment, EnrollmentHistory, Payment, WebhookEvent
from pipeline.signing import sign
from tests.support import (
    TEST_APP_ID,
    TEST_SECRET,
    callback_body,
    make_enrollment,
    make_user,
    post_callback,
    signed,
    wait_for,
)

pytestmark = pytest.mark.integration

INJECTIONS = [
    "' OR 1=1 --",
    '"; DROP TABLE enrollments; --',
    "<script>alert(1)</script>",
    "../../etc/passwd",
    "${jndi:ldap://x}",
    "%00",
    "\u202e\u0000",
    "💳" * 50,
    "{{7*7}}",
    "\\\\\\'",
]


def unsigned_corpus(payment) -> list[tuple[bytes, dict]]:
    good = json.dumps(callback_body(payment)).encode()
    cases: list[tuple[bytes, dict]] = []
    bodies = [
        b"",
        b"{",
        b"}",
        b"null",
        b"[]",
        b"true",
        b"1",
        b'"x"',
        b"{'a':1}",
        good[:10],
        good[:-1],
        good + b"garbage",
        b"\xff\xfe\x00\x01",
        '{"paylinkID": "é"}'.encode("latin-1"),
        "\ufeff".encode() + good,
        good.decode().encode("utf-16"),
        b"\x00" * 64,
        b'{"paylinkID":' * 500,
        b"[" * 5000 + b"]" * 5000,
    ]
    for body in bodies:
        cases.append((body, {"Content-Type": "application/json"}))  # no signature at all
        cases.append((body, {"ik-appid": TEST_APP_ID, "ik-sign": "0" * 64}))
        cases.append(
            (
                body,
                {
                    "ik-appid": "someone-else",
                    "ik-sign": sign(TEST_SECRET, "/webhooks/ikhokha", body),
                },
            )
        )
        cases.append(
            (
                body,
                {
                    "ik-appid": TEST_APP_ID,
                    "ik-sign": sign("wrong-secret", "/webhooks/ikhokha", body),
                },
            )
        )
        for path in ("/webhooks/ikhokha/", "/webhooks/IKHOKHA"):
            wrong_path = {"ik-appid": TEST_APP_ID, "ik-sign": sign(TEST_SECRET, path, body)}
            cases.append((body, wrong_path))
    for value in INJECTIONS:
        body = json.dumps({"paylinkID": value, "status": "SUCCESS"}).encode()
        if value.isprintable():  # a control character never gets past the HTTP server
            cases.append((body, {"ik-appid": value.encode(), "ik-sign": value.encode()}))
        cases.append(
            (body, {"ik-appid": TEST_APP_ID, "ik-sign": sign(TEST_SECRET, "/other/path", body)})
        )
    return cases


def signed_corpus(payment) -> list[bytes]:
    """Signed by us, but unusable: each must get a clear 400."""
    bodies = [
        b"{",
        b"[]",
        b"null",
        b'{"status":"SUCCESS"}',
        b'{"paylinkID":"x"}',
        b'{"paylinkID":7.5,"status":"SUCCESS"}',
        b'{"paylinkID":["a"],"status":"SUCCESS"}',
        b'{"paylinkID":"x","status":null}',
        b'{"paylinkID":"x","status":{"a":1}}',
        b'{"paylinkID":"' + b"a" * 300 + b'","status":"SUCCESS"}',
        b'{"paylinkID":"x","status":"' + b"S" * 100 + b'"}',
        b'{"paylinkID":"x","status":"SUCCESS","responseCode":[1]}',
        b"\xff\xfe",
        b'{"paylinkID":"x","status":"SUCCESS"',
        b'{"paylinkID":true,"status":"SUCCESS"}',
    ]
    return bodies


def test_hostile_requests_get_clear_errors_and_change_nothing(web, worker, db):
    student, token = make_user(db)
    enrollment, payment = make_enrollment(db, user=student)
    db.commit()
    responses: list[requests.Response] = []

    for body, headers in unsigned_corpus(payment):
        responses.append(
            requests.post(f"{web}/webhooks/ikhokha", data=body, headers=headers, timeout=10)
        )
    unauthenticated = len(responses)
    assert all(r.status_code == 401 for r in responses), [
        r.status_code for r in responses if r.status_code != 401
    ]
    assert db.scalar(select(func.count()).select_from(WebhookEvent)) == 0

    for body in signed_corpus(payment):
        response = post_callback(web, body)
        assert response.status_code == 400, (body, response.status_code)
        responses.append(response)

    huge = b'{"paylinkID":"x","status":"SUCCESS","text":"' + b"a" * 70_000 + b'"}'
    for headers in ({}, signed(huge)[1]):
        response = requests.post(f"{web}/webhooks/ikhokha", data=huge, headers=headers, timeout=10)
        assert response.status_code == 413
        responses.append(response)

    auth = {"Authorization": f"Bearer {token}"}
    api = [
        ("POST", "/api/enrollments", {"data": b"{", "headers": auth}),
        (
            "POST",
            "/api/enrollments",
            {"json": {"course_id": "1 OR 1=1", "payment_method": "card"}, "headers": auth},
        ),
        (
            "POST",
            "/api/enrollments",
            {"json": {"course_id": 10**30, "payment_method": "card"}, "headers": auth},
        ),
        (
            "POST",
            "/api/enrollments",
            {"json": {"course_id": -1, "payment_method": "eft"}, "headers": auth},
        ),
        (
            "POST",
            "/api/enrollments",
            {"json": {"course_id": 999999, "payment_method": "eft"}, "headers": auth},
        ),
        (
            "POST",
            "/api/enrollments",
            {"json": {"course_id": 1, "payment_method": "<script>"}, "headers": auth},
        ),
        ("POST", "/api/enrollments", {"json": [], "headers": auth}),
        ("POST", "/api/enrollments", {"json": {"course_id": 1, "payment_method": "card"}}),
        ("GET", "/api/enrollments/abc", {"headers": auth}),
        ("GET", "/api/enrollments/99999999999999999999999", {"headers": auth}),
        ("GET", "/api/enrollments/1", {"headers": {"Authorization": "Bearer ' OR 1=1 --"}}),
        ("GET", "/api/enrollments/1", {"headers": {"Authorization": "Bearer \u202e".encode()}}),
        ("GET", "/api/enrollments/1", {"headers": {"Authorization": "Basic dXNlcjpwYXNz"}}),
        ("GET", "/api/courses/0/enrollment-state", {}),
        ("GET", "/api/notifications?after=-5", {"headers": auth}),
        ("GET", "/api/notifications?per_page=100000", {"headers": auth}),
        ("GET", "/api/admin/enrollments?status=' OR 1=1", {"headers": auth}),
        ("POST", "/api/admin/enrollments/bulk-approve", {"json": {"ids": ["x"]}, "headers": auth}),
        ("DELETE", "/webhooks/ikhokha", {}),
        ("GET", "/payments/..%2F..%2Fetc/success", {}),
        ("GET", "/payments/" + "a" * 3000 + "/success", {}),
        ("PUT", "/api/enrollments", {"headers": auth}),
    ]
    for value in INJECTIONS:
        quoted = requests.utils.quote(value, safe="")
        api.append(("GET", f"/api/courses/{quoted}/enrollment-state", {}))
        api.append(("GET", f"/api/enrollments/{quoted}", {"headers": auth}))
        api.append(
            (
                "POST",
                "/api/admin/enrollments/1/reject",
                {"json": {"reason": value}, "headers": auth},
            )
        )
        api.append(("GET", f"/payments/{quoted}/success", {}))
        api.append(("GET", f"/api/admin/jobs/{quoted}", {"headers": auth}))
        api.append(
            (
                "POST",
                "/api/enrollments",
                {"json": {"course_id": value, "payment_method": value}, "headers": auth},
            )
        )
    for method, path, kwargs in api:
        response = requests.request(method, web + path, timeout=10, **kwargs)
        assert 400 <= response.status_code < 500, (
            method,
            path,
            response.status_code,
            response.text[:200],
        )
        responses.append(response)

    assert len(responses) >= 200
    for response in responses:
        error = response.json()["error"]
        assert error["code"] and error["message"]
    # Nothing unauthenticated or malformed changed any state.
    db.expire_all()
    assert db.get(Enrollment, enrollment.id).state == "pending_payment"
    assert db.scalar(select(func.count()).select_from(EnrollmentHistory)) == 0
    assert db.scalar(select(func.count()).select_from(WebhookEvent)) == 0
    assert unauthenticated >= 80


def test_signed_but_wrong_callbacks_are_stored_and_sent_to_people(web, worker, db):
    """Replays, unknown paylinks and amount or currency mismatches: authenticated, so kept,
    and each ends where a person can see it, with a reason."""
    student, _ = make_user(db)
    enrollment, payment = make_enrollment(db, user=student)
    db.commit()
    mismatch, _ = signed(callback_body(payment, amount=1, currency="USD"))
    first = requests.post(
        f"{web}/webhooks/ikhokha", data=mismatch, headers=signed(mismatch)[1], timeout=10
    )
    replay = requests.post(
        f"{web}/webhooks/ikhokha", data=mismatch, headers=signed(mismatch)[1], timeout=10
    )
    assert first.status_code == 200 and replay.json() == {
        "event_id": first.json()["event_id"],
        "duplicate": True,
    }
    unknown, headers = signed({"paylinkID": "' OR 1=1 --", "status": "SUCCESS"})
    stray = requests.post(
        f"{web}/webhooks/ikhokha", data=unknown, headers=headers, timeout=10
    ).json()["event_id"]
    wait_for(lambda: (db.expire_all(), db.get(WebhookEvent, stray).state == "dead")[1])
    wait_for(
        lambda: (db.expire_all(), db.get(Enrollment, enrollment.id).state == "pending_approval")[1]
    )
    reason = db.get(Enrollment, enrollment.id).waiting_reason
    assert "amount 1 cents" in reason and "currency USD" in reason
    assert db.scalar(select(func.count()).select_from(Payment)) == 1
