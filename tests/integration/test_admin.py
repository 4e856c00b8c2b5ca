"""Admin approvals over HTTP with a real worker: permissions, decisions, races, bulk jobs."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from sqlalchemy import func, select

from models import EnrollmentHistory, State, WebhookEvent
from tests.support import (
    callback_body,
    make_course,
    make_enrollment,
    make_user,
    post_callback,
    wait_for,
)

pytestmark = pytest.mark.integration

ADMIN_ENDPOINTS = [
    ("GET", "/api/admin/enrollments?status=pending_approval"),
    ("POST", "/api/admin/enrollments/1/approve"),
    ("POST", "/api/admin/enrollments/1/reject"),
    ("POST", "/api/admin/enrollments/bulk-approve"),
    ("GET", "/api/admin/jobs/00000000-0000-0000-0000-000000000000"),
    ("GET", "/api/admin/audit"),
    ("GET", "/api/admin/dead-letters"),
    ("POST", "/api/admin/dead-letters/1/replay"),
]


@pytest.fixture
def people(db):
    admin, admin_token = make_user(db, role="admin")
    student, student_token = make_user(db)
    db.commit()
    return (
        admin,
        {"Authorization": f"Bearer {admin_token}"},
        student,
        {"Authorization": f"Bearer {student_token}"},
    )


@pytest.mark.parametrize(("method", "path"), ADMIN_ENDPOINTS)
def test_admin_endpoints_refuse_everyone_else(web, people, method, path):
    _, _, _, student_auth = people
    anonymous = requests.request(method, web + path, json={"ids": [1], "reason": "x"}, timeout=10)
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "unauthenticated"
    as_student = requests.request(
        method, web + path, json={"ids": [1], "reason": "x"}, headers=student_auth, timeout=10
    )
    assert as_student.status_code == 403 and as_student.json()["error"]["code"] == "forbidden"
    revoked = requests.request(
        method, web + path, headers={"Authorization": "Bearer sp_revoked"}, timeout=10
    )
    assert revoked.status_code == 401


def waiting(db, student, n=1, **kwargs):
    course = make_course(db)
    rows = [
        make_enrollment(
            db, method="eft", state=State.PENDING_APPROVAL, user=student, course=course, **kwargs
        )[0]
        if i == 0
        else make_enrollment(db, method="eft", state=State.PENDING_APPROVAL, **kwargs)[0]
        for i in range(n)
    ]
    for row in rows:
        row.waiting_reason = "EFT payment: confirm the money is in the bank account"
    db.commit()
    return rows


def test_queue_is_filtered_paginated_and_oldest_first(web, people, db):
    _, admin_auth, student, _ = people
    rows = waiting(db, student, n=3)
    make_enrollment(db, state=State.PENDING_PAYMENT)
    db.commit()
    page = requests.get(
        f"{web}/api/admin/enrollments?status=pending_approval&per_page=2",
        headers=admin_auth,
        timeout=10,
    ).json()
    assert page["total"] == 3 and [e["id"] for e in page["items"]] == [rows[0].id, rows[1].id]
    assert page["items"][0]["waiting_reason"].startswith("EFT payment")
    assert page["items"][0]["student_email"] == student.email
    second = requests.get(
        f"{web}/api/admin/enrollments?status=pending_approval&per_page=2&page=2",
        headers=admin_auth,
        timeout=10,
    ).json()
    assert [e["id"] for e in second["items"]] == [rows[2].id]
    by_course = requests.get(
        f"{web}/api/admin/enrollments?course_id={rows[0].course_id}&payment_method=eft",
        headers=admin_auth,
        timeout=10,
    ).json()
    assert [e["id"] for e in by_course["items"]] == [rows[0].id]
    bad = requests.get(
        f"{web}/api/admin/enrollments?status=nonsense", headers=admin_auth, timeout=10
    )
    assert bad.status_code == 400


def test_approve_and_reject_with_a_reason_the_student_sees(web, worker, people, db):
    admin, admin_auth, student, student_auth = people
    approve_me, reject_me = waiting(db, student, n=1)[0], waiting(db, student, n=1)[0]
    approved = requests.post(
        f"{web}/api/admin/enrollments/{approve_me.id}/approve", headers=admin_auth, timeout=10
    )
    assert (
        approved.status_code == 200
        and approved.json()["state"] == "approved"
        and approved.json()["changed"]
    )
    again = requests.post(
        f"{web}/api/admin/enrollments/{approve_me.id}/approve", headers=admin_auth, timeout=10
    )
    assert again.status_code == 200 and again.json()["changed"] is False
    assert again.json()["message"] == "already approved; nothing changed"
    no_reason = requests.post(
        f"{web}/api/admin/enrollments/{reject_me.id}/reject",
        json={},
        headers=admin_auth,
        timeout=10,
    )
    assert no_reason.status_code == 400
    rejected = requests.post(
        f"{web}/api/admin/enrollments/{reject_me.id}/reject",
        json={"reason": "No payment with reference received"},
        headers=admin_auth,
        timeout=10,
    )
    assert rejected.json()["state"] == "rejected"
    conflict = requests.post(
        f"{web}/api/admin/enrollments/{reject_me.id}/approve", headers=admin_auth, timeout=10
    )
    assert conflict.status_code == 409 and "rejected" in conflict.json()["error"]["message"]
    # The student sees the outcome, with the reason, and was notified.
    mine = requests.get(
        f"{web}/api/enrollments/{reject_me.id}", headers=student_auth, timeout=10
    ).json()
    assert mine["rejection_reason"] == "No payment with reference received"
    card = requests.get(
        f"{web}/api/courses/{reject_me.course_id}/enrollment-state",
        headers=student_auth,
        timeout=10,
    ).json()
    assert "No payment with reference received" in card["message"]
    kinds = [
        n["kind"]
        for n in requests.get(f"{web}/api/notifications", headers=student_auth, timeout=10).json()[
            "items"
        ]
    ]
    assert kinds == ["enrollment.approved", "enrollment.rejected"]
    # Every admin action is in the audit, per enrollment and per admin.
    audit = requests.get(
        f"{web}/api/admin/audit?admin_id={admin.id}", headers=admin_auth, timeout=10
    ).json()["items"]
    assert [(a["enrollment_id"], a["from"], a["to"]) for a in audit] == [
        (reject_me.id, "pending_approval", "rejected"),
        (approve_me.id, "pending_approval", "approved"),
    ]
    assert (
        audit[0]["reason"] == "No payment with reference received"
        and audit[0]["actor"] == f"admin:{admin.id}"
    )


def test_admin_approval_racing_the_webhook_ends_consistent(web, worker, people, db):
    _, admin_auth, _, _ = people
    # Card payments held for an admin (say the callback hinted at EFT); now both the admin
    # and a clear card SUCCESS approve at the same moment.
    pairs = []
    for _ in range(8):
        enrollment, payment = make_enrollment(db, state=State.PENDING_APPROVAL)
        pairs.append((enrollment, payment))
    db.commit()

    def admin(enrollment):
        return requests.post(
            f"{web}/api/admin/enrollments/{enrollment.id}/approve", headers=admin_auth, timeout=10
        )

    def webhook(payment):
        return post_callback(web, callback_body(payment))

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(admin, e) for e, _ in pairs] + [
            pool.submit(webhook, p) for _, p in pairs
        ]
        results = [f.result() for f in futures]
    assert all(r.status_code == 200 for r in results)
    wait_for(
        lambda: (
            db.scalar(
                select(func.count())
                .select_from(WebhookEvent)
                .where(WebhookEvent.state == "completed")
            )
            == len(pairs)
        )
    )
    for enrollment, _ in pairs:
        db.refresh(enrollment)
        assert enrollment.state == "approved"
        history = db.scalars(
            select(EnrollmentHistory).where(EnrollmentHistory.enrollment_id == enrollment.id)
        ).all()
        assert [(h.from_state, h.to_state) for h in history] == [("pending_approval", "approved")]


def test_bulk_approval_is_idempotent(web, worker, people, db):
    _, admin_auth, student, _ = people
    ids = [e.id for e in waiting(db, student, n=5)]
    done_already = ids[0]
    requests.post(
        f"{web}/api/admin/enrollments/{done_already}/approve", headers=admin_auth, timeout=10
    )
    headers = admin_auth | {"Idempotency-Key": "clear-queue-1"}
    first = requests.post(
        f"{web}/api/admin/enrollments/bulk-approve",
        json={"ids": [*ids, 999999]},
        headers=headers,
        timeout=10,
    )
    assert first.status_code == 202
    twice = requests.post(
        f"{web}/api/admin/enrollments/bulk-approve", json={"ids": ids}, headers=headers, timeout=10
    )
    assert twice.json()["job_id"] == first.json()["job_id"] and twice.json()["created"] is False
    url = f"{web}{first.json()['status_url']}"
    job = wait_for(
        lambda: (
            (j := requests.get(url, headers=admin_auth, timeout=10).json())["state"] == "done" and j
        )
    )
    assert job["counts"] == {"pending": 0, "approved": 4, "skipped": 2, "failed": 0}
    details = {i["enrollment_id"]: (i["outcome"], i["detail"]) for i in job["items"]}
    assert details[done_already] == ("skipped", "already approved")
    assert details[999999] == ("skipped", "enrollment does not exist")
    # A second job without the key approves nobody twice.
    other = requests.post(
        f"{web}/api/admin/enrollments/bulk-approve",
        json={"ids": ids},
        headers=admin_auth,
        timeout=10,
    ).json()
    url = f"{web}{other['status_url']}"
    job = wait_for(
        lambda: (
            (j := requests.get(url, headers=admin_auth, timeout=10).json())["state"] == "done" and j
        )
    )
    assert job["counts"]["approved"] == 0 and job["counts"]["skipped"] == 5
    history = db.scalar(
        select(func.count())
        .select_from(EnrollmentHistory)
        .where(EnrollmentHistory.enrollment_id.in_(ids), EnrollmentHistory.to_state == "approved")
    )
    assert history == 5
