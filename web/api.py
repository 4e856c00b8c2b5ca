"""The JSON API for students: enroll, read an enrollment, the course card, notifications."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify
from sqlalchemy import select

from models import Course, Enrollment, Notification
from pipeline.enrollments import course_card, enrollment_view, start_checkout
from pipeline.errors import NotFound
from pipeline.ikhokha import get_gateway
from web.auth import current_user, db, require_user
from web.schemas import EnrollmentRequest, PageQuery, load_json, load_query

bp = Blueprint("api", __name__, url_prefix="/api")


def visible_enrollment(enrollment_id: int) -> Enrollment:
    """The enrollment if the caller may see it: its student, or an admin. Others get 404."""
    user = current_user()
    enrollment = db().get(Enrollment, enrollment_id)
    if enrollment is None or user is None or not (user.is_admin or enrollment.user_id == user.id):
        raise NotFound(f"enrollment {enrollment_id} does not exist")
    return enrollment


@bp.post("/enrollments")
@require_user
def create_enrollment():
    data = load_json(EnrollmentRequest())
    settings = current_app.config["SETTINGS"]
    session = db()
    checkout = start_checkout(
        session,
        settings,
        get_gateway(settings),
        current_user(),
        data["course_id"],
        data["payment_method"],
    )
    session.commit()
    view = enrollment_view(session, checkout.enrollment)
    view["paylink_url"] = checkout.payment.paylink_url if checkout.payment else None
    view["created"] = checkout.created
    return jsonify(view), 201 if checkout.created else 200


@bp.get("/enrollments")
@require_user
def list_my_enrollments():
    rows = db().scalars(
        select(Enrollment)
        .where(Enrollment.user_id == current_user().id)
        .order_by(Enrollment.id.desc())
        .limit(200)
    )
    return jsonify({"items": [enrollment_view(db(), e, with_history=False) for e in rows]})


@bp.get("/enrollments/<int:enrollment_id>")
@require_user
def get_enrollment(enrollment_id: int):
    return jsonify(enrollment_view(db(), visible_enrollment(enrollment_id)))


@bp.get("/courses")
def list_courses():
    user = current_user()
    courses = db().scalars(select(Course).order_by(Course.id))
    return jsonify(
        {
            "items": [
                {
                    "id": c.id,
                    "title": c.title,
                    "price_cents": c.price_cents,
                    "currency": c.currency,
                    "card": course_card(db(), c.id, user),
                }
                for c in courses
            ]
        }
    )


@bp.get("/courses/<int:course_id>/enrollment-state")
def enrollment_state(course_id: int):
    return jsonify(course_card(db(), course_id, current_user()))


@bp.get("/notifications")
@require_user
def notifications():
    """Catch up on what was pushed live: everything after the id the client saw last."""
    query = load_query(PageQuery())
    user = current_user()
    if user.is_admin:
        mine = Notification.audience == "admins"
    else:
        mine = (Notification.audience == "student") & (Notification.user_id == user.id)
    rows = db().scalars(
        select(Notification)
        .where(mine, Notification.id > query["after"])
        .order_by(Notification.id)
        .limit(query["per_page"])
    )
    return jsonify(
        {
            "items": [
                {
                    "id": n.id,
                    "kind": n.kind,
                    "enrollment_id": n.enrollment_id,
                    "at": n.created_at.isoformat(),
                    **n.payload,
                }
                for n in rows
            ]
        }
    )
