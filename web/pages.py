"""Pages for people: the course list and the pages iKhokha sends the student back to."""

from __future__ import annotations

import structlog
from flask import Blueprint, current_app, render_template

from models import Enrollment, Payment, PaymentMethod, State
from pipeline.errors import GatewayError, NotFound, canonical_uuid
from pipeline.ikhokha import get_gateway
from pipeline.reconcile import feed_status
from web.auth import db
from workers.tasks import enqueue_pipeline

log = structlog.get_logger(__name__)
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
def payment_return(payment_id: str, outcome: str):
    """Where iKhokha sends the student back. It shows the enrollment's state and never grants
    access itself; if the callback has not come yet, it asks iKhokha and feeds the answer into
    the same idempotent pipeline, so redirect and webhook can race without harm."""
    settings = current_app.config["SETTINGS"]
    session = db()
    payment = session.get(Payment, canonical_uuid(payment_id))
    if payment is None:
        raise NotFound("no such payment")
    enrollment = session.get(Enrollment, payment.enrollment_id)
    assert enrollment is not None
    if (
        payment.method == PaymentMethod.CARD
        and payment.paylink_id
        and enrollment.state in (State.PENDING_PAYMENT, State.PAYMENT_FAILED)
    ):
        try:
            if feed_status(
                session,
                settings,
                get_gateway(settings),
                payment,
                enqueue_pipeline,
                source="return_page",
            ):
                session.commit()
        except GatewayError as exc:
            # The page still shows the state; the callback or reconciliation will settle it.
            log.warning("return_page.status_check_failed", kind=exc.kind)
    return render_template(
        "payment_return.html",
        outcome=outcome,
        enrollment=enrollment,
        payment=payment,
        message=MESSAGES.get(State(enrollment.state), ""),
    )
