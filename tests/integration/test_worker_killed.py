"""A worker killed with SIGKILL in the middle of a stage does not lose the event."""

from __future__ import annotations

import time

import pytest
import requests
from sqlalchemy import select, text

from models import EnrollmentHistory, StageAttempt, WebhookEvent
from tests.integration.conftest import start_worker
from tests.support import callback_body, make_enrollment, signed, wait_for

pytestmark = pytest.mark.integration


def test_worker_killed_mid_stage_completes_once_a_worker_is_back(
    process_env, tmp_path, web, db, engine
):
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    # The stage waits on the lock for as long as the test needs, rather than timing out.
    env = dict(process_env, SKILLPAY_DB_LOCK_TIMEOUT_MS="60000")
    worker = start_worker(env, tmp_path / "first")
    enrollment, payment = make_enrollment(db)
    db.commit()

    # Hold the enrollment's row lock, so the worker blocks inside the status-update stage.
    holder = engine.connect()
    held = holder.begin()
    try:
        holder.execute(
            text("SELECT id FROM enrollments WHERE id = :id FOR NO KEY UPDATE"),
            {"id": enrollment.id},
        )
        raw, headers = signed(callback_body(payment))
        response = requests.post(f"{web}/webhooks/ikhokha", data=raw, headers=headers, timeout=10)
        event_id = response.json()["event_id"]

        def worker_waits_on_the_lock() -> bool:
            with engine.connect() as conn:
                return bool(
                    conn.execute(
                        text(
                            "SELECT count(*) FROM pg_stat_activity "
                            "WHERE datname = current_database() AND wait_event_type = 'Lock' "
                            "AND query LIKE '%FROM enrollments%FOR NO KEY UPDATE%'"
                        )
                    ).scalar()
                )

        wait_for(worker_waits_on_the_lock, timeout=20)
        db.expire_all()
        assert db.get(WebhookEvent, event_id).stage == "status_update"
        worker.kill()
    finally:
        worker.stop()
        held.rollback()
        holder.close()

    time.sleep(1.5)
    db.expire_all()
    event = db.get(WebhookEvent, event_id)
    assert event.state == "processing" and event.stage == "status_update"

    restarted = start_worker(process_env, tmp_path / "second")
    try:
        wait_for(
            lambda: (db.expire_all(), db.get(WebhookEvent, event_id).state == "completed")[1],
            timeout=40,
        )
    finally:
        restarted.stop()
    db.expire_all()
    assert db.get(WebhookEvent, event_id).outcome == "pending_payment -> approved"
    history = db.scalars(
        select(EnrollmentHistory).where(EnrollmentHistory.enrollment_id == enrollment.id)
    ).all()
    assert [(h.from_state, h.to_state) for h in history] == [("pending_payment", "approved")]
    ok = db.scalars(
        select(StageAttempt.stage).where(
            StageAttempt.event_id == event_id, StageAttempt.outcome == "ok"
        )
    ).all()
    assert sorted(ok) == sorted(
        [
            "signature_check",
            "payment_type_detection",
            "enrollment_lookup",
            "approval_routing",
            "status_update",
            "notification",
        ]
    )
