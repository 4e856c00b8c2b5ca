"""GET /api/events over real HTTP: the stream process (gunicorn's aiohttp worker), the web app,
PostgreSQL and Redis. A change committed anywhere reaches the streams of its audience; a
reconnect with Last-Event-ID misses nothing and gets nothing twice; Redis may restart."""

from __future__ import annotations

import json
import queue
import threading
import time

import pytest
import requests

from models import State
from tests.integration.conftest import start_stream, start_web
from tests.servers import OwnRedis
from tests.support import free_port, make_enrollment, make_user, wait_for

pytestmark = pytest.mark.integration


class Listener:
    """Reads one event stream in a thread; events and comments land in queues."""

    def __init__(self, url: str, *, headers: dict[str, str] | None = None, **params: str) -> None:
        self.response = requests.get(
            url, headers=headers or {}, params=params, stream=True, timeout=30
        )
        self.events: queue.Queue[dict] = queue.Queue()
        self.comments: list[str] = []
        if self.response.status_code == 200:
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        block: dict = {}
        try:
            for raw in self.response.iter_lines(decode_unicode=True):
                if raw == "":
                    if "data" in block:
                        block["data"] = json.loads(block["data"])
                        self.events.put(block)
                    block = {}
                elif raw.startswith(":"):
                    self.comments.append(raw)
                else:
                    key, _, value = raw.partition(": ")
                    block[key] = value
        except (requests.RequestException, AttributeError, ValueError):
            return

    def take(self, n: int, timeout: float = 15.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        return [self.events.get(timeout=max(0.1, deadline - time.monotonic())) for _ in range(n)]

    def quiet(self, seconds: float = 1.5) -> bool:
        time.sleep(seconds)
        return self.events.empty()

    def close(self) -> None:
        self.response.close()


def ticket(web: str, token: str) -> str:
    response = requests.post(
        f"{web}/api/stream-tickets", headers={"Authorization": f"Bearer {token}"}, timeout=10
    )
    assert response.status_code == 201
    return response.json()["ticket"]


def approve(web: str, admin: str, enrollment_id: int) -> None:
    response = requests.post(
        f"{web}/api/admin/enrollments/{enrollment_id}/approve",
        headers={"Authorization": f"Bearer {admin}"},
        timeout=10,
    )
    assert response.status_code == 200, response.text


def waiting_enrollments(db, n: int, user=None):
    rows = [
        make_enrollment(db, method="eft", state=State.PENDING_APPROVAL, user=user)[0]
        for _ in range(n)
    ]
    db.commit()
    return rows


def test_an_approval_reaches_the_student_and_the_admins_live(web, stream, db):
    student, student_token = make_user(db)
    _, admin = make_user(db, role="admin")
    [enrollment] = waiting_enrollments(db, 1, user=student)
    mine = Listener(stream, headers={"Authorization": f"Bearer {student_token}"})
    theirs = Listener(stream, ticket=ticket(web, admin))
    try:
        assert mine.response.headers["Content-Type"].startswith("text/event-stream")
        assert mine.response.headers["X-Accel-Buffering"] == "no"
        assert "no-cache" in mine.response.headers["Cache-Control"]
        assert "Content-Encoding" not in mine.response.headers
        time.sleep(0.3)
        approve(web, admin, enrollment.id)
        for listener in (mine, theirs):
            [event] = listener.take(1)
            assert event["event"] == "enrollment.updated" and int(event["id"]) > 0
            view = event["data"]["enrollment"]
            assert (view["id"], view["state"], view["course_access"]) == (
                enrollment.id,
                "approved",
                True,
            )
            assert "history" not in view
        wait_for(lambda: any("heartbeat" in c for c in mine.comments), timeout=5)
    finally:
        mine.close()
        theirs.close()


def test_tickets_are_one_use_and_short_lived_and_never_a_token(web, stream, db):
    _, token = make_user(db)
    db.commit()
    one = ticket(web, token)
    first = Listener(stream, ticket=one)
    try:
        assert first.response.status_code == 200
        again = requests.get(stream, params={"ticket": one}, timeout=10)
        assert again.status_code == 401 and again.json()["error"]["code"] == "unauthenticated"
        # The long-lived token is not accepted in a URL, as a ticket or otherwise.
        assert requests.get(stream, params={"ticket": token}, timeout=10).status_code == 401
        assert requests.get(stream, timeout=10).status_code == 401
    finally:
        first.close()


def test_a_reconnect_replays_what_was_missed_then_goes_live_once(web, stream, db):
    student, token = make_user(db)
    _, admin = make_user(db, role="admin")
    first, second, third = waiting_enrollments(db, 3, user=student)
    auth = {"Authorization": f"Bearer {token}"}
    listener = Listener(stream, headers=auth)
    time.sleep(0.3)
    approve(web, admin, first.id)
    [seen] = listener.take(1)
    listener.close()
    approve(web, admin, second.id)  # while the student is away
    back = Listener(stream, headers={**auth, "Last-Event-ID": seen["id"]})
    try:
        [missed] = back.take(1)
        assert missed["data"]["enrollment"]["id"] == second.id
        approve(web, admin, third.id)
        [live] = back.take(1)
        assert live["data"]["enrollment"]["id"] == third.id
        assert back.quiet()  # nothing twice
        assert int(seen["id"]) < int(missed["id"]) < int(live["id"])
    finally:
        back.close()


def test_streams_miss_nothing_when_redis_restarts(process_env, db, tmp_path):
    own = OwnRedis(tmp_path).start()
    env = dict(process_env, REDIS_URL=own.url, STREAM_PORT=str(free_port()))
    env["SKILLPAY_STREAM_URL"] = f"http://127.0.0.1:{env['STREAM_PORT']}/api/events"
    web_server, web = start_web(env, tmp_path)
    stream_server = start_stream(env, tmp_path, web)
    _, admin = make_user(db, role="admin")
    enrollments = waiting_enrollments(db, 3)
    listener = Listener(env["SKILLPAY_STREAM_URL"], headers={"Authorization": f"Bearer {admin}"})
    try:
        time.sleep(0.3)
        approve(web, admin, enrollments[0].id)
        listener.take(1)
        own.stop()
        approve(web, admin, enrollments[1].id)  # stored; its push is lost with Redis
        own.start()
        approve(web, admin, enrollments[2].id)
        got = listener.take(2, timeout=20)
        assert sorted(e["data"]["enrollment"]["id"] for e in got) == [
            enrollments[1].id,
            enrollments[2].id,
        ]
        assert listener.quiet()
    finally:
        listener.close()
        stream_server.stop()
        web_server.stop()
        own.stop()
