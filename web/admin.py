"""Admin endpoints: the approval queue, decisions, bulk jobs, audit, dead letters."""

from __future__ import annotations

from datetime import timedelta

from flask import Blueprint, jsonify, request
from sqlalchemy import func, select

from models import DeadLetter, Enrollment, EnrollmentHistory, WebhookEvent, utcnow
from pipeline import bulk, runner
from pipeline.enrollments import decide, enrollment_view
from pipeline.errors import NotFound, canonical_uuid
from web.auth import current_user, db, require_admin
from web.schemas import (
    BulkApproveRequest,
    PageQuery,
    QueueQuery,
    RejectRequest,
    ReplayRequest,
    load_json,
    load_query,
)
from workers.tasks import enqueue_bulk_job, enqueue_pipeline

bp = Blueprint("admin", __name__, url_prefix="/api/admin")


@bp.get("/enrollments")
@require_admin
def queue():
    """The queue, oldest first, each row with why it waits."""
    q = load_query(QueueQuery())
    stmt = select(Enrollment).where(Enrollment.state == q["status"])
    if q["course_id"]:
        stmt = stmt.where(Enrollment.course_id == q["course_id"])
    if q["payment_method"]:
        stmt = stmt.where(Enrollment.payment_method == q["payment_method"])
    if q["older_than_minutes"] is not None:
        stmt = stmt.where(
            Enrollment.created_at <= utcnow() - timedelta(minutes=q["older_than_minutes"])
        )
    total = db().scalar(select(func.count()).select_from(stmt.subquery()))
    rows = db().scalars(
        stmt.order_by(Enrollment.created_at, Enrollment.id)
        .offset((q["page"] - 1) * q["per_page"])
        .limit(q["per_page"])
    )
    items = []
    for e in rows:
        view = enrollment_view(db(), e, with_history=False)
        view["student_email"] = e.user.email
        view["course_title"] = e.course.title
        items.append(view)
    return jsonify({"items": items, "page": q["page"], "per_page": q["per_page"], "total": total})


@bp.post("/enrollments/<int:enrollment_id>/approve")
@require_admin
def approve(enrollment_id: int):
    return _decide(enrollment_id, approve=True)


@bp.post("/enrollments/<int:enrollment_id>/reject")
@require_admin
def reject(enrollment_id: int):
    return _decide(enrollment_id, approve=False, reason=load_json(RejectRequest())["reason"])


def _decide(enrollment_id: int, *, approve: bool, reason: str | None = None):
    session = db()
    enrollment, changed = decide(
        session, enrollment_id, current_user(), approve=approve, reason=reason
    )
    session.commit()
    view = enrollment_view(session, enrollment)
    view["changed"] = changed
    if not changed:
        view["message"] = f"already {enrollment.state}; nothing changed"
    return jsonify(view)


@bp.post("/enrollments/bulk-approve")
@require_admin
def bulk_approve():
    data = load_json(BulkApproveRequest())
    session = db()
    key = request.headers.get("Idempotency-Key", "").strip()[:128] or None
    job, created = bulk.create_job(session, current_user(), data["ids"], key, enqueue_bulk_job)
    session.commit()
    return jsonify(
        {
            "job_id": job.id,
            "created": created,
            "total": job.total,
            "status_url": f"/api/admin/jobs/{job.id}",
        }
    ), 202


@bp.get("/jobs/<job_id>")
@require_admin
def job(job_id: str):
    q = load_query(PageQuery())
    per_page = q["per_page"] if "per_page" in request.args else 1000
    return jsonify(
        bulk.job_view(
            db(),
            canonical_uuid(job_id),
            items_limit=per_page,
            items_offset=(q["page"] - 1) * per_page,
        )
    )


@bp.get("/audit")
@require_admin
def audit():
    """Every change made by a person: per enrollment (?enrollment_id=) or per admin (?admin_id=)."""
    q = load_query(PageQuery())
    stmt = select(EnrollmentHistory).where(EnrollmentHistory.actor_user_id.is_not(None))
    if q["admin_id"]:
        stmt = stmt.where(EnrollmentHistory.actor_user_id == q["admin_id"])
    if q["enrollment_id"]:
        stmt = stmt.where(EnrollmentHistory.enrollment_id == q["enrollment_id"])
    rows = db().scalars(
        stmt.order_by(EnrollmentHistory.id.desc())
        .offset((q["page"] - 1) * q["per_page"])
        .limit(q["per_page"])
    )
    return jsonify(
        {
            "items": [
                {
                    "id": h.id,
                    "enrollment_id": h.enrollment_id,
                    "from": h.from_state,
                    "to": h.to_state,
                    "actor": h.actor,
                    "actor_user_id": h.actor_user_id,
                    "source": h.source,
                    "reason": h.reason,
                    "at": h.created_at.isoformat(),
                }
                for h in rows
            ]
        }
    )


def dead_letter_view(letter: DeadLetter, event: WebhookEvent) -> dict:
    return {
        "id": letter.id,
        "event_id": letter.event_id,
        "stage": letter.stage,
        "error_code": letter.error_code,
        "error": letter.error,
        "attempts": letter.attempts,
        "created_at": letter.created_at.isoformat(),
        "replay_count": letter.replay_count,
        "replayed_at": letter.replayed_at.isoformat() if letter.replayed_at else None,
        "open": letter.resolved_at is None,
        "event": {
            "state": event.state,
            "stage": event.stage,
            "paylink_id": event.paylink_id,
            "external_transaction_id": event.external_transaction_id,
            "status": event.callback_status,
            "deliveries": event.deliveries,
            "received_at": event.received_at.isoformat(),
            "outcome": event.outcome,
        },
    }


@bp.get("/dead-letters")
@require_admin
def dead_letters():
    q = load_query(PageQuery())
    rows = runner.dead_letters(
        db(),
        include_replayed=request.args.get("all") in ("1", "true"),
        limit=q["per_page"],
        offset=(q["page"] - 1) * q["per_page"],
    )
    return jsonify({"items": [dead_letter_view(dl, ev) for dl, ev in rows]})


@bp.post("/dead-letters/<int:letter_id>/replay")
@require_admin
def replay(letter_id: int):
    data = load_json(ReplayRequest()) if request.get_data() else {"from_stage": None}
    session = db()
    letter = runner.replay(session, letter_id, enqueue_pipeline, data["from_stage"])
    event = session.get(WebhookEvent, letter.event_id)
    if event is None:
        raise NotFound(f"event {letter.event_id} does not exist")
    session.commit()
    return jsonify(dead_letter_view(letter, event)), 202
