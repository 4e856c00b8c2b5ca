"""Refunds, reconciliation both ways and bank statements, over real HTTP with a real worker,
the iKhokha simulator, PostgreSQL and each broker."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from sqlalchemy import func, select, update

from models import (
    DeadLetter,
    Enrollment,
    EnrollmentHistory,
    Payment,
    Refund,
    State,
    WebhookEvent,
)
from tests.integration.conftest import start_web
from tests.support import enroll, make_course, make_user, settle_link, wait_for
from tests.support import enrollment_state as enrollment

pytestmark = pytest.mark.integration


@pytest.fixture
def people(db):
    course = make_course(db, price_cents=149900)
    admins = [make_user(db, role="admin") for _ in range(2)]
    student = make_user(db)
    db.commit()
    return (
        course,
        [{"Authorization": f"Bearer {token}"} for _, token in admins],
        {"Authorization": f"Bearer {student[1]}"},
    )


def paid_card(web, simulator, auth, course_id):
    """A card enrollment approved through the pipeline by its SUCCESS callback."""
    started = enroll(web, auth, course_id)
    settle_link(simulator, started["paylink_url"])
    wait_for(lambda: enrollment(web, auth, started["id"])["state"] == "approved")
    return started


def refund(web, admin, enrollment_id, key=None, **body):
    headers = dict(admin, **({"Idempotency-Key": key} if key else {}))
    return requests.post(
        f"{web}/api/admin/enrollments/{enrollment_id}/refund",
        json={"reason": "asked for their money back", **body},
        headers=headers,
        timeout=30,
    )


def test_a_refund_ends_access_once_whoever_asks_and_however_often(
    web, simulator, worker, db, people
):
    course, (admin, other_admin), student = people
    started = paid_card(web, simulator, student, course.id)
    part = refund(web, admin, started["id"], key="part-1", amount_cents=50000)
    assert part.status_code == 201, part.text
    assert part.json()["enrollment"]["course_access"] is True
    assert (
        refund(web, admin, started["id"], key="part-1", amount_cents=50000).json()["changed"]
        is False
    )
    with ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(lambda i: refund(web, (admin, other_admin)[i % 2], started["id"]), range(8))
        )
    # One refund is made; every other request, racing or late, answers with it, unchanged.
    assert sorted(a.status_code for a in answers) == [200] * 7 + [201]
    assert {a.json()["refund"]["id"] for a in answers} == {answers[0].json()["refund"]["id"]}
    winner = next(a.json() for a in answers if a.status_code == 201)
    assert winner["refund"]["amount_cents"] == 149900 - 50000 and winner["refund"]["full"]
    seen = enrollment(web, student, started["id"])
    assert seen["state"] == "refunded" and seen["course_access"] is False
    assert [h["to"] for h in seen["history"]][-2:] == ["approved", "refunded"]
    assert db.scalar(select(func.sum(Refund.amount_cents))) == 149900
    feed = requests.get(f"{web}/api/notifications", headers=student, timeout=10).json()
    kinds = [n["kind"] for n in feed["items"]]
    assert "enrollment.partially_refunded" in kinds and "enrollment.refunded" in kinds


def test_a_refund_racing_a_late_payment_of_an_earlier_link(web, simulator, worker, db, people):
    """The student's first link was declined, the retry paid and was approved; then the
    first link is paid after all while an admin refunds. Refunded stays refunded, and the
    second payment is never lost: flagged as paid twice, or dead-lettered for a person."""
    course, (admin, _), student = people
    first = enroll(web, student, course.id)
    settle_link(simulator, first["paylink_url"], status="FAILURE")
    wait_for(lambda: enrollment(web, student, first["id"])["state"] == "payment_failed")
    retry = enroll(web, student, course.id)
    settle_link(simulator, retry["paylink_url"])
    wait_for(lambda: enrollment(web, student, first["id"])["state"] == "approved")
    first_link = first["paylink_url"].rsplit("/", 1)[1]

    def late_success():
        return requests.post(
            f"{simulator}/_sim/links/{first_link}/deliver", json={"status": "SUCCESS"}, timeout=10
        )

    with ThreadPoolExecutor(2) as pool:
        refunded = pool.submit(refund, web, admin, first["id"])
        pool.submit(late_success).result()
        assert refunded.result().status_code == 201

    def settled_event():
        event = db.scalar(
            select(WebhookEvent).where(
                WebhookEvent.paylink_id == first_link, WebhookEvent.callback_status == "SUCCESS"
            )
        )
        db.expire_all()
        return event if event is not None and event.state in ("completed", "dead") else None

    event = wait_for(settled_event)
    final = enrollment(web, student, first["id"])
    assert final["state"] == "refunded" and final["history"][-1]["to"] == "refunded"
    assert [h["to"] for h in final["history"]].count("approved") == 1
    if event.state == "dead":  # the refund came first: money for a refunded enrollment
        letter = db.scalar(select(DeadLetter).where(DeadLetter.event_id == event.id))
        assert letter.error_code == "closed_enrollment"
    else:  # the payment came first: access stayed, an admin was told it was paid twice
        flags = requests.get(f"{web}/api/admin/attention", headers=admin, timeout=10).json()
        assert [f["kind"] for f in flags["items"]] == ["paid_twice"]


def test_refunds_through_the_gateway_api(
    process_env, simulator, worker, db, people, tmp_path_factory
):
    """SKILLPAY_REFUND_MODE=api: the simulator makes the refund, once per refund id."""
    server, web = start_web(
        dict(process_env, SKILLPAY_REFUND_MODE="api"), tmp_path_factory.mktemp("web-api")
    )
    try:
        course, (admin, _), student = people
        started = paid_card(web, simulator, student, course.id)
        link_id = started["paylink_url"].rsplit("/", 1)[1]
        first = refund(web, admin, started["id"], key="k", amount_cents=1000)
        assert first.status_code == 201, first.text
        body = first.json()["refund"]
        assert (body["mode"], body["state"]) == ("api", "done") and body["gateway_reference"]
        assert refund(web, admin, started["id"], key="k", amount_cents=1000).status_code == 200
        link = requests.get(f"{simulator}/_sim/links/{link_id}", timeout=10).json()
        assert link["refundedAmount"] == 1000
        rest = refund(web, admin, started["id"])
        assert rest.status_code == 201 and rest.json()["enrollment"]["state"] == "refunded"
        link = requests.get(f"{simulator}/_sim/links/{link_id}", timeout=10).json()
        assert link["refundedAmount"] == 149900
    finally:
        server.stop()


def test_reconciliation_finds_both_directions_and_never_revokes(
    web, simulator, worker, db, people, process_env
):
    course, (admin, _), student = people
    lost = enroll(web, student, course.id)  # paid, its callback never came
    settle_link(simulator, lost["paylink_url"], times=0)
    other_course = make_course(db, price_cents=5000)
    late_course = make_course(db, price_cents=7000)
    db.commit()
    forged = enroll(web, student, other_course.id)  # approved, but never paid at iKhokha
    db.execute(
        update(Enrollment)
        .where(Enrollment.id == forged["id"])
        .values(state=State.APPROVED, approved_at=func.now())
    )
    db.execute(
        update(Payment)
        .where(Payment.enrollment_id == forged["id"])
        .values(gateway_status="SUCCESS")
    )
    late = enroll(web, student, late_course.id)  # expired unpaid, then paid; callback lost
    db.execute(update(Enrollment).where(Enrollment.id == late["id"]).values(state=State.EXPIRED))
    db.commit()
    settle_link(simulator, late["paylink_url"], times=0)

    skillpay = str(Path(sys.executable).parent / "skillpay")
    result = subprocess.run(
        [skillpay, "reconcile", "--older-than-minutes", "0"],
        env=dict(process_env, PUBLIC_BASE_URL=web),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    report = result.stdout
    assert "paid but not enrolled (fed to the pipeline: fixed): 2" in report
    assert "enrolled but not paid (flagged for an admin): 1" in report
    assert "amount mismatches (flagged for an admin): 0" in report
    wait_for(lambda: enrollment(web, student, lost["id"])["state"] == "approved")
    wait_for(lambda: enrollment(web, student, late["id"])["state"] == "pending_approval")
    assert (
        "paid after the enrollment expired"
        in enrollment(web, student, late["id"])["waiting_reason"]
    )
    assert enrollment(web, student, forged["id"])["state"] == "approved"  # never revoked
    flags = requests.get(f"{web}/api/admin/attention", headers=admin, timeout=10).json()["items"]
    assert [(f["enrollment_id"], f["kind"]) for f in flags] == [(forged["id"], "enrolled_not_paid")]
    assert "PENDING, not SUCCESS" in flags[0]["reason"]
    runs = requests.get(f"{web}/api/admin/reconciliation", headers=admin, timeout=10).json()
    latest = runs["items"][0]
    assert latest["trigger"] == "cli" and latest["counts"]["paid_not_enrolled"] == 2
    assert sorted(latest["paid_not_enrolled"]) == sorted([lost["id"], late["id"]])
    assert latest["enrolled_not_paid"] == [forged["id"]] and latest["errors"] == []
    # (Links paid in earlier tests, whose rows are gone, are reported as not ours.)
    assert {"paid_not_enrolled", "enrolled_not_paid"} <= {f["kind"] for f in latest["findings"]}
    cleared = requests.post(
        f"{web}/api/admin/flags/{flags[0]['id']}/clear",
        json={"note": "manual grant by the dean"},
        headers=admin,
        timeout=10,
    )
    assert cleared.status_code == 200 and cleared.json()["cleared_at"]
    assert requests.get(f"{web}/api/admin/attention", headers=admin, timeout=10).json() == {
        "items": []
    }


def statement_csv(*rows):
    lines = ["Date,Description,Amount", *(",".join(row) for row in rows)]
    return ("\n".join(lines) + "\n").encode()


def test_a_statement_imported_twice_and_confirmed_by_two_admins_at_once(web, worker, db, people):
    course, (admin, other_admin), student = people
    students = [make_user(db)[1] for _ in range(3)]
    db.commit()
    transfers = [
        enroll(web, {"Authorization": f"Bearer {token}"}, course.id, "eft") for token in students
    ]
    refs = [t["payment"]["reference"] for t in transfers]
    data = statement_csv(
        ("2026/11/20", f"ABSA CR {refs[0].lower()}", "1499.00"),
        ("2026/11/20", f"FNB {refs[1].replace('-', ' ')}", '"R 1,499.00"'),
        ("2026/11/21", f"CAPITEC {refs[2]}", "1000.00"),
        ("2026/11/21", "BANK FEE", "-12.50"),
    )
    upload = {"file": ("nov.csv", data, "text/csv")}
    first = requests.post(f"{web}/api/admin/statements", files=upload, headers=admin, timeout=30)
    assert first.status_code == 201, first.text
    lines = first.json()["lines"]
    assert [ln["match"] for ln in lines] == ["exact", "exact", "amount_differs", "ignored"]
    assert "R 1,000.00 paid, R 1,499.00 due" in lines[2]["reason"]
    again = requests.post(
        f"{web}/api/admin/statements", files=upload, headers=other_admin, timeout=30
    )
    assert again.status_code == 200 and again.json()["created"] is False
    assert again.json()["id"] == first.json()["id"] and len(again.json()["lines"]) == 4

    statement_id = first.json()["id"]
    confirm = f"{web}/api/admin/statements/{statement_id}/approve-exact"
    with ThreadPoolExecutor(2) as pool:
        answers = list(
            pool.map(lambda a: requests.post(confirm, headers=a, timeout=30), (admin, other_admin))
        )
    assert sorted(a.status_code for a in answers) == [200, 202]
    job = next(a.json() for a in answers if a.status_code == 202)
    assert job["confirmed"] == 2
    wait_for(
        lambda: (
            requests.get(f"{web}{job['status_url']}", headers=admin, timeout=10).json()["state"]
            == "done"
        )
    )
    states = [
        enrollment(web, {"Authorization": f"Bearer {token}"}, t["id"])["state"]
        for token, t in zip(students, transfers, strict=True)
    ]
    assert states == ["approved", "approved", "pending_approval"]
    approvals = db.scalar(
        select(func.count()).where(
            EnrollmentHistory.to_state == "approved",
            EnrollmentHistory.enrollment_id.in_([t["id"] for t in transfers]),
        )
    )
    assert approvals == 2
    bad = requests.post(
        f"{web}/api/admin/statements?filename=bad.csv",
        data=statement_csv(("2026/11/20", "x", "1.00"), ("2026/13/45", "y", "2.00")),
        headers=admin,
        timeout=30,
    )
    assert (
        bad.status_code == 400 and "line 3: cannot read the date" in bad.json()["error"]["message"]
    )
    student_view = requests.post(
        f"{web}/api/admin/statements", data=b"x", headers=student, timeout=10
    )
    assert student_view.status_code == 403
