"""Admin endpoints: the approval queue, decisions, refunds, flags, bulk jobs, audit, dead
letters, reconciliation and bank statements."""

from __future__ import annotations

from datetime import timedelta

from flask import Blueprint, jsonify, request
from sqlalchemy import func, select

from models import (
    ApprovalRequest,
    BankStatement,
    DeadLetter,
    Enrollment,
    EnrollmentFlag,
    EnrollmentHistory,
    ReconciliationFinding,
    ReconciliationRun,
    State,
    utcnow,
)
from pipeline import bulk, statements
from pipeline.dead_letters import (
    list_dead_letters,
    open_letters_by_enrollment,
    replay_dead_letter,
)
from pipeline.decisions import (
    Decision,
    approve_enrollment,
    needs_individual_review,
    needs_two_admins,
    open_requests,
    reject_enrollment,
)
from pipeline.errors import NotFound, canonical_uuid
from pipeline.flags import clear_flag, open_flags
from pipeline.payments import rand
from pipeline.reconcile import counts_by_kind
from pipeline.refunds import refund_enrollment
from web.auth import current_user, db, require_admin
from web.extensions import gateway, settings, task_queue
from web.schemas import (
    BulkApproveRequest,
    ConfirmRequest,
    NoteRequest,
    PageQuery,
    QueueQuery,
    RefundRequest,
    RejectRequest,
    ReplayRequest,
    StatementQuery,
    load_json,
    load_query,
)
from web.views import (
    LIST_LOADS,
    ApprovalRequestView,
    AuditEntryView,
    FindingView,
    FlagView,
    ReconciliationRunView,
    RefundView,
    StatementLineView,
    StatementView,
    dead_letter_view,
    enrollment_list,
    enrollment_view,
    job_view,
)

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
    order = [Enrollment.waiting_since, Enrollment.created_at, Enrollment.id]
    if q["sort"] == "-waiting":
        order = [column.desc() for column in order]
    rows = list(
        db().scalars(
            stmt.options(*LIST_LOADS)
            .order_by(*order)
            .offset((q["page"] - 1) * q["per_page"])
            .limit(q["per_page"])
        )
    )
    sla = settings().approval_sla_hours * 3600
    requests = open_requests(db(), [e.id for e in rows])
    now = utcnow()
    items = []
    for e, view in zip(rows, enrollment_list(db(), rows), strict=True):
        view["flagged"] = needs_individual_review(e)
        view["waiting_since"] = e.waiting_since.isoformat() if e.waiting_since else None
        if e.waiting_since is not None:
            waited = (now - e.waiting_since).total_seconds()
            view.update(waited_seconds=round(waited), overdue=waited > sla)
        view["four_eyes"] = _four_eyes(view, requests.get(e.id))
        items.append(view)
    return jsonify(
        {
            "items": items,
            "page": q["page"],
            "per_page": q["per_page"],
            "total": total,
            "sla_seconds": round(sla),
            "four_eyes_above_cents": settings().four_eyes_above_cents or None,
        }
    )


def _four_eyes(view: dict, request: ApprovalRequest | None) -> dict | None:
    """Whether the row needs two admins, and who asked first (None: one admin approves)."""
    amount = view["payment"]["amount_cents"] if view["payment"] else None
    if view["state"] != State.PENDING_APPROVAL or not needs_two_admins(settings(), amount):
        return None
    return {
        "request": ApprovalRequestView().dump(request) if request is not None else None,
        "requested_by_me": request is not None and request.requested_by == current_user().id,
    }


@bp.post("/enrollments/<id:enrollment_id>/approve")
@require_admin
def approve(enrollment_id: int):
    return _decided(approve_enrollment(db(), settings(), enrollment_id, current_user()))


@bp.post("/enrollments/<id:enrollment_id>/reject")
@require_admin
def reject(enrollment_id: int):
    reason = load_json(RejectRequest())["reason"]
    return _decided(reject_enrollment(db(), settings(), enrollment_id, current_user(), reason))


def _decided(decision: Decision):
    """Commit an admin's decision and answer with the enrollment and whether it changed;
    202 when the approval now waits for a second admin (four-eyes)."""
    session = db()
    session.commit()
    result = decision.transition
    assert result.enrollment is not None
    view = enrollment_view(session, result.enrollment)
    view["changed"] = result.changed
    if decision.awaiting is not None:
        view["four_eyes"] = ApprovalRequestView().dump(decision.awaiting)
        view["message"] = (
            f"{rand(decision.awaiting.amount_cents)} is above the four-eyes amount "
            f"({rand(settings().four_eyes_above_cents)}): another admin must approve it too"
        )
        return jsonify(view), 202
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


def _idempotency_key() -> str | None:
    return request.headers.get("Idempotency-Key", "").strip()[:128] or None


@bp.post("/enrollments/<id:enrollment_id>/refund")
@require_admin
def refund(enrollment_id: int):
    """Refund an approved enrollment: in full (access ends) or, with amount_cents, in part."""
    data = load_json(RefundRequest())
    session = db()
    result = refund_enrollment(
        session,
        settings(),
        gateway(),
        enrollment_id,
        current_user(),
        reason=data["reason"],
        amount_cents=data["amount_cents"],
        idempotency_key=_idempotency_key(),
    )
    session.commit()
    enrollment = session.get(Enrollment, enrollment_id)
    assert enrollment is not None
    body = {
        "refund": RefundView().dump(result.refund),
        # False: the same refund asked for again (Idempotency-Key, or refunded in full already)
        "changed": result.created,
        "enrollment": enrollment_view(session, enrollment),
    }
    return jsonify(body), 201 if result.created else 200


@bp.get("/attention")
@require_admin
def attention():
    """What needs an admin, oldest first: enrollments flagged (reconciliation's findings, a
    payment made twice) and dead-lettered events whose enrollment is known."""
    q = load_query(PageQuery())
    session = db()
    # The page is cut from both lists merged by time: take enough of each, dump only the page.
    end = q["page"] * q["per_page"]
    needing = [
        (flag.created_at, flag, flag.enrollment_id) for flag in open_flags(session, limit=end)
    ]
    needing += [
        (letter.created_at, letter, enrollment_id)
        for letter, enrollment_id in open_letters_by_enrollment(session, limit=end)
    ]
    needing.sort(key=lambda row: row[0])
    items = []
    for _, row, enrollment_id in needing[end - q["per_page"] : end]:
        item = FlagView().dump(row) if isinstance(row, EnrollmentFlag) else _dead_letter_item(row)
        enrollment = session.get(Enrollment, enrollment_id)
        assert enrollment is not None
        item["enrollment_id"] = enrollment_id
        item["enrollment"] = enrollment_view(session, enrollment, with_history=False)
        item["enrollment"]["student_email"] = enrollment.user.email
        items.append(item)
    return jsonify({"items": items})


def _dead_letter_item(letter: DeadLetter) -> dict:
    """A dead letter in the attention list, shaped like a flag (kind dead_letter, no flag id)."""
    return {
        "id": None,
        "kind": "dead_letter",
        "dead_letter_id": letter.id,
        "reason": f"dead letter #{letter.id} at {letter.stage}: {letter.error}",
        "source": "pipeline",
        "created_at": letter.created_at.isoformat(),
        "stage": letter.stage,
    }


@bp.post("/flags/<id:flag_id>/clear")
@require_admin
def clear(flag_id: int):
    note = load_json(NoteRequest())["note"]
    session = db()
    flag = clear_flag(session, flag_id, current_user(), note)
    session.commit()
    return jsonify(FlagView().dump(flag))


@bp.get("/reconciliation")
@require_admin
def reconciliation():
    """The latest reconciliation runs, each with what it found."""
    q = load_query(PageQuery())
    session = db()
    runs = list(
        session.scalars(
            select(ReconciliationRun)
            .order_by(ReconciliationRun.id.desc())
            .offset((q["page"] - 1) * q["per_page"])
            .limit(min(q["per_page"], 20))
        )
    )
    findings: dict[int, list[ReconciliationFinding]] = {run.id: [] for run in runs}
    for finding in session.scalars(
        select(ReconciliationFinding)
        .where(ReconciliationFinding.run_id.in_(list(findings)))
        .order_by(ReconciliationFinding.id)
    ):
        findings[finding.run_id].append(finding)
    items = []
    for run in runs:
        view = ReconciliationRunView().dump(run)
        view["counts"] = counts_by_kind(findings[run.id])
        for kind in ("paid_not_enrolled", "enrolled_not_paid", "amount_mismatch"):
            view[kind] = [f.enrollment_id for f in findings[run.id] if f.kind == kind]
        view["errors"] = [f.detail for f in findings[run.id] if f.kind == "error"]
        view["findings"] = FindingView(many=True).dump(findings[run.id])
        items.append(view)
    return jsonify({"items": items})


@bp.post("/statements")
@require_admin
def import_statement():
    """Import a bank statement: a multipart upload (field `file`) or the file as the body."""
    request.max_content_length = statements.MAX_BYTES
    q = load_query(StatementQuery())
    upload = request.files.get("file")
    data = upload.read() if upload is not None else request.get_data()
    filename = (upload.filename if upload is not None else None) or q["filename"]
    session = db()
    imported = statements.import_statement(
        session, settings(), current_user(), data, filename, q["format"]
    )
    session.commit()
    return jsonify(_statement(imported.statement, imported.lines, imported.created)), (
        201 if imported.created else 200
    )


@bp.get("/statements")
@require_admin
def list_statements():
    q = load_query(PageQuery())
    session = db()
    rows = list(
        session.scalars(
            select(BankStatement)
            .order_by(BankStatement.id.desc())
            .offset((q["page"] - 1) * q["per_page"])
            .limit(q["per_page"])
        )
    )
    counts = statements.match_counts(session, [row.id for row in rows])
    return jsonify(
        {"items": [StatementView().dump(row) | {"counts": counts[row.id]} for row in rows]}
    )


@bp.get("/statements/<id:statement_id>")
@require_admin
def statement(statement_id: int):
    q = load_query(StatementQuery())
    session = db()
    row = session.get(BankStatement, statement_id)
    if row is None:
        raise NotFound(f"bank statement {statement_id} does not exist")
    return jsonify(_statement(row, statements.statement_lines(session, row.id, q["match"])))


@bp.post("/statements/<id:statement_id>/approve-exact")
@require_admin
def confirm_statement(statement_id: int):
    """Approve the statement's exact matches (or the listed lines among them) as a bulk job."""
    data = load_json(ConfirmRequest()) if request.get_data() else {"line_ids": None}
    session = db()
    confirmed = statements.confirm_matches(
        session, statement_id, current_user(), task_queue().bulk_job, data["line_ids"]
    )
    session.commit()
    if confirmed.job is None:
        return jsonify({"confirmed": 0, "job_id": None, "message": "nothing left to confirm"})
    return jsonify(
        {
            "confirmed": len(confirmed.line_ids),
            "line_ids": confirmed.line_ids,
            "job_id": confirmed.job.id,
            "status_url": f"/api/admin/jobs/{confirmed.job.id}",
        }
    ), 202


def _statement(row: BankStatement, lines: list, created: bool | None = None) -> dict:
    view = StatementView().dump(row)
    view["counts"] = statements.match_counts(db(), [row.id])[row.id]
    view["lines"] = StatementLineView(many=True).dump(lines)
    if created is not None:
        view["created"] = created
    return view
