"""Admin endpoints: the approval queue, decisions, bulk jobs, audit, dead letters."""

from __future__ import annotations

from datetime import timedelta

from flask import Blueprint, jsonify, request
from sqlalchemy import func, select

from models import Enrollment, EnrollmentHistory, utcnow
from pipeline import bulk
from pipeline.dead_letters import list_dead_letters, replay_dead_letter
from pipeline.decisions import approve_enrollment, needs_individual_review, reject_enrollment
from pipeline.errors import canonical_uuid
from pipeline.state_machine import Transition
from web.auth import current_user, db, require_admin
from web.extensions import settings, task_queue
from web.schemas import (
    BulkApproveRequest,
    PageQuery,
    QueueQuery,
    RejectRequest,
    ReplayRequest,
    load_json,
    load_query,
)
from web.views import AuditEntryView, dead_letter_view, enrollment_view, job_view

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
        view["flagged"] = needs_individual_review(e)
        items.append(view)
    return jsonify({"items": items, "page": q["page"], "per_page": q["per_page"], "total": total})


@bp.post("/enrollments/<id:enrollment_id>/approve")
@require_admin
def approve(enrollment_id: int):
    return _decided(approve_enrollment(db(), settings(), enrollment_id, current_user()))


@bp.post("/enrollments/<id:enrollment_id>/reject")
@require_admin
def reject(enrollment_id: int):
    reason = load_json(RejectRequest())["reason"]
    return _decided(reject_enrollment(db(), settings(), enrollment_id, current_user(), reason))


def _decided(result: Transition):
    """Commit an admin's decision and answer with the enrollment and whether it changed."""
    session = db()
    session.commit()
    assert result.enrollment is not None
    view = enrollment_view(session, result.enrollment)
    view["changed"] = result.changed
    if not result.changed:
        view["message"] = f"already {result.enrollment.state}; nothing changed"
    return jsonify(view)


@bp.post("/enrollments/bulk-approve")
@require_admin
def bulk_approve():
    data = load_json(BulkApproveRequest())
    session = db()
    key = request.headers.get("Idempotency-Key", "").strip()[:128] or None
    job, created = bulk.create_job(session, current_user(), data["ids"], key, task_queue().bulk_job)
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
    progress = bulk.job_progress(
        db(), canonical_uuid(job_id), limit=per_page, offset=(q["page"] - 1) * per_page
    )
    return jsonify(job_view(progress))


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
    return jsonify({"items": AuditEntryView(many=True).dump(rows)})


@bp.get("/dead-letters")
@require_admin
def dead_letters():
    q = load_query(PageQuery())
    rows = list_dead_letters(
        db(),
        include_replayed=request.args.get("all") in ("1", "true"),
        limit=q["per_page"],
        offset=(q["page"] - 1) * q["per_page"],
    )
    return jsonify({"items": [dead_letter_view(letter) for letter in rows]})


@bp.post("/dead-letters/<id:letter_id>/replay")
@require_admin
def replay(letter_id: int):
    data = load_json(ReplayRequest()) if request.get_data() else {"from_stage": None}
    session = db()
    letter = replay_dead_letter(session, letter_id, task_queue().stage, data["from_stage"])
    session.commit()
    return jsonify(dead_letter_view(letter)), 202
