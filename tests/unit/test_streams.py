"""Stream tickets and the event format, as plain functions against PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

from freezegun import freeze_time

from pipeline.streams import ADMINS, audience_of, issue_ticket, notifications_after, redeem_ticket
from tests.support import make_user
from web.stream import event_text


def test_a_ticket_is_redeemed_once_and_never_after_it_expires(session):
    user, _ = make_user(session)
    ticket = issue_ticket(session, user, timedelta(seconds=60))
    assert ticket.startswith("st_")
    assert redeem_ticket(session, ticket).id == user.id
    assert redeem_ticket(session, ticket) is None  # one use
    late = issue_ticket(session, user, timedelta(seconds=60))
    with freeze_time(timedelta(seconds=61), tick=True):
        assert redeem_ticket(session, late) is None
    assert redeem_ticket(session, "sp_not-a-ticket") is None


def test_students_read_their_own_notifications_and_admins_the_admins_channel(session, settings):
    from models import State
    from pipeline.notify import notify
    from pipeline.state_machine import transition_enrollment
    from tests.support import make_enrollment

    student, _ = make_user(session)
    admin, _ = make_user(session, role="admin")
    other, _ = make_user(session)
    enrollment, _ = make_enrollment(
        session, method="eft", state=State.PENDING_APPROVAL, user=student
    )
    change = transition_enrollment(session, enrollment.id, State.APPROVED, actor="a", source="s")
    notify(session, settings, [change])
    assert audience_of(admin) == ADMINS and audience_of(student) == f"user:{student.id}"
    mine = notifications_after(session, audience_of(student), 0)
    assert [n.audience for n in mine] == ["student"]
    assert notifications_after(session, audience_of(other), 0) == []
    admins = notifications_after(session, ADMINS, 0)
    assert len(admins) >= 1 and notifications_after(session, ADMINS, admins[-1].id) == []


def test_an_event_is_id_event_and_one_line_of_json():
    text = event_text(42, "enrollment.updated", {"enrollment": {"id": 7, "note": "a\nb"}})
    assert text == (
        b'id: 42\nevent: enrollment.updated\ndata: {"enrollment": {"id": 7, "note": "a\\nb"}}\n\n'
    )


def test_a_stream_that_falls_behind_is_closed_rather_than_skipped():
    from web.stream import Subscriber

    subscriber = Subscriber()
    for i in range(subscriber.queue.maxsize):
        subscriber.offer((i, "enrollment.updated", {}))
    assert not subscriber.overflowed
    subscriber.offer((10**6, "enrollment.updated", {}))
    # The stream loop stops on this; the client reconnects with Last-Event-ID and reads the
    # rest from the table.
    assert subscriber.overflowed


def test_the_stream_answers_401_and_503_as_json_never_500(settings, mocker):
    # No `session` fixture: its one shared connection would be used by the hub's thread and
    # the request's thread at once. The app gets its own pooled engine on the test database.
    import asyncio

    from aiohttp.test_utils import TestClient, TestServer
    from sqlalchemy.exc import OperationalError

    from web.stream import create_stream_app

    async def scenario() -> list[tuple[int, dict]]:
        answers = []
        async with TestClient(TestServer(create_stream_app(settings))) as client:
            for headers in ({}, {"Authorization": "Bearer sp_not-a-token-of-anyone"}):
                response = await client.get("/api/events", headers=headers)
                answers.append((response.status, await response.json()))
            mocker.patch(
                "web.stream.user_for_token",
                side_effect=OperationalError("SELECT", {}, Exception("down")),
            )
            response = await client.get("/api/events", headers={"Authorization": "Bearer sp_x"})
            answers.append((response.status, await response.json()))
        return answers

    answers = asyncio.run(scenario())
    assert [status for status, _ in answers] == [401, 401, 503]
    assert all(set(body["error"]) == {"code", "message"} for _, body in answers)


def test_a_change_is_shown_once_for_both_of_its_notifications(session, settings, mocker):
    from models import State
    from pipeline.notify import notify
    from pipeline.state_machine import transition_enrollment
    from pipeline.streams import notifications_since
    from tests.support import make_enrollment
    from web import stream

    enrollment, _ = make_enrollment(session, method="eft", state=State.PENDING_APPROVAL)
    change = transition_enrollment(session, enrollment.id, State.APPROVED, actor="a", source="s")
    notify(session, settings, [change])
    rows = [r for r in notifications_since(session, 0) if r.enrollment_id == enrollment.id]
    view = mocker.spy(stream, "enrollment_view")
    events = stream.events_for(session, rows)
    assert sorted(row.audience for row in rows) == ["admins", "student"]
    assert view.call_count == 1
    assert [e[2]["enrollment"]["state"] for e in events] == ["approved", "approved"]


def test_the_hub_waits_for_a_database_that_is_down_when_it_starts(settings, mocker):
    import asyncio
    import contextlib

    from sqlalchemy.exc import OperationalError

    from models import configure_database
    from web import stream

    configure_database(settings.database_url, settings.db_lock_timeout_ms)
    newest = mocker.patch(
        "web.stream.newest_notification_id",
        side_effect=[OperationalError("SELECT", {}, Exception("down")), 41],
    )
    hub = stream.Hub(settings)  # redis_url is empty: the table is polled
    hub.retry_seconds = 0.01

    async def scenario() -> int:
        task = asyncio.create_task(hub.run())
        while hub.high_water == 0 and not task.done():
            await asyncio.sleep(0.01)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return hub.high_water

    assert asyncio.run(scenario()) >= 41  # it started, and did not die on the first error
    assert newest.call_count == 2
