"""Pages for people: the course list and the pages iKhokha sends the student back to."""

from __future__ import annotations

from datetime import timedelta

from flask import Blueprint, render_template

from models import Payment, State, on_commit
from pipeline.errors import NotFound, canonical_uuid
from pipeline.reconcile import claim_status_check, is_waiting
from web.auth import db
from web.extensions import limiter, settings, task_queue

bp = Blueprint("pages", __name__)

MESSAGES = {
    State.PENDING_PAYMENT: (
        "We are waiting for iKhokha to confirm your payment. This page updates by itself."
    ),
    State.PENDING_APPROVAL: "Your payment is waiting for an admin to approve it.",
    State.APPROVED: "You are enrolled. Enjoy the course!",
    State.PAYMENT_FAILED: "Your payment did not go through. You can try again.",
    State.REJECTED: "Your enrollment was rejected.",
    State.REFUNDED: "Your payment was refunded.",
    State.EXPIRED: "This enrollment expired before it was paid.",
}


@bp.get("/")
def home():
    return render_template("courses.html")


@bp.get("/admin")
def admin_page():
    return render_template("admin.html")


@bp.get("/payments/<payment_id>/<any(success, failure, cancel):outcome>")
@limiter.limit(lambda: settings().return_page_rate_limit)
def payment_return(payment_id: str, outcome: str):
    """Where iKhokha sends the student back. It shows the enrollment's state and never grants
    access itself. If the callback has not come yet, a worker asks iKhokha (at most once per
    payment per SKILLPAY_STATUS_CHECK_INTERVAL_SECONDS, never on this request's time) and
    feeds the answer into the same idempotent pipeline; the page refreshes until it settles."""
    session = db()
    payment = session.get(Payment, canonical_uuid(payment_id))
    if payment is None:
        raise NotFound("no such payment")
    enrollment = payment.enrollment
    interval = timedelta(seconds=settings().status_check_interval_seconds)
    if is_waiting(payment) and claim_status_check(session, payment.id, interval):
        on_commit(session, lambda: task_queue().payment_check(payment.id))
        session.commit()
    return render_template(
        "payment_return.html",
        outcome=outcome,
        enrollment=enrollment,
        payment=payment,
        message=MESSAGES.get(State(enrollment.state), ""),
    )
