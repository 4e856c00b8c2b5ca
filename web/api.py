"""The JSON API for students: enroll, read an enrollment, the course card, notifications."""

from __future__ import annotations

from datetime import timedelta

from flask import Blueprint, jsonify
from sqlalchemy import select

from models import Course, Enrollment, Notification
from pipeline.checkout import start_checkout
from pipeline.errors import NotFound
from pipeline.streams import issue_ticket
from web.auth import current_user, db, require_user
from web.extensions import gateway, settings
from web.schemas import EnrollmentRequest, PageQuery, load_json, load_query
from web.views import course_card, enrollment_view, notification_view

bp = Blueprint("api", __name__, url_prefix="/api")


def visible_enrollment(enrollment_id: int) -> Enrollment:
    """The enrollment if the caller may see it: its student, or an admin. Others get 404."""
    user = current_user()
    enrollment = db().get(Enrollment, enrollment_id)
    if enrollment is None or user is None or not (user.is_admin or enrollment.user_id == user.id):
        raise NotFound(f"enrollment {enrollment_id} does not exist")
    return enrollment


@bp.get("/me")
@require_user
def me():
    """Who the token belongs to: the pages show it, and ask before switching to another."""
    user = current_user()
    return jsonify({"id": user.id, "email": user.email, "role": user.role})


@bp.post("/stream-tickets")
@require_user
def stream_ticket():
    """A one-use ticket for GET /api/events?ticket= (a browser's EventSource cannot send the
    Authorization header, and the long-lived token must never stand in a URL)."""
    ttl = timedelta(seconds=settings().stream_ticket_seconds)
    ticket = issue_ticket(db(), current_user(), ttl)
    db().commit()
    return jsonify(
        {"ticket": ticket, "expires_in": int(ttl.total_seconds()), "url": settings().events_url}
    ), 201


@bp.post("/enrollments")
@require_user
def create_enrollment():
    data = load_json(EnrollmentRequest())
    session = db()
    checkout = start_checkout(
        session,
        settings(),
        gateway(),
        current_user(),
        data["course_id"],
        data["payment_method"],
    )
    session.commit()
    view = enrollment_view(session, checkout.enrollment)
    view["paylink_url"] = checkout.payment.paylink_url if checkout.payment else None
    view["created"] = checkout.enrollment_created
    view["new_payment"] = checkout.payment_created
    return jsonify(view), 201 if checkout.enrollment_created else 200


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


@bp.get("/enrollments/<id:enrollment_id>")
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


@bp.get("/courses/<id:course_id>/enrollment-state")
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
    return jsonify({"items": [notification_view(n) for n in rows]})
