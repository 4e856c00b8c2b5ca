"""A signed callback over HTTP to gunicorn, through a real Celery worker, into PostgreSQL."""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from sqlalchemy import func, select

from models import DeadLetter, EnrollmentHistory, Payment, WebhookEvent
from pipeline.payments import new_reference
from tests.support import (
    callback_body,
    make_course,
    make_enrollment,
    make_user,
    post_callback,
    wait_for,
)

pytestmark = pytest.mark.integration


def get_enrollment(web, token, enrollment_id):
    response = requests.get(
        f"{web}/api/enrollments/{enrollment_id}",
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    return response.json()


def event_state(db, event_id):
    db.expire_all()
    return db.get(WebhookEvent, event_id).state


def history_rows(db, enrollment_id):
    return db.scalars(
        select(EnrollmentHistory)
        .where(EnrollmentHistory.enrollment_id == enrollment_id)
        .order_by(EnrollmentHistory.id)
    ).all()


def student_with_enrollment(db, **kwargs):
    student, token = make_user(db)
    enrollment, payment = make_enrollment(db, user=student, **kwargs)
    db.commit()
    return token, enrollment, payment


def test_card_success_approves_and_grants_access(web, worker, db):
    token, enrollment, payment = student_with_enrollment(db)
    response = post_callback(web, callback_body(payment))
    assert response.status_code == 200
    event_id = response.json()["event_id"]
    wait_for(lambda: event_state(db, event_id) == "completed")
    body = get_enrollment(web, token, enrollment.id)
    assert body["state"] == "approved" and body["course_access"] is True
    assert [(h["from"], h["to"], h["source"]) for h in body["history"]] == [
        ("pending_payment", "approved", "webhook")
    ]


def test_eft_checkout_waits_for_approval(web, worker, db):
    course = make_course(db)
    _, token = make_user(db)
    db.commit()
    response = requests.post(
        f"{web}/api/enrollments",
        json={"course_id": course.id, "payment_method": "eft"},
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["state"] == "pending_approval" and body["course_access"] is False
    assert body["payment"]["reference"].startswith("SP-") and body["paylink_url"] is None
    assert "EFT" in body["waiting_reason"]
    card = requests.get(
        f"{web}/api/courses/{course.id}/enrollment-state",
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    ).json()
    assert card["button_text"] == "Pending Approval" and card["disabled"] is True
    assert body["payment"]["reference"] in card["message"]


def test_success_that_looks_like_eft_waits_for_an_admin(web, worker, db):
    token, enrollment, payment = student_with_enrollment(db)
    response = post_callback(web, callback_body(payment, paymentMethod="Instant EFT"))
    wait_for(lambda: event_state(db, response.json()["event_id"]) == "completed")
    body = get_enrollment(web, token, enrollment.id)
    assert body["state"] == "pending_approval" and body["course_access"] is False
    assert "uncertain" in body["waiting_reason"]


def test_five_concurrent_deliveries_make_one_transition(web, worker, db):
    _, enrollment, payment = student_with_enrollment(db)
    with ThreadPoolExecutor(5) as pool:
        responses = list(pool.map(lambda _: post_callback(web, callback_body(payment)), range(5)))
    assert [r.status_code for r in responses] == [200] * 5
    ids = {r.json()["event_id"] for r in responses}
    assert len(ids) == 1
    assert sorted(r.json()["duplicate"] for r in responses) == [False, True, True, True, True]
    (event_id,) = ids
    wait_for(lambda: event_state(db, event_id) == "completed")
    rows = history_rows(db, enrollment.id)
    assert [(r.from_state, r.to_state) for r in rows] == [("pending_payment", "approved")]


def test_failure_after_success_leaves_the_approval(web, worker, db):
    token, enrollment, payment = student_with_enrollment(db)
    first = post_callback(web, callback_body(payment)).json()["event_id"]
    wait_for(lambda: event_state(db, first) == "completed")
    late = post_callback(web, callback_body(payment, status="FAILURE")).json()["event_id"]
    wait_for(lambda: event_state(db, late) == "completed")
    assert get_enrollment(web, token, enrollment.id)["state"] == "approved"
    db.expire_all()
    assert db.get(WebhookEvent, late).outcome == "no change: enrollment is approved"
    assert len(history_rows(db, enrollment.id)) == 1


def test_failure_then_success_approves(web, worker, db):
    token, enrollment, payment = student_with_enrollment(db)
    failed = post_callback(web, callback_body(payment, status="FAILURE")).json()["event_id"]
    wait_for(lambda: event_state(db, failed) == "completed")
    assert get_enrollment(web, token, enrollment.id)["state"] == "payment_failed"
    paid = post_callback(web, callback_body(payment)).json()["event_id"]
    wait_for(lambda: event_state(db, paid) == "completed")
    assert get_enrollment(web, token, enrollment.id)["state"] == "approved"


def test_bad_signature_gets_401_and_changes_nothing(web, worker, db):
    token, enrollment, payment = student_with_enrollment(db)
    response = post_callback(web, callback_body(payment), secret="not-our-secret")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "bad_signature"
    assert db.scalar(select(func.count()).select_from(WebhookEvent)) == 0
    assert get_enrollment(web, token, enrollment.id)["state"] == "pending_payment"


def test_error_outlasting_retries_is_dead_lettered_and_replay_completes(web, worker, db):
    student, token = make_user(db)
    _, admin_token = make_user(db, role="admin")
    enrollment, _ = make_enrollment(db, user=student)
    db.commit()
    # A callback for a payment we do not know (yet): retried, then dead-lettered.
    missing_id = str(uuid.uuid4())
    event_id = post_callback(
        web, {"paylinkID": "PL-late", "status": "SUCCESS", "externalTransactionID": missing_id}
    ).json()["event_id"]
    wait_for(lambda: event_state(db, event_id) == "dead")
    admin = {"Authorization": f"Bearer {admin_token}"}
    letters = requests.get(f"{web}/api/admin/dead-letters", headers=admin, timeout=10).json()[
        "items"
    ]
    assert len(letters) == 1
    letter = letters[0]
    assert (letter["stage"], letter["error_code"], letter["attempts"]) == (
        "payment_type_detection",
        "unknown_payment",
        4,
    )
    assert letter["event"]["paylink_id"] == "PL-late"
    # The payment turns out to be ours after all: record it and replay.
    db.add(
        Payment(
            id=missing_id,
            enrollment_id=enrollment.id,
            method="card",
            amount_cents=enrollment.course.price_cents,
            reference=new_reference(),
            paylink_id="PL-late",
        )
    )
    db.commit()
    replay = requests.post(
        f"{web}/api/admin/dead-letters/{letter['id']}/replay", headers=admin, json={}, timeout=10
    )
    assert replay.status_code == 202, replay.text
    wait_for(lambda: event_state(db, event_id) == "completed")
    assert get_enrollment(web, token, enrollment.id)["state"] == "approved"
    db.expire_all()
    assert db.scalar(select(DeadLetter)).replay_count == 1
    again = requests.post(
        f"{web}/api/admin/dead-letters/{letter['id']}/replay", headers=admin, json={}, timeout=10
    )
    assert again.status_code == 409


def test_change_is_pushed_live_to_the_student_and_admins(web, worker, db, redis_client):
    token, enrollment, payment = student_with_enrollment(db)
    pubsub = redis_client.pubsub()
    pubsub.subscribe(f"skillpay:user:{enrollment.user_id}", "skillpay:admins")
    wait_for(lambda: pubsub.get_message(timeout=0.1) is not None)  # subscription confirmations
    wait_for(lambda: pubsub.get_message(timeout=0.1) is not None)
    post_callback(web, callback_body(payment))
    messages = []

    def received_both():
        message = pubsub.get_message(timeout=0.2)
        if message and message["type"] == "message":
            messages.append((message["channel"].decode(), json.loads(message["data"])))
        return len(messages) == 2

    wait_for(received_both)
    pubsub.close()
    channels = sorted(c for c, _ in messages)
    assert channels == ["skillpay:admins", f"skillpay:user:{enrollment.user_id}"]
    assert all(m["to"] == "approved" and m["course_access"] for _, m in messages)
    # And a client that missed it catches up from the table.
    caught_up = requests.get(
        f"{web}/api/notifications?after=0", headers={"Authorization": f"Bearer {token}"}, timeout=10
    ).json()
    assert [n["kind"] for n in caught_up["items"]] == ["enrollment.approved"]


def test_readiness_checks_the_database_the_broker_and_redis(web):
    response = requests.get(f"{web}/readyz", timeout=10)
    assert response.status_code == 200
    assert response.json() == {
        "status": "ready",
        "checks": {"database": "ok", "broker": "ok", "redis": "ok"},
    }


def test_the_queue_reports_its_depth_on_the_real_broker(process_env, worker):
    from config import Settings
    from workers.celery_app import make_celery

    queue = make_celery(Settings.from_env(process_env)).queue
    assert isinstance(queue.depth(), int)
