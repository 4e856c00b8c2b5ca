"""More than one of everything: two worker processes and two web processes (as on separate
machines) against one PostgreSQL and one broker; and beat running once however many start."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from sqlalchemy import func, select

from models import (
    DeadLetter,
    Enrollment,
    EnrollmentHistory,
    EventState,
    ScheduledRun,
    State,
    WebhookEvent,
)
from tests.integration.conftest import start_beat, start_web, start_worker
from tests.support import callback_body, make_enrollment, make_user, signed, wait_for

pytestmark = pytest.mark.integration


def test_two_workers_and_two_web_processes_apply_every_change_once(
    process_env, simulator, tmp_path, db
):
    _, admin_token = make_user(db, role="admin")
    card = [make_enrollment(db) for _ in range(40)]
    # Waiting for an admin, with a card payment whose SUCCESS callback races the approval.
    flagged = [make_enrollment(db, state=State.PENDING_APPROVAL) for _ in range(10)]
    db.commit()
    webs = [start_web(process_env, tmp_path) for _ in range(2)]
    workers = [start_worker(process_env, tmp_path, name=f"worker{i}") for i in (1, 2)]
    try:
        bases = [base for _, base in webs]

        def deliver(job: tuple[int, object]) -> int:
            web, payment = job
            raw, headers = signed(callback_body(payment))
            # The same callback to both web processes: iKhokha retrying, or two load-balanced
            # deliveries.
            return requests.post(
                f"{bases[web % 2]}/webhooks/ikhokha", data=raw, headers=headers, timeout=10
            ).status_code

        def approve(enrollment_id: int) -> int:
            return requests.post(
                f"{bases[enrollment_id % 2]}/api/admin/enrollments/{enrollment_id}/approve",
                headers={"Authorization": f"Bearer {admin_token}"},
                timeout=10,
            ).status_code

        with ThreadPoolExecutor(16) as pool:
            sent = [pool.submit(deliver, (web, p)) for _, p in card for web in (0, 1)]
            sent += [pool.submit(deliver, (i, p)) for i, (_, p) in enumerate(flagged)]
            approvals = [pool.submit(approve, e.id) for e, _ in flagged]
            # One worker dies mid-stream, holding whatever it had taken.
            wait_for(lambda: _completed(db) >= 10, timeout=60)
            workers[0].kill()
            assert {f.result() for f in sent} <= {200, 202}
            assert {f.result() for f in approvals} == {200}

        def settled() -> bool:
            db.expire_all()
            return (
                db.scalar(
                    select(func.count())
                    .select_from(WebhookEvent)
                    .where(WebhookEvent.state.in_((EventState.RECEIVED, EventState.PROCESSING)))
                )
                == 0
            )

        wait_for(settled, timeout=90)
    finally:
        for process in [*workers, *(server for server, _ in webs)]:
            process.stop()

    ids = [e.id for e, _ in card + flagged]
    states = dict(
        db.execute(select(Enrollment.id, Enrollment.state).where(Enrollment.id.in_(ids))).all()
    )
    assert set(states.values()) == {State.APPROVED}
    changes = db.execute(
        select(EnrollmentHistory.enrollment_id, EnrollmentHistory.to_state, func.count())
        .where(EnrollmentHistory.enrollment_id.in_(ids))
        .group_by(EnrollmentHistory.enrollment_id, EnrollmentHistory.to_state)
    ).all()
    # Exactly one change per enrollment: no transition twice, whoever won the race.
    assert len(changes) == len(ids) and {(to, n) for _, to, n in changes} == {("approved", 1)}
    assert db.scalar(select(func.count()).select_from(DeadLetter)) == 0
    # Each distinct callback is one inbox row, however many times and ways it arrived.
    assert db.scalar(select(func.count()).select_from(WebhookEvent)) == len(ids)


def _completed(db) -> int:
    db.expire_all()
    return db.scalar(
        select(func.count())
        .select_from(WebhookEvent)
        .where(WebhookEvent.state == EventState.COMPLETED)
    )


def test_a_second_beat_started_by_mistake_does_not_double_the_scheduled_work(
    process_env, tmp_path, db
):
    env = dict(process_env, SKILLPAY_SWEEP_INTERVAL_SECONDS="1")
    worker = start_worker(env, tmp_path, beat=False)
    beats = []
    try:
        beats = [start_beat(env, tmp_path, name=f"beat{i}") for i in (1, 2)]
        started = time.time()
        time.sleep(8)
        for beat in beats:
            beat.stop()
        elapsed = time.time() - started
        time.sleep(1.0)  # the last messages are worked off
    finally:
        for beat in beats:
            beat.stop()
        worker.stop()
    log = worker.log()
    received = len(re.findall(r"Task skillpay\.sweep_stalled_work\[[^\]]+\] received", log))
    runs = db.scalar(
        select(func.count())
        .select_from(ScheduledRun)
        .where(ScheduledRun.task == "skillpay.sweep_stalled_work")
    )
    # Both beats sent a sweep every second; one ran per second.
    assert runs <= elapsed + 2
    assert received >= runs + 4, log[-2000:]
    assert log.count("schedule.period_taken") == received - runs
