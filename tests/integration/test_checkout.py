"""The student's side over real HTTP: the web app, the iKhokha simulator and a real worker."""

from __future__ import annotations

import pytest
import requests
from sqlalchemy import select

from models import EnrollmentHistory, Payment, WebhookEvent
from tests.support import enroll, make_course, make_user, settle_link, wait_for
from tests.support import enrollment_state as state

pytestmark = pytest.mark.integration


@pytest.fixture
def student(db):
    course = make_course(db, price_cents=249900)
    _, token = make_user(db)
    db.commit()
    return course, {"Authorization": f"Bearer {token}"}


def paid_without_callback(simulator, enrollment) -> str:
    """The link is paid at the simulator, whose callback never comes. Returns the link id."""
    return settle_link(simulator, enrollment["paylink_url"], times=0)


def card(web, auth, course_id):
    return requests.get(
        f"{web}/api/courses/{course_id}/enrollment-state", headers=auth, timeout=10
    ).json()


def test_card_purchase_end_to_end(web, simulator, worker, db, student):
    course, auth = student
    assert card(web, auth, course.id)["button_text"] == "Enroll Now"
    assert (
        requests.get(f"{web}/api/courses/{course.id}/enrollment-state", timeout=10).json()[
            "button_text"
        ]
        == "Register To Enroll"
    )
    enrollment = enroll(web, auth, course.id)
    assert enrollment["state"] == "pending_payment"
    assert enrollment["paylink_url"].startswith(simulator + "/pay/")
    assert card(web, auth, course.id)["button_text"] == "Complete Payment"
    # The student pays on the hosted page: the simulator sends iKhokha's signed callback.
    page = requests.get(enrollment["paylink_url"], timeout=10)
    assert "Card succeeds" in page.text
    paid = requests.post(
        enrollment["paylink_url"], data={"choice": "succeed"}, allow_redirects=False, timeout=10
    )
    assert paid.status_code == 303
    assert paid.headers["Location"] == f"{web}/payments/{enrollment['payment']['id']}/success"
    wait_for(lambda: state(web, auth, enrollment["id"])["state"] == "approved")
    assert state(web, auth, enrollment["id"])["course_access"] is True
    assert card(web, auth, course.id) | {"enrollment_id": None} == {
        "course_id": course.id,
        "state": "approved",
        "button_text": "Continue Course",
        "action": "continue_course",
        "disabled": False,
        "course_access": True,
        "enrollment_id": None,
    }
    landing = requests.get(paid.headers["Location"], timeout=10)
    assert landing.status_code == 200 and "approved" in landing.text


def test_redirect_before_the_callback_is_harmless(web, simulator, worker, db, student):
    course, auth = student
    enrollment = enroll(web, auth, course.id)
    # Paid at iKhokha, but the callback is late: the student is back first.
    link_id = paid_without_callback(simulator, enrollment)
    page = requests.get(f"{web}/payments/{enrollment['payment']['id']}/success", timeout=10)
    assert page.status_code == 200
    wait_for(lambda: state(web, auth, enrollment["id"])["state"] == "approved")
    # Now the callback arrives: the same outcome, so the same event; nothing changes twice.
    deliveries = requests.post(
        f"{simulator}/_sim/links/{link_id}/deliver", json={"status": "SUCCESS"}, timeout=10
    ).json()["deliveries"]
    assert deliveries == [{"status": "SUCCESS", "http_status": 200}]
    history = db.scalars(
        select(EnrollmentHistory.to_state)
        .where(EnrollmentHistory.enrollment_id == enrollment["id"])
        .order_by(EnrollmentHistory.id)
    ).all()
    assert history == ["pending_payment", "approved"]


def test_declined_card_then_retry_payment(web, simulator, worker, db, student):
    course, auth = student
    first = enroll(web, auth, course.id)
    requests.post(
        first["paylink_url"], data={"choice": "decline"}, allow_redirects=False, timeout=10
    )
    wait_for(lambda: state(web, auth, first["id"])["state"] == "payment_failed")
    assert card(web, auth, course.id)["button_text"] == "Retry Payment"
    retry = enroll(web, auth, course.id)
    assert retry["id"] == first["id"] and retry["state"] == "pending_payment"
    assert retry["paylink_url"] != first["paylink_url"]
    requests.post(
        retry["paylink_url"], data={"choice": "succeed"}, allow_redirects=False, timeout=10
    )
    wait_for(lambda: state(web, auth, first["id"])["state"] == "approved")
    assert retry["created"] is False and retry["new_payment"] is True
    # A FAILURE for the paid link, delivered after its SUCCESS (out of order), is processed
    # to the end and leaves the approval alone.
    second_link = retry["paylink_url"].rsplit("/", 1)[1]
    delivered = requests.post(
        f"{simulator}/_sim/links/{second_link}/deliver", json={"status": "FAILURE"}, timeout=10
    ).json()["deliveries"]
    assert delivered[-1] == {"status": "FAILURE", "http_status": 200}

    def late_failure() -> WebhookEvent | None:
        db.expire_all()
        return db.scalar(
            select(WebhookEvent).where(
                WebhookEvent.paylink_id == second_link,
                WebhookEvent.callback_status == "FAILURE",
                WebhookEvent.state == "completed",
            )
        )

    event = wait_for(late_failure)
    assert event.outcome == "no change: enrollment is approved"
    assert state(web, auth, first["id"])["state"] == "approved"
    assert len(db.scalars(select(Payment).where(Payment.enrollment_id == first["id"])).all()) == 2


def test_enrolling_twice_returns_the_open_enrollment(web, simulator, db, student):
    course, auth = student
    first = enroll(web, auth, course.id)
    again = requests.post(
        f"{web}/api/enrollments",
        json={"course_id": course.id, "payment_method": "card"},
        headers=auth,
        timeout=10,
    )
    assert again.status_code == 200
    assert again.json()["id"] == first["id"] and again.json()["paylink_url"] == first["paylink_url"]


def test_cancel_returns_to_a_page_that_grants_nothing(web, simulator, db, student):
    course, auth = student
    enrollment = enroll(web, auth, course.id)
    cancelled = requests.post(
        enrollment["paylink_url"], data={"choice": "cancel"}, allow_redirects=True, timeout=10
    )
    assert cancelled.status_code == 200 and "Payment cancelled" in cancelled.text
    assert state(web, auth, enrollment["id"])["state"] == "pending_payment"


def test_reconcile_settles_a_payment_whose_callback_never_came(
    web, simulator, worker, db, student, process_env
):
    import subprocess
    import sys
    from pathlib import Path

    course, auth = student
    enrollment = enroll(web, auth, course.id)
    paid_without_callback(simulator, enrollment)
    skillpay = str(Path(sys.executable).parent / "skillpay")
    env = dict(process_env, PUBLIC_BASE_URL=web)
    result = subprocess.run(
        [skillpay, "reconcile", "--older-than-minutes", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "paid but not enrolled (fed to the pipeline: fixed): 1" in result.stdout
    wait_for(lambda: state(web, auth, enrollment["id"])["state"] == "approved")

    def run_again() -> str:
        return subprocess.run(
            [skillpay, "reconcile", "--older-than-minutes", "0"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout

    # Approved: iKhokha is asked once more, to confirm the approval; then nothing is left.
    assert "checked 1 payment(s)" in run_again()
    assert "checked 0 payment(s)" in run_again()
