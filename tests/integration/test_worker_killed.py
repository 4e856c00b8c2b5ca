"""A worker killed with SIGKILL in the middle of a stage does not lose the event."""

from __future__ import annotations

import time

import pytest
import requests
from sqlalchemy import func, select, text

from models import Enrollment, EnrollmentHistory, StageAttempt, WebhookEvent
from tests.integration.conftest import start_worker
from tests.support import (
    callback_body,
    make_enrollment,
    make_user,
    many_waiting_enrollments,
    signed,
    wait_for,
)

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


def test_bulk_job_interrupted_by_a_killed_worker_finishes_without_double_approvals(
    process_env, tmp_path, web, db, engine
):
    _, token = make_user(db, role="admin")
    db.commit()
    ids = many_waiting_enrollments(db, 2000, "killed")
    env = dict(process_env, SKILLPAY_DB_LOCK_TIMEOUT_MS="60000")
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    worker = start_worker(env, tmp_path / "first")
    holder = engine.connect()
    held = holder.begin()
    auth = {"Authorization": f"Bearer {token}"}
    try:
        # Block the third batch (items 1000-1499) on one row, so the kill lands mid-job.
        holder.execute(
            text("SELECT id FROM enrollments WHERE id = :id FOR NO KEY UPDATE"), {"id": ids[1200]}
        )
        job = requests.post(
            f"{web}/api/admin/enrollments/bulk-approve", json={"ids": ids}, headers=auth, timeout=10
        ).json()
        url = f"{web}{job['status_url']}?per_page=1"
        wait_for(
            lambda: requests.get(url, headers=auth, timeout=10).json()["counts"]["approved"] == 1000
        )
        worker.kill()
    finally:
        worker.stop()
        held.rollback()
        holder.close()
    halfway = requests.get(url, headers=auth, timeout=10).json()
    assert halfway["state"] == "running" and halfway["counts"]["approved"] == 1000

    restarted = start_worker(env, tmp_path / "second")
    try:
        done = wait_for(
            lambda: (
                (j := requests.get(url, headers=auth, timeout=10).json())["state"] == "done" and j
            ),
            timeout=60,
        )
    finally:
        restarted.stop()
    assert done["counts"] == {"pending": 0, "approved": 2000, "skipped": 0, "failed": 0}
    rows = db.execute(
        select(EnrollmentHistory.enrollment_id, func.count())
        .where(EnrollmentHistory.enrollment_id.in_(ids))
        .group_by(EnrollmentHistory.enrollment_id)
    ).all()
    assert len(rows) == 2000 and {count for _, count in rows} == {1}
    assert (
        db.scalar(
            select(func.count())
            .select_from(Enrollment)
            .where(Enrollment.id.in_(ids), Enrollment.state == "approved")
        )
        == 2000
    )
