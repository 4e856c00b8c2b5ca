"""The operator's console behind /admin: search, an enrollment's whole trail, the bulk jobs,
and what the page needs to know (stages to replay from, where Flower is)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from flask import Blueprint, jsonify
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from models import (
    ApprovalRequest,
    BankStatement,
    BulkJob,
    BulkJobItem,
    DeadLetter,
    Enrollment,
    EnrollmentFlag,
    EnrollmentHistory,
    Payment,
    Refund,
    StatementLine,
    User,
    WebhookEvent,
)
from pipeline.bulk import JobProgress
from pipeline.errors import NotFound
from pipeline.payments import rand
from pipeline.stages import STAGE_NAMES
from pipeline.statements import find_references
from web.auth import db, require_admin
from web.extensions import settings
from web.schemas import PageQuery, SearchQuery, load_query
from web.views import LIST_LOADS, enrollment_list, enrollment_view, job_view

bp = Blueprint("console", __name__, url_prefix="/api/admin")

SEARCH_LIMIT = 50
MAX_ENROLLMENT_ID_DIGITS = 18  # fits a BIGINT


@bp.get("/console")
@require_admin
def console():
    """What the console page shows around the data: where Flower is, the stages a dead
    letter can be replayed from, the queue's SLA and the four-eyes amount."""
    s = settings()
    return jsonify(
        {
            "flower_url": s.flower_url or None,
            "stages": list(STAGE_NAMES),
            "sla_seconds": round(s.approval_sla_hours * 3600),
            "four_eyes_above_cents": s.four_eyes_above_cents or None,
        }
    )


@bp.get("/search")
@require_admin
def search():
    """Enrollments by student e-mail (any part of it), payment reference (SP-XXXXXXXX, in any
    case or spacing), iKhokha paylink id or our payment id, or enrollment id; newest first."""
    q = load_query(SearchQuery())["q"].strip()
    if not q:
        return jsonify({"items": [], "q": q})
    session = db()
    matches = [Payment.paylink_id == q, Payment.id == q.lower()]
    references = find_references(q)
    if references:
        matches.append(Payment.reference.in_(references))
    if q.isdigit() and len(q) <= MAX_ENROLLMENT_ID_DIGITS:
        matches.append(Enrollment.id == int(q))
    if len(q) >= 3:
        pattern = (
            "%" + q.lower().replace("\\", "\\\\").replace("%", r"\%").replace("_", r"\_") + "%"
        )
        matches.append(func.lower(User.email).like(pattern, escape="\\"))
    ids = (
        select(Enrollment.id)
        .join(User, User.id == Enrollment.user_id)
        .outerjoin(Payment, Payment.enrollment_id == Enrollment.id)
        .where(or_(*matches))
    )
    rows = session.scalars(
        select(Enrollment)
        .options(*LIST_LOADS)
        .where(Enrollment.id.in_(ids))
        .order_by(Enrollment.created_at.desc(), Enrollment.id.desc())
        .limit(SEARCH_LIMIT)
    )
    return jsonify({"items": enrollment_list(session, list(rows)), "q": q})


@bp.get("/enrollments/<id:enrollment_id>/trail")
@require_admin
def trail(enrollment_id: int):
    """Everything that happened to an enrollment, in order: its changes of state and who made
    them, its payments, every callback about them and where each went (dead letters too),
    refunds, flags, four-eyes requests and bank statement lines."""
    session = db()
    enrollment = session.get(Enrollment, enrollment_id)
    if enrollment is None:
        raise NotFound(f"enrollment {enrollment_id} does not exist")
    entries = _trail(session, enrollment)
    view = enrollment_view(session, enrollment, with_history=False)
    view["student_email"] = enrollment.user.email
    view["course_title"] = enrollment.course.title
    return jsonify({"enrollment": view, "trail": entries})


def _trail(session: Session, enrollment: Enrollment) -> list[dict[str, Any]]:
    entries: list[tuple[datetime, int, dict[str, Any]]] = []
    people: set[int] = set()

    def add(at: datetime, kind: str, text: str, user_id: int | None = None, **extra: Any) -> None:
        if user_id is not None:
            people.add(user_id)
        entry = {"at": at.isoformat(), "kind": kind, "text": text, "user_id": user_id, **extra}
        entries.append((at, len(entries), entry))

    eid = enrollment.id
    for h in session.scalars(
        select(EnrollmentHistory).where(EnrollmentHistory.enrollment_id == eid)
    ):
        move = f"{h.from_state or 'new'} -> {h.to_state}"
        text = f"{move} by {h.actor} ({h.source})" + (f": {h.reason}" if h.reason else "")
        add(h.created_at, "state", text, h.actor_user_id, event_id=h.event_id)
    payments = list(session.scalars(select(Payment).where(Payment.enrollment_id == eid)))
    for p in payments:
        link = f", paylink {p.paylink_id}" if p.paylink_id else ""
        add(
            p.created_at,
            "payment",
            f"{p.method} payment {p.reference} for {rand(p.amount_cents)}{link}",
        )
    payment_ids = [p.id for p in payments]
    paylinks = [p.paylink_id for p in payments if p.paylink_id]
    events = list(
        session.scalars(
            select(WebhookEvent).where(
                or_(
                    WebhookEvent.enrollment_id == eid,
                    WebhookEvent.payment_id.in_(payment_ids),
                    WebhookEvent.paylink_id.in_(paylinks),
                )
            )
        )
    )
    for e in events:
        where = e.outcome or f"{e.state} at {e.stage}"
        add(
            e.received_at,
            "callback",
            f"callback {e.callback_status or '?'} (event {e.id}, "
            f"{e.deliveries} deliveries): {where}",
            event_id=e.id,
        )
    for letter in session.scalars(
        select(DeadLetter).where(DeadLetter.event_id.in_([e.id for e in events]))
    ):
        add(
            letter.created_at,
            "dead_letter",
            f"dead letter #{letter.id} at {letter.stage} after {letter.attempts} attempt(s): "
            f"{letter.error}",
            dead_letter_id=letter.id,
            open=letter.resolved_at is None,
        )
        if letter.replayed_at is not None:
            add(letter.replayed_at, "replay", f"dead letter #{letter.id} replayed")
    for r in session.scalars(select(Refund).where(Refund.enrollment_id == eid)):
        kind = "full" if r.is_full else "partial"
        add(
            r.created_at,
            "refund",
            f"{kind} refund of {rand(r.amount_cents)} ({r.mode}, {r.state}): {r.reason}",
            r.admin_user_id,
        )
    for f in session.scalars(select(EnrollmentFlag).where(EnrollmentFlag.enrollment_id == eid)):
        add(f.created_at, "flag", f"flagged {f.kind} by {f.source}: {f.reason}")
        if f.cleared_at is not None:
            add(f.cleared_at, "flag", f"flag {f.kind} cleared: {f.note}", f.cleared_by)
    for a in session.scalars(select(ApprovalRequest).where(ApprovalRequest.enrollment_id == eid)):
        add(
            a.requested_at, "four_eyes", f"approval of {rand(a.amount_cents)} asked", a.requested_by
        )
        if a.confirmed_at is not None:
            add(a.confirmed_at, "four_eyes", "approval confirmed by a second admin", a.confirmed_by)
        if a.cancelled_at is not None:
            add(a.cancelled_at, "four_eyes", "approval request cancelled")
    for line, imported_at in session.execute(
        select(StatementLine, BankStatement.imported_at)
        .join(BankStatement, BankStatement.id == StatementLine.statement_id)
        .where(StatementLine.enrollment_id == eid)
    ):
        add(
            line.confirmed_at or imported_at,
            "statement",
            f"bank statement {line.statement_id} line {line.line_no}: {rand(line.amount_cents)} "
            f"'{line.description}' ({line.match}, {line.state})",
            line.confirmed_by,
        )
    emails = dict(session.execute(select(User.id, User.email).where(User.id.in_(people))).all())
    ordered = [entry for _, _, entry in sorted(entries, key=lambda t: (t[0], t[1]))]
    for entry in ordered:
        entry["user_email"] = emails.get(entry["user_id"])
    return ordered


@bp.get("/jobs")
@require_admin
def jobs():
    """The latest bulk jobs, newest first, each with its items counted by outcome."""
    q = load_query(PageQuery())
    session = db()
    rows = list(
        session.scalars(
            select(BulkJob)
            .order_by(BulkJob.created_at.desc(), BulkJob.id)
            .offset((q["page"] - 1) * q["per_page"])
            .limit(q["per_page"])
        )
    )
    counts: dict[str, dict[str, int]] = {
        job.id: dict.fromkeys(("pending", "approved", "skipped", "failed"), 0) for job in rows
    }
    for job_id, outcome, count in session.execute(
        select(BulkJobItem.job_id, BulkJobItem.outcome, func.count())
        .where(BulkJobItem.job_id.in_(list(counts)))
        .group_by(BulkJobItem.job_id, BulkJobItem.outcome)
    ):
        counts[job_id][outcome] = count
    items = []
    for job in rows:
        view = job_view(JobProgress(job, counts[job.id], []))
        del view["items"]  # GET /api/admin/jobs/<id> lists them
        items.append(view | {"status_url": f"/api/admin/jobs/{job.id}"})
    return jsonify({"items": items})
