"""The student's and the admin's pages in a real browser: Debian's Chromium, driven by
Playwright (no browser download), against the running app, worker and simulator."""

from __future__ import annotations

import re
import shutil
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import requests
from playwright.sync_api import expect
from sqlalchemy import func, select

from models import DeadLetter, Payment, State, utcnow
from pipeline.checkout import EFT_WAITING_REASON
from tests.integration.conftest import start_web
from tests.support import (
    make_course,
    make_enrollment,
    make_user,
    post_callback,
    unavailable,
    wait_for,
)

pytestmark = pytest.mark.integration
ROOT_DOCS = Path(__file__).resolve().parents[2] / "docs"

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    # Our pages run no eval: Playwright's string waits would be blocked by the CSP, so the
    # tests wait with locators instead.
    path = next(
        (p for n in ("chromium", "chromium-browser") if (p := shutil.which(n))),
        None,
    )
    if path is None:
        unavailable("Chromium", FileNotFoundError("no chromium on PATH (make test installs it)"))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on(
        "console",
        lambda msg: errors.append(msg.text) if "Content Security Policy" in msg.text else None,
    )
    yield page
    context.close()
    assert errors == []  # no script error, and nothing the CSP had to block


def buttons(page, title: str) -> list[tuple[str, bool]]:
    card = page.locator(".card", has=page.locator("h3", has_text=title))
    return [(b.inner_text(), b.is_disabled()) for b in card.locator("button").all()]


def test_course_cards_show_the_right_button_for_each_state(web, simulator, worker, db, page):
    paid, waiting, unpaid, untouched = (make_course(db) for _ in range(4))
    student, token = make_user(db)
    db.commit()
    auth = {"Authorization": f"Bearer {token}"}

    def enroll(course, method):
        return requests.post(
            f"{web}/api/enrollments",
            json={"course_id": course.id, "payment_method": method},
            headers=auth,
            timeout=10,
        ).json()

    bought = enroll(paid, "card")
    requests.post(
        bought["paylink_url"], data={"choice": "succeed"}, allow_redirects=False, timeout=10
    )
    wait_for(
        lambda: (
            requests.get(f"{web}/api/enrollments/{bought['id']}", headers=auth, timeout=10).json()[
                "state"
            ]
            == "approved"
        )
    )
    enroll(waiting, "eft")
    enroll(unpaid, "card")

    page.goto(f"{web}/")
    page.wait_for_selector(f"h3:text('{paid.title}')")
    assert buttons(page, paid.title) == [("Register To Enroll", False)]
    # A sign-in link says whose account it is and waits for a click; the token leaves the URL.
    page.goto(f"{web}/#token={token}")
    page.wait_for_selector("#link-signin:not([hidden])")
    assert student.email in page.inner_text("#link-signin-text")
    assert "#token" not in page.url
    page.click("#link-signin-accept")
    expect(page.locator("#who")).to_contain_text(f"Signed in as {student.email}")
    expect(page.get_by_role("button", name="Continue Course")).to_be_visible()
    assert buttons(page, paid.title) == [("Continue Course", False)]
    assert buttons(page, waiting.title) == [("Pending Approval", True)]
    assert buttons(page, unpaid.title) == [("Complete Payment", False)]
    assert buttons(page, untouched.title) == [
        ("Enroll Now (card)", False),
        ("Enroll with EFT", False),
    ]
    assert "bank transfer with reference SP-" in page.inner_text("body")


def test_a_link_for_another_account_asks_before_switching(web, db, page):
    me, mine = make_user(db)
    them, theirs = make_user(db)
    db.commit()
    page.goto(f"{web}/")
    page.fill("#token", mine)
    page.click("#save-token")
    expect(page.locator("#who")).to_contain_text(me.email)
    page.goto(f"{web}/#token={theirs}")
    page.wait_for_selector("#link-signin:not([hidden])")
    text = page.inner_text("#link-signin-text")
    assert them.email in text and me.email in text and "switch" in text
    page.click("#link-signin-ignore")
    page.reload()
    expect(page.locator("#who")).to_contain_text(me.email)


def test_bulk_approval_confirms_count_and_total_and_leaves_flagged_rows(web, worker, db, page):
    _, admin_token = make_user(db, role="admin")
    course = make_course(db, price_cents=10000)
    plain = [
        make_enrollment(db, method="eft", state=State.PENDING_APPROVAL, course=course)[0]
        for _ in range(2)
    ]
    for enrollment in plain:
        enrollment.waiting_reason = EFT_WAITING_REASON
    flagged, _ = make_enrollment(db, method="card", state=State.PENDING_APPROVAL, course=course)
    flagged.waiting_reason = "amount 1 cents, expected 10000"
    db.commit()
    page.goto(f"{web}/admin")
    page.fill("#token", admin_token)
    page.click("#save-token")
    page.wait_for_selector("tr.flagged")
    asked: list[str] = []

    def answer(dialog):
        asked.append(dialog.message)
        dialog.accept()

    page.on("dialog", answer)
    page.click("#approve-all")
    wait_for(lambda: "done" in page.inner_text("#job"), timeout=30)
    assert asked == ["Approve 2 enrollment(s), R 200.00 in total? Check the bank statement first."]
    db.expire_all()
    assert [e.state for e in plain] == ["approved", "approved"]
    assert db.get(type(flagged), flagged.id).state == "pending_approval"


def test_the_whole_story_updates_both_pages_live(
    web, simulator, worker, stream, db, browser, tmp_path
):
    """A student pays by card on the simulator's page and comes back to "Continue Course"; an
    admin sees an EFT enrollment arrive in the queue and leave it on approval. Neither page
    is reloaded: both are live on the stream."""
    import os
    import re
    import shutil as sh

    course, eft_course = make_course(db), make_course(db, price_cents=49900)
    _, token = make_user(db)
    _, eft_token = make_user(db)
    _, admin = make_user(db, role="admin")
    db.commit()

    def signed_in(url: str, secret: str):
        context = browser.new_context(viewport={"width": 1100, "height": 760})
        page = context.new_page()
        page.goto(url)
        page.fill("#token", secret)
        page.click("#save-token")
        expect(page.locator("#live")).to_have_text("Live")
        return context, page

    admin_context, admin_page = signed_in(f"{web}/admin", admin)
    student_context, student_page = signed_in(f"{web}/", token)
    try:
        card = student_page.locator(".card", has=student_page.locator("h3", has_text=course.title))
        card.get_by_role("button", name="Enroll Now (card)").click()
        student_page.wait_for_url(re.compile(r"/pay/"))
        student_page.get_by_role("button", name="Card succeeds").click()
        student_page.wait_for_url(re.compile(r"/payments/.+/success"))
        student_page.get_by_role("link", name="Back to courses").click()
        expect(card.get_by_role("button", name="Continue Course")).to_be_visible(timeout=20_000)

        # An EFT enrollment arrives in the admin's open queue, with no reload.
        enrolled = requests.post(
            f"{web}/api/enrollments",
            json={"course_id": eft_course.id, "payment_method": "eft"},
            headers={"Authorization": f"Bearer {eft_token}"},
            timeout=10,
        ).json()
        row = admin_page.locator("tr", has=admin_page.get_by_text(enrolled["payment"]["reference"]))
        expect(row).to_be_visible(timeout=10_000)
        expect(admin_page.locator("#live")).to_have_text("Live")
        shots = {"student": tmp_path / "student.png", "admin": tmp_path / "admin.png"}
        admin_page.screenshot(path=shots["admin"], full_page=True)
        student_page.screenshot(path=shots["student"], full_page=True)
        row.get_by_role("button", name="Approve").click()
        expect(row).to_have_count(0, timeout=10_000)
        assert all(path.stat().st_size > 10_000 for path in shots.values())
        if os.environ.get("SKILLPAY_UPDATE_SCREENSHOTS"):
            for name, path in shots.items():
                sh.copy(path, ROOT_DOCS / f"live-{name}.png")
    finally:
        admin_context.close()
        student_context.close()


def test_an_admin_imports_a_statement_and_confirms_its_matches_by_click(
    web, worker, db, page, tmp_path
):
    _, admin_token = make_user(db, role="admin")
    course = make_course(db, price_cents=10000)
    matched = []
    for _ in range(2):
        enrollment, payment = make_enrollment(
            db, method="eft", state=State.PENDING_APPROVAL, course=course
        )
        enrollment.waiting_reason = EFT_WAITING_REASON
        matched.append((enrollment, payment))
    db.commit()
    statement = tmp_path / "november.csv"
    statement.write_text(
        "Date,Description,Amount\n"
        + "".join(f"2026/11/20,EFT {p.reference.lower()},100.00\n" for _, p in matched)
        + "2026/11/21,UNKNOWN PAYER,55.00\n"
    )
    page.goto(f"{web}/admin")
    page.fill("#token", admin_token)
    page.click("#save-token")
    expect(page.locator("#queue tr")).to_have_count(2)
    page.set_input_files("#statement-file", str(statement))
    page.click("#statement-import")
    expect(page.locator("#statement tr")).to_have_count(3)
    expect(page.locator("#statement tr[data-match=exact]")).to_have_count(2)
    expect(page.locator("#statement tr[data-match=unmatched]")).to_contain_text(
        "no reference, and no EFT enrollment waits for R 55.00"
    )
    asked: list[str] = []

    def answer(dialog):
        asked.append(dialog.message)
        dialog.accept()

    page.on("dialog", answer)
    expect(page.locator("#statement-confirm")).to_have_text("Confirm 2 exact match(es)")
    page.click("#statement-confirm")
    wait_for(lambda: "done" in page.inner_text("#statement-job"), timeout=30)
    assert asked == ["Approve 2 enrollment(s) matched on the statement, R 200.00 in total?"]
    expect(page.locator("#queue tr")).to_have_count(0)
    db.expire_all()
    assert [db.get(type(e), e.id).state for e, _ in matched] == ["approved", "approved"]
    page.click("#statement-import")  # the same file again
    expect(page.locator("#statement-note")).to_contain_text(
        "imported before: nothing imported again"
    )


def signed_in_admin_page(page, web: str, token: str):
    page.goto(f"{web}/admin")
    page.fill("#token", token)
    page.click("#save-token")
    return page


def test_an_operator_replays_a_dead_letter_by_click_and_reads_its_trail(web, worker, db, page):
    """A callback came for a payment we had not stored (a restore from backup lost it): it is
    dead-lettered. Once the payment is back, the operator replays it from the start, by
    click, and finds the whole story by the student's e-mail."""
    _, admin_token = make_user(db, role="admin")
    student, _ = make_user(db, email=f"lerato-{uuid.uuid4().hex[:6]}@example.com")
    enrollment, payment = make_enrollment(db, user=student)
    lost = {"id": payment.id, "paylink_id": payment.paylink_id}
    db.delete(payment)
    db.commit()
    body = {
        "paylinkID": lost["paylink_id"],
        "status": "SUCCESS",
        "externalTransactionID": lost["id"],
        "responseCode": "00",
    }
    assert post_callback(web, body).status_code == 200
    wait_for(lambda: db.scalar(select(func.count()).select_from(DeadLetter)) == 1, timeout=30)
    signed_in_admin_page(page, web, admin_token)
    letters = page.locator("#dead-letters tr")
    expect(letters).to_have_count(1)
    expect(letters.first).to_contain_text("payment_type_detection")
    db.add(
        Payment(
            id=lost["id"],
            enrollment_id=enrollment.id,
            method="card",
            amount_cents=payment.amount_cents,
            currency="ZAR",
            reference=payment.reference,
            paylink_id=lost["paylink_id"],
        )
    )
    db.commit()
    letters.first.locator("select").select_option("signature_check")
    letters.first.get_by_role("button", name="Replay").click()
    expect(letters).to_have_count(0)
    wait_for(
        lambda: db.get(type(enrollment), enrollment.id, populate_existing=True).state == "approved",
        timeout=30,
    )
    page.fill("#search-q", student.email.split("@")[0].upper())
    page.click("#search-go")
    expect(page.locator("#search-results tr")).to_have_count(1)
    page.locator("#search-results tr").first.get_by_role("button", name="Trail").click()
    trail = page.locator("#trail li")
    expect(page.locator("#trail-title")).to_contain_text(f"Enrollment {enrollment.id}")
    expect(page.locator("#trail li[data-kind=dead_letter]")).to_contain_text(
        "at payment_type_detection"
    )
    expect(page.locator("#trail li[data-kind=replay]")).to_have_count(1)
    expect(trail.last).to_contain_text("pending_payment -> approved")


def test_four_eyes_and_the_queues_sla_timers(process_env, worker, db, browser, tmp_path):
    """Above the amount one admin's approval waits for another's; the queue shows each wait
    against the target and sorts by it."""
    env = dict(
        process_env, SKILLPAY_FOUR_EYES_ABOVE_CENTS="100000", SKILLPAY_APPROVAL_SLA_HOURS="24"
    )
    server, web = start_web(env, tmp_path)
    try:
        _, first_token = make_user(db, role="admin")
        _, second_token = make_user(db, role="admin")
        large, _ = make_enrollment(
            db, method="eft", state=State.PENDING_APPROVAL, amount_cents=250000
        )
        late, _ = make_enrollment(db, method="eft", state=State.PENDING_APPROVAL, amount_cents=5000)
        for e in (large, late):
            e.waiting_reason = EFT_WAITING_REASON
        late.waiting_since = utcnow() - timedelta(hours=30)
        db.commit()
        first = signed_in_admin_page(browser.new_context().new_page(), web, first_token)
        rows = first.locator("#queue tr")
        expect(rows).to_have_count(2)
        expect(rows.first).to_have_attribute("data-id", str(late.id))  # the longest wait first
        expect(rows.first).to_have_class(re.compile("overdue"))
        expect(rows.first.locator("td.waited")).to_have_text("1d 6h of 1d 0h (overdue)")
        first.click("#sort-waited")
        expect(rows.first).to_have_attribute("data-id", str(large.id))
        mine = first.locator(f"#queue tr[data-id='{large.id}']")
        mine.get_by_role("button", name="Approve (1 of 2)").click()
        expect(first.locator("#message")).to_contain_text(
            "R 2,500.00 is above the four-eyes amount (R 1,000.00): another admin must approve it too"
        )
        expect(mine.get_by_role("button", name="Waiting for a second admin")).to_be_disabled()
        second = signed_in_admin_page(browser.new_context().new_page(), web, second_token)
        theirs = second.locator(f"#queue tr[data-id='{large.id}']")
        theirs.get_by_role("button", name="Confirm approval (2 of 2)").click()
        expect(second.locator(f"#queue tr[data-id='{large.id}']")).to_have_count(0)
        db.expire_all()
        assert db.get(type(large), large.id).state == "approved"
    finally:
        for context in browser.contexts:
            context.close()
        server.stop()
