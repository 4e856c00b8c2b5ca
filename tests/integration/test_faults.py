"""Fault injection: streams of signed callbacks while workers die and servers restart.

Afterwards every callback sent must be applied exactly once, or be in the dead-letter table
with a reason. The tests that stop servers start PostgreSQL and Redis of their own."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.orm import Session

from models import DeadLetter, Enrollment, EnrollmentHistory, WebhookEvent
from models.db import driver_url
from tests.integration.conftest import start_web, start_worker
from tests.servers import OwnPostgres, OwnRabbitMQ, OwnRedis, restart_after
from tests.support import many_card_payments, signed, wait_for

pytestmark = pytest.mark.integration


REFUSED: list[int] = []  # deliveries that had to be sent again (503 or no connection)


def deliver(web: str, body: dict, *, attempts: int = 600) -> int:
    """Send like iKhokha would: again after a 503 or a refused connection, until stored."""
    raw, headers = signed(body)
    for attempt in range(attempts):
        try:
            response = requests.post(
                f"{web}/webhooks/ikhokha", data=raw, headers=headers, timeout=15
            )
            if response.status_code == 200:
                if attempt:
                    REFUSED.append(attempt)
                return response.json()["event_id"]
            assert response.status_code == 503, response.text
        except requests.ConnectionError:
            pass
        time.sleep(0.05)
    raise AssertionError("the callback was never accepted")


def success(payment: tuple[str, str, int], status: str = "SUCCESS") -> dict:
    return {"paylinkID": payment[1], "status": status, "externalTransactionID": payment[0]}


def settled(engine, expected_events: int) -> bool:
    with engine.connect() as conn:
        total, open_ = conn.execute(
            text(
                "SELECT count(*), count(*) FILTER (WHERE state NOT IN ('completed', 'dead')) FROM webhook_events"
            )
        ).one()
    return total == expected_events and open_ == 0


def assert_each_applied_once(engine, payments, *, allow_dead: bool = True) -> None:
    """Each payment's enrollment approved exactly once, or its event dead-lettered with a reason."""
    ids = [p[2] for p in payments]
    with Session(engine) as s:
        approvals = dict(
            s.execute(
                select(EnrollmentHistory.enrollment_id, func.count())
                .where(
                    EnrollmentHistory.enrollment_id.in_(ids),
                    EnrollmentHistory.to_state == "approved",
                )
                .group_by(EnrollmentHistory.enrollment_id)
            ).all()
        )
        letters = s.execute(
            select(WebhookEvent.external_transaction_id, DeadLetter.stage, DeadLetter.error)
            .join(DeadLetter, DeadLetter.event_id == WebhookEvent.id)
            .where(DeadLetter.resolved_at.is_(None))
        ).all()
        states = dict(
            s.execute(select(Enrollment.id, Enrollment.state).where(Enrollment.id.in_(ids))).all()
        )
    dead = {payment_id for payment_id, _, _ in letters} if allow_dead else set()
    assert all(error for _, _, error in letters), "every dead letter says why"
    for payment_id, _, enrollment_id in payments:
        if payment_id in dead:
            continue
        assert approvals.get(enrollment_id) == 1, (
            enrollment_id,
            approvals.get(enrollment_id),
            letters[:5],
        )
        assert states[enrollment_id] == "approved"
    return letters


def replay_dead_letters(stack) -> None:
    """What an operator does after an outage: replay every dead letter, and wait."""
    skillpay = str(Path(sys.executable).parent / "skillpay")
    with stack["engine"].connect() as conn:
        ids = (
            conn.execute(text("SELECT id FROM dead_letters WHERE resolved_at IS NULL"))
            .scalars()
            .all()
        )
        total = conn.execute(text("SELECT count(*) FROM webhook_events")).scalar()
    for letter_id in ids:
        subprocess.run(
            [skillpay, "dlq", "replay", str(letter_id)],
            env=stack["env"],
            check=True,
            capture_output=True,
            timeout=60,
        )
    wait_for(lambda: settled(stack["engine"], total), timeout=120, interval=0.5)


@pytest.fixture(params=["redis"])
def own_stack(request, tmp_path, base_env):
    """PostgreSQL, Redis (for pushes, and as the broker unless the test asks for a RabbitMQ
    node), web and workers of this test's own."""
    pg = OwnPostgres().init()
    rd = OwnRedis(tmp_path).start()
    rabbit = OwnRabbitMQ().start() if request.param == "rabbitmq" else None
    from migrations import upgrade

    upgrade(pg.url)
    broker = rabbit.url if rabbit else rd.url
    env = dict(base_env, DATABASE_URL=pg.url, CELERY_BROKER_URL=broker, REDIS_URL=rd.url)
    web, base = start_web(env, tmp_path)
    engine = create_engine(driver_url(pg.url), pool_pre_ping=True)
    stack = {
        "pg": pg,
        "redis": rd,
        "rabbitmq": rabbit,
        "env": env,
        "web": base,
        "engine": engine,
        "workers": [],
        "tmp": tmp_path,
    }

    def new_worker():
        d = tmp_path / f"worker{len(stack['workers'])}"
        d.mkdir()
        w = start_worker(env, d)
        stack["workers"].append(w)
        return w

    stack["new_worker"] = new_worker
    yield stack
    for w in stack["workers"]:
        w.stop()
    web.stop()
    engine.dispose()
    rd.stop()
    if rabbit:
        rabbit.remove()
    pg.remove()


@pytest.mark.parametrize("own_stack", ["redis", "rabbitmq"], indirect=True)
def test_worker_killed_every_few_seconds_during_1000_callbacks(own_stack):
    engine = own_stack["engine"]
    with Session(engine) as s:
        payments = many_card_payments(s, 1000)
    worker = own_stack["new_worker"]()
    with ThreadPoolExecutor(8) as pool:
        sending = pool.map(lambda p: deliver(own_stack["web"], success(p)), payments)
        kills = 0
        deadline = time.monotonic() + 240
        while not settled(engine, 1000) and time.monotonic() < deadline:
            time.sleep(random.uniform(2.5, 4.0))
            if kills < 6:
                worker.kill()
                kills += 1
                worker = own_stack["new_worker"]()
        list(sending)
    wait_for(lambda: settled(engine, 1000), timeout=120, interval=0.5)
    assert kills >= 3
    assert_each_applied_once(engine, payments)


@pytest.mark.parametrize(
    ("own_stack", "server"),
    [("redis", "redis"), ("redis", "pg"), ("rabbitmq", "rabbitmq")],
    ids=["redis-restart", "postgres-restart", "rabbitmq-node-killed"],
    indirect=["own_stack"],
)
def test_server_stopped_and_restarted_during_the_stream(own_stack, server):
    """Redis down: the receiver still stores (200) and the sweeper enqueues later.
    PostgreSQL down: the receiver answers 503 and the sender delivers again.
    The RabbitMQ node SIGKILLed: what it confirmed is on disk in the quorum queue; what it
    did not, the sweeper sends again."""
    engine = own_stack["engine"]
    with Session(engine) as s:
        payments = many_card_payments(s, 300)
    own_stack["new_worker"]()
    REFUSED.clear()
    outage = threading.Timer(1.0, restart_after, args=(own_stack[server], 3.0))
    outage.start()
    with ThreadPoolExecutor(4) as pool:
        list(
            pool.map(lambda p: (deliver(own_stack["web"], success(p)), time.sleep(0.02)), payments)
        )
    outage.join()
    if server == "pg":
        assert REFUSED, (
            "the outage fell inside the stream: some callbacks got 503 and were sent again"
        )
    wait_for(lambda: settled(engine, 300), timeout=120, interval=0.5)
    # The worker rode out the outage (it reconnects; it does not exit).
    assert own_stack["workers"][-1].proc.poll() is None, own_stack["workers"][-1].log()[-3000:]
    assert_each_applied_once(engine, payments)
    replay_dead_letters(own_stack)
    assert_each_applied_once(engine, payments, allow_dead=False)


def test_every_callback_three_times_concurrently_and_out_of_order(web, worker, db, engine):
    payments = many_card_payments(db, 100)
    deliveries = [
        success(p, status) for p in payments for status in ("SUCCESS", "FAILURE") for _ in range(3)
    ]
    random.Random(7).shuffle(deliveries)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda body: deliver(web, body), deliveries))
    # Two outcomes per link: a SUCCESS event and a FAILURE event, each stored once.
    wait_for(lambda: settled(engine, 200), timeout=120, interval=0.5)
    assert_each_applied_once(engine, payments)
    with Session(engine) as s:
        for _, _, enrollment_id in payments:
            path = s.scalars(
                select(EnrollmentHistory.to_state)
                .where(EnrollmentHistory.enrollment_id == enrollment_id)
                .order_by(EnrollmentHistory.id)
            ).all()
            assert path in (["approved"], ["payment_failed", "approved"]), path
