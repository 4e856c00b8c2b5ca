"""What the API and the pages show of our rows: marshmallow dump schemas, and the course card.

Display lives here, on the web side; pipeline/ returns rows and outcomes.
"""

from __future__ import annotations

from typing import Any

from marshmallow import Schema, fields
from sqlalchemy import select
from sqlalchemy.orm import Session, joinedload

from models import (
    Course,
    DeadLetter,
    Enrollment,
    EnrollmentHistory,
    Notification,
    Payment,
    PaymentMethod,
    State,
    User,
)
from pipeline.bulk import JobProgress
from pipeline.errors import NotFound
from pipeline.payments import latest_payment, latest_payments


class PaymentView(Schema):
    id = fields.String()
    method = fields.String()
    amount_cents = fields.Integer()
    currency = fields.String()
    reference = fields.String()
    paylink_url = fields.String(allow_none=True)
    gateway_status = fields.String(allow_none=True)


class HistoryView(Schema):
    from_state = fields.String(data_key="from", allow_none=True)
    to_state = fields.String(data_key="to")
    actor = fields.String()
    source = fields.String()
    reason = fields.String(allow_none=True)
    event_id = fields.Integer(allow_none=True)
    created_at = fields.DateTime(data_key="at")


class AuditEntryView(HistoryView):
    """A change made by a person, for the audit trail."""

    class Meta:
        exclude = ("event_id",)

    id = fields.Integer()
    enrollment_id = fields.Integer()
    actor_user_id = fields.Integer(allow_none=True)


class EnrollmentView(Schema):
    id = fields.Integer()
    user_id = fields.Integer()
    course_id = fields.Integer()
    state = fields.String()
    course_access = fields.Boolean()
    payment_method = fields.String()
    waiting_reason = fields.String(allow_none=True)
    rejection_reason = fields.String(allow_none=True)
    created_at = fields.DateTime()
    updated_at = fields.DateTime()
    approved_at = fields.DateTime(allow_none=True)


class EventSummaryView(Schema):
    state = fields.String()
    enrollment_id = fields.Integer(allow_none=True)
    stage = fields.String()
    paylink_id = fields.String(allow_none=True)
    external_transaction_id = fields.String(allow_none=True)
    callback_status = fields.String(data_key="status", allow_none=True)
    deliveries = fields.Integer()
    received_at = fields.DateTime()
    outcome = fields.String(allow_none=True)


class DeadLetterView(Schema):
    id = fields.Integer()
    event_id = fields.Integer()
    stage = fields.String()
    error_code = fields.String()
    error = fields.String()
    attempts = fields.Integer()
    created_at = fields.DateTime()
    replay_count = fields.Integer()
    replayed_at = fields.DateTime(allow_none=True)
    open = fields.Function(lambda letter: letter.resolved_at is None)
    event = fields.Nested(EventSummaryView)


class RefundView(Schema):
    id = fields.String()
    enrollment_id = fields.Integer()
    payment_id = fields.String()
    amount_cents = fields.Integer()
    is_full = fields.Boolean(data_key="full")
    reason = fields.String()
    mode = fields.String()
    state = fields.String()
    gateway_reference = fields.String(allow_none=True)
    error = fields.String(allow_none=True)
    admin_user_id = fields.Integer()
    created_at = fields.DateTime()
    finished_at = fields.DateTime(allow_none=True)


class FlagView(Schema):
    id = fields.Integer()
    enrollment_id = fields.Integer()
    kind = fields.String()
    reason = fields.String()
    source = fields.String()
    created_at = fields.DateTime()
    cleared_at = fields.DateTime(allow_none=True)
    cleared_by = fields.Integer(allow_none=True)
    note = fields.String(allow_none=True)


class ApprovalRequestView(Schema):
    id = fields.Integer()
    enrollment_id = fields.Integer()
    amount_cents = fields.Integer()
    requested_by = fields.Integer()
    requested_at = fields.DateTime()
    confirmed_by = fields.Integer(allow_none=True)
    confirmed_at = fields.DateTime(allow_none=True)
    cancelled_at = fields.DateTime(allow_none=True)


class FindingView(Schema):
    id = fields.Integer()
    kind = fields.String()
    action = fields.String()
    enrollment_id = fields.Integer(allow_none=True)
    payment_id = fields.String(allow_none=True)
    detail = fields.String()


class ReconciliationRunView(Schema):
    id = fields.Integer()
    trigger = fields.String()
    started_at = fields.DateTime()
    finished_at = fields.DateTime(allow_none=True)
    checked = fields.Integer()


class StatementView(Schema):
    id = fields.Integer()
    filename = fields.String()
    format = fields.String()
    imported_by = fields.Integer()
    imported_at = fields.DateTime()
    line_count = fields.Integer()
    already_imported = fields.Integer()


class StatementLineView(Schema):
    id = fields.Integer()
    line_no = fields.Integer()
    booked_on = fields.Date()
    description = fields.String()
    amount_cents = fields.Integer()
    reference = fields.String(allow_none=True)
    match = fields.String()
    enrollment_id = fields.Integer(allow_none=True)
    reason = fields.String()
    state = fields.String()
    confirmed_by = fields.Integer(allow_none=True)
    confirmed_at = fields.DateTime(allow_none=True)
    job_id = fields.String(allow_none=True)


class JobItemView(Schema):
    enrollment_id = fields.Integer()
    outcome = fields.String()
    detail = fields.String(allow_none=True)


class JobView(Schema):
    id = fields.String()
    kind = fields.String()
    state = fields.String()
    admin_user_id = fields.Integer()
    total = fields.Integer()
    created_at = fields.DateTime()
    started_at = fields.DateTime(allow_none=True)
    finished_at = fields.DateTime(allow_none=True)


def enrollment_view(
    session: Session,
    enrollment: Enrollment,
    *,
    with_history: bool = True,
    payments: dict[int, Payment] | None = None,
) -> dict[str, Any]:
    """An enrollment as GET /api/enrollments/<id> shows it: its latest payment, its history.
    `payments`: the latest payments of a whole page, loaded at once (enrollment_list)."""
    view: dict[str, Any] = EnrollmentView().dump(enrollment)
    if payments is None:
        payment = latest_payment(session, enrollment.id)
    else:
        payment = payments.get(enrollment.id)
    view["payment"] = PaymentView().dump(payment) if payment is not None else None
    if with_history:
        rows = session.scalars(
            select(EnrollmentHistory)
            .where(EnrollmentHistory.enrollment_id == enrollment.id)
            .order_by(EnrollmentHistory.id)
        )
        view["history"] = HistoryView(many=True).dump(rows)
    return view


def enrollment_list(session: Session, enrollments: list[Enrollment]) -> list[dict[str, Any]]:
    """A page of enrollments as the admin lists show them (the queue, search): each with its
    latest payment, its student's e-mail and its course's title, in a fixed number of queries
    however long the page (load the enrollments with LIST_LOADS)."""
    payments = latest_payments(session, [e.id for e in enrollments])
    views = []
    for enrollment in enrollments:
        view = enrollment_view(session, enrollment, with_history=False, payments=payments)
        view["student_email"] = enrollment.user.email
        view["course_title"] = enrollment.course.title
        views.append(view)
    return views


# Load an admin list's enrollments with their students and courses (enrollment_list).
LIST_LOADS = (joinedload(Enrollment.user), joinedload(Enrollment.course))


def job_view(progress: JobProgress) -> dict[str, Any]:
    job = progress.job
    view: dict[str, Any] = JobView().dump(job)
    view.update(
        done=progress.done,
        progress=round(progress.done / job.total, 4) if job.total else 1.0,
        counts=progress.counts,
        items=JobItemView(many=True).dump(progress.items),
    )
    return view


def notification_view(row: Notification) -> dict[str, Any]:
    return {
        "id": row.id,
        "kind": row.kind,
        "enrollment_id": row.enrollment_id,
        "at": row.created_at.isoformat(),
        **row.payload,
    }


def dead_letter_view(letter: DeadLetter) -> dict[str, Any]:
    return DeadLetterView().dump(letter)  # type: ignore[no-any-return]


# The course card's button, per the caller's latest enrollment in the course (seed design).
CARD_BUTTONS: dict[str | None, tuple[str, str, bool]] = {
    None: ("Enroll Now", "initiate_enrollment", False),
    State.PENDING_PAYMENT: ("Complete Payment", "continue_payment", False),
    State.PENDING_APPROVAL: ("Pending Approval", "show_pending", True),
    State.APPROVED: ("Continue Course", "continue_course", False),
    State.PAYMENT_FAILED: ("Retry Payment", "retry_payment", False),
}
SIGNED_OUT_CARD = ("Register To Enroll", "redirect_to_auth", False)


def course_card(session: Session, course_id: int, user: User | None) -> dict[str, Any]:
    """The course card for this caller: button text, action, and what to tell them."""
    if session.get(Course, course_id) is None:
        raise NotFound(f"course {course_id} does not exist")
    if user is None:
        text, action, disabled = SIGNED_OUT_CARD
        return {
            "course_id": course_id,
            "state": None,
            "button_text": text,
            "action": action,
            "disabled": disabled,
            "course_access": False,
        }
    enrollment = session.scalar(
        select(Enrollment)
        .where(Enrollment.user_id == user.id, Enrollment.course_id == course_id)
        .order_by(Enrollment.created_at.desc())
        .limit(1)
    )
    state = enrollment.state if enrollment is not None else None
    text, action, disabled = CARD_BUTTONS.get(state, CARD_BUTTONS[None])
    card: dict[str, Any] = {
        "course_id": course_id,
        "state": state,
        "button_text": text,
        "action": action,
        "disabled": disabled,
        "course_access": bool(enrollment and enrollment.course_access),
        "enrollment_id": enrollment.id if enrollment else None,
    }
    if enrollment is None:
        return card
    if enrollment.state == State.REJECTED:
        card["message"] = f"Your enrollment was rejected: {enrollment.rejection_reason}"
    if enrollment.state == State.PENDING_PAYMENT:
        payment = latest_payment(session, enrollment.id)
        card["paylink_url"] = payment.paylink_url if payment else None
    if (
        enrollment.state == State.PENDING_APPROVAL
        and enrollment.payment_method == PaymentMethod.EFT
    ):
        payment = latest_payment(session, enrollment.id)
        if payment is not None:
            card["message"] = (
                f"Pay by bank transfer with reference {payment.reference}; "
                "an admin approves once the money arrives."
            )
    return card
