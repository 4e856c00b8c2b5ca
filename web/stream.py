"""GET /api/events: a text/event-stream of the caller's enrollment changes, in a process of its
own (`gunicorn web.stream:serve --worker-class aiohttp.GunicornWebWorker`).

Thousands of idle streams cost a coroutine and a queue each, not a thread: they never occupy
the synchronous workers that take webhooks. One Hub per process listens to Redis pub/sub (the
channels pipeline/notify.py publishes to after commit), loads each notification and its
enrollment once, and hands it to the streams of its audience. The stored notifications are the
truth: a stream that reconnects with Last-Event-ID is first sent what it missed from the table;
the Hub, after losing Redis, reads what it missed from the table too; without Redis at all it
polls the table. Database work runs in threads, off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
import structlog
from aiohttp import web
from sqlalchemy.exc import SQLAlchemyError

from config import Settings, get_settings
from config.logging import configure_logging
from models import Enrollment, Notification, User, configure_database, session_scope
from pipeline.accounts import user_for_token
from pipeline.streams import (
    ADMINS,
    audience_of,
    newest_notification_id,
    notifications_after,
    notifications_by_id,
    notifications_since,
    redeem_ticket,
)
from web.views import enrollment_view

log = structlog.get_logger(__name__)
T = TypeVar("T")
# Late commits: a notification can become visible after one with a higher id. The Hub looks
# back this many ids when it catches up, and remembers what it already handed out.
LOOK_BACK = 1000
REMEMBERED = 20_000


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def event_text(event_id: int, name: str, data: dict[str, Any]) -> bytes:
    """One server-sent event: `id:`, `event:` and a single `data:` line of JSON."""
    return f"id: {event_id}\nevent: {name}\ndata: {json.dumps(data)}\n\n".encode()


def events_for(session: Any, rows: list[Notification]) -> list[Event]:
    """The events for these notifications. A change writes two (the student's and the
    admins'), so each enrollment is loaded and shown once, however many rows name it."""
    views: dict[int, dict[str, Any] | None] = {}
    events = []
    for row in rows:
        if row.enrollment_id not in views:
            enrollment = session.get(Enrollment, row.enrollment_id)
            views[row.enrollment_id] = (
                enrollment_view(session, enrollment, with_history=False) if enrollment else None
            )
        data = {
            "id": row.id,
            "kind": row.kind,
            "at": row.created_at.isoformat(),
            "enrollment": views[row.enrollment_id],
        }
        events.append((row.id, "enrollment.updated", data))
    return events


def _audience(row: Notification) -> str:
    return ADMINS if row.audience == "admins" else f"user:{row.user_id}"


Event = tuple[int, str, dict[str, Any]]


class Subscriber:
    """One open stream's inbox. A client too slow to keep up is not silently skipped: its
    stream is closed, and it reconnects with Last-Event-ID to read the rest from the table."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=10_000)
        self.overflowed = False

    def offer(self, event: Event) -> None:
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflowed = True


class Hub:
    """Fans notifications out to the open streams of this process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.streams: dict[str, set[Subscriber]] = {}
        # (id, created_at): an id alone could come back if the table were ever truncated.
        self.handed_out: OrderedDict[tuple[int, str], None] = OrderedDict()
        self.high_water = 0
        self.retry_seconds = 1.0

    def subscribe(self, audience: str) -> Subscriber:
        subscriber = Subscriber()
        self.streams.setdefault(audience, set()).add(subscriber)
        return subscriber

    def unsubscribe(self, audience: str, subscriber: Subscriber) -> None:
        self.streams.get(audience, set()).discard(subscriber)

    async def deliver(self, ids: list[int] | None = None) -> None:
        """Load the given notifications (or everything since the high-water mark, looking
        back for late commits) and hand each new one to its audience's streams."""

        # Deliveries run one at a time (the listener awaits each), so reading handed_out in
        # the thread races with nothing.
        def load() -> list[tuple[tuple[int, str], str, Event]]:
            with session_scope() as session:
                rows = (
                    notifications_by_id(session, ids)
                    if ids is not None
                    else notifications_since(session, max(0, self.high_water - LOOK_BACK), 5000)
                )
                fresh = [r for r in rows if (r.id, r.created_at.isoformat()) not in self.handed_out]
                return [
                    ((r.id, r.created_at.isoformat()), _audience(r), event)
                    for r, event in zip(fresh, events_for(session, fresh), strict=True)
                ]

        for key, audience, event in await in_thread(load):
            self.handed_out[key] = None
            if len(self.handed_out) > REMEMBERED:
                self.handed_out.popitem(last=False)
            self.high_water = max(self.high_water, event[0])
            for subscriber in list(self.streams.get(audience, ())):
                subscriber.offer(event)

    async def run(self) -> None:
        def newest() -> int:
            with session_scope() as session:
                return newest_notification_id(session)

        while True:  # the database may be down when the process starts: wait for it
            try:
                self.high_water = await in_thread(newest)
                break
            except Exception as exc:  # noqa: BLE001 - retried; the streams answer 503 meanwhile
                log.warning("stream.database_unavailable", error=type(exc).__name__)
                await asyncio.sleep(self.retry_seconds)
        if not self.settings.redis_url:
            while True:  # the embedded default without Redis: the table, every second
                await asyncio.sleep(1.0)
                await self._safely(self.deliver())
        while True:
            try:
                await self._listen()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis went away: catch up, then retry
                log.warning("stream.redis_lost", error=type(exc).__name__)
                await asyncio.sleep(1.0)

    async def _listen(self) -> None:
        client = aioredis.Redis.from_url(
            self.settings.redis_url, socket_connect_timeout=2, health_check_interval=10
        )
        try:
            pubsub = client.pubsub()
            await pubsub.psubscribe("skillpay:*")
            # Whatever was published while we were not listening is in the table.
            await self._safely(self.deliver())
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
                if message is None:
                    await self._safely(self.deliver())  # a quiet period: look for gaps
                    continue
                # A burst (a bulk approval publishes thousands) is loaded in one query.
                burst = [message]
                while len(burst) < 500 and (
                    more := await pubsub.get_message(ignore_subscribe_messages=True, timeout=0)
                ):
                    burst.append(more)
                if ids := [i for i in map(_note_id, burst) if i is not None]:
                    await self._safely(self.deliver(ids))
        finally:
            await client.aclose()

    async def _safely(self, work: Any) -> None:
        try:
            await work
        except Exception as exc:  # noqa: BLE001 - the next delivery or reconnect catches up
            log.warning("stream.deliver_failed", error=type(exc).__name__)


def _note_id(message: dict[str, Any]) -> int | None:
    """The notification id a pushed message carries (pipeline/notify.py publishes them)."""
    try:
        return int(json.loads(message["data"])["id"])
    except (ValueError, KeyError, TypeError):
        return None


SETTINGS = web.AppKey("settings", Settings)
HUB = web.AppKey("hub", Hub)


async def authenticate(request: web.Request) -> User | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    ticket = request.query.get("ticket", "")

    def find() -> User | None:
        with session_scope() as session:
            if scheme.lower() == "bearer" and token.strip():
                user = user_for_token(session, token.strip())
            elif ticket:
                user = redeem_ticket(session, ticket)
            else:
                return None
            if user is not None:
                session.expunge(user)
            return user

    return await in_thread(find)


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


async def events(request: web.Request) -> web.StreamResponse:
    settings: Settings = request.app[SETTINGS]
    hub: Hub = request.app[HUB]
    try:
        user = await authenticate(request)
    except SQLAlchemyError as exc:
        log.error("stream.database_error", error=type(exc).__name__)
        response = _error(503, "unavailable", "The stream cannot reach its database; retry.")
        response.headers["Retry-After"] = "5"
        return response
    if user is None:
        return _error(
            401,
            "unauthenticated",
            "A bearer token, or a one-use ticket from POST /api/stream-tickets, is required.",
        )
    raw_last = request.headers.get("Last-Event-ID") or request.query.get("last_event_id") or "0"
    try:
        last = int(raw_last)
        if not 0 <= last < 2**63:
            raise ValueError(raw_last)
    except ValueError:
        return _error(400, "invalid_request", "Last-Event-ID must be a notification id.")
    audience = audience_of(user)
    subscriber = hub.subscribe(audience)  # before the catch-up read: nothing falls between
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache, no-transform",
            "X-Accel-Buffering": "no",
            **_cors(request, settings),
        }
    )
    sent: set[int] = set()
    try:
        await response.prepare(request)
        await response.write(b"retry: 3000\n: connected\n\n")

        def missed() -> list[Event]:
            with session_scope() as session:
                return events_for(session, notifications_after(session, audience, last))

        for event_id, name, data in await in_thread(missed):
            sent.add(event_id)
            await response.write(event_text(event_id, name, data))
        while not subscriber.overflowed:
            try:
                event_id, name, data = await asyncio.wait_for(
                    subscriber.queue.get(), settings.stream_heartbeat_seconds
                )
            except TimeoutError:
                await response.write(b": heartbeat\n\n")
                continue
            if event_id not in sent:
                sent.add(event_id)
                await response.write(event_text(event_id, name, data))
    except ConnectionResetError:
        pass  # the client went away
    except SQLAlchemyError as exc:
        # Too late for a status: the stream ends, and the client reconnects with Last-Event-ID.
        log.error("stream.database_error", error=type(exc).__name__)
    finally:
        hub.unsubscribe(audience, subscriber)
    return response


def _cors(request: web.Request, settings: Settings) -> dict[str, str]:
    """The pages are served by the web process; in development the stream is on another port,
    so the page's origin (and only it) may read the stream."""
    origin = request.headers.get("Origin", "")
    if origin and origin == settings.public_origin:
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
    return {}


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def create_stream_app(settings: Settings) -> web.Application:
    settings.check()
    configure_logging(settings)
    configure_database(settings.database_url, settings.db_lock_timeout_ms)
    app = web.Application()
    app[SETTINGS] = settings
    app[HUB] = Hub(settings)
    app.router.add_get("/api/events", events)
    app.router.add_get("/healthz", healthz)

    async def hub_task(app: web.Application):
        task = asyncio.create_task(app[HUB].run())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app.cleanup_ctx.append(hub_task)
    return app


async def serve() -> web.Application:
    """gunicorn's entry point (`web.stream:serve`): the app for this process's environment."""
    return create_stream_app(get_settings())
