"""The student's course page in a real browser (headless Chromium) against the running app."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import requests

from tests.support import make_course, make_user, unavailable, wait_for

pytestmark = pytest.mark.integration


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    unavailable(
        "Chromium", FileNotFoundError("no chromium on PATH (make test installs it with apt)")
    )
    raise AssertionError("unreachable")


def render(url: str, profile) -> str:
    result = subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def buttons(dom: str) -> dict[str, list[tuple[str, bool]]]:
    """Course title -> [(button text, disabled)] as the page rendered them."""
    cards = {}
    for card in dom.split('<div class="card" data-course-id=')[1:]:
        title = re.search(r"<h3>(.*?)</h3>", card).group(1)
        cards[title] = [
            (text, "disabled" in attrs)
            for attrs, text in re.findall(r"<button([^>]*)>(.*?)</button>", card)
        ]
    return cards


def messages(dom: str) -> list[str]:
    return re.findall(r'<p class="muted message">(.*?)</p>', dom)


def test_course_cards_show_the_right_button_for_each_state(web, simulator, worker, db, tmp_path):
    paid, waiting, unpaid, untouched = (make_course(db) for _ in range(4))
    _, token = make_user(db)
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

    dom = render(f"{web}/#token={token}", tmp_path / "student")
    cards = buttons(dom)
    assert cards[paid.title] == [("Continue Course", False)]
    assert cards[waiting.title] == [("Pending Approval", True)]
    assert cards[unpaid.title] == [("Complete Payment", False)]
    assert cards[untouched.title] == [("Enroll Now (card)", False), ("Enroll with EFT", False)]
    assert [m for m in messages(dom) if "bank transfer with reference SP-" in m]

    anonymous = buttons(render(f"{web}/", tmp_path / "anonymous"))
    assert anonymous[paid.title] == [("Register To Enroll", False)]
