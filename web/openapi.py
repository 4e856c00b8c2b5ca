"""The API's OpenAPI document, generated from the same marshmallow schemas that validate the
requests and shape the answers (apispec), served at /api/openapi.json.

Each operation is listed once below with what it takes and every status it can answer with;
schemathesis fuzzes the running app against this document in CI (tests/integration).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Blueprint, jsonify
from marshmallow import EXCLUDE, Schema, fields

from web import schemas, views

bp = Blueprint("openapi", __name__)


class Open(Schema):
    """Answers may grow new fields: clients ignore what they do not know."""

    class Meta:
        unknown = EXCLUDE


class ErrorBody(Open):
    code = fields.String(required=True)
    message = fields.String(required=True)


class Error(Open):
    error = fields.Nested(ErrorBody, required=True)


class Payment(views.PaymentView, Open):
    pass


class History(views.HistoryView, Open):
    pass


class Enrollment(views.EnrollmentView, Open):
    payment = fields.Nested(Payment, allow_none=True)
    history = fields.List(fields.Nested(History))
    # Only in some answers: see each operation.
    paylink_url = fields.String(allow_none=True)
    created = fields.Boolean()
    new_payment = fields.Boolean()
    changed = fields.Boolean()
    message = fields.String()
    student_email = fields.String()
    course_title = fields.String()
    flagged = fields.Boolean()
    waiting_since = fields.String(allow_none=True)
    waited_seconds = fields.Integer()
    overdue = fields.Boolean()
    four_eyes = fields.Dict(allow_none=True)


class EnrollmentList(Open):
    items = fields.List(fields.Nested(Enrollment), required=True)


class Queue(EnrollmentList):
    page = fields.Integer(required=True)
    per_page = fields.Integer(required=True)
    total = fields.Integer(required=True)
    sla_seconds = fields.Integer()
    four_eyes_above_cents = fields.Integer(allow_none=True)


class Search(EnrollmentList):
    q = fields.String(required=True)


class TrailEntry(Open):
    at = fields.String(required=True)
    kind = fields.String(required=True)
    text = fields.String(required=True)
    user_id = fields.Integer(allow_none=True)
    user_email = fields.String(allow_none=True)


class Trail(Open):
    enrollment = fields.Nested(Enrollment, required=True)
    trail = fields.List(fields.Nested(TrailEntry), required=True)


class Console(Open):
    flower_url = fields.String(allow_none=True, required=True)
    stages = fields.List(fields.String(), required=True)
    sla_seconds = fields.Integer(required=True)
    four_eyes_above_cents = fields.Integer(allow_none=True, required=True)


class Me(Open):
    id = fields.Integer(required=True)
    email = fields.String(required=True)
    role = fields.String(required=True)


class CourseCard(Open):
    course_id = fields.Integer(required=True)
    state = fields.String(allow_none=True, required=True)
    button_text = fields.String(required=True)
    action = fields.String(required=True)
    disabled = fields.Boolean(required=True)
    course_access = fields.Boolean(required=True)
    enrollment_id = fields.Integer(allow_none=True)
    message = fields.String()
    paylink_url = fields.String(allow_none=True)


class Course(Open):
    id = fields.Integer(required=True)
    title = fields.String(required=True)
    price_cents = fields.Integer(required=True)
    currency = fields.String(required=True)
    card = fields.Nested(CourseCard, required=True)


class Courses(Open):
    items = fields.List(fields.Nested(Course), required=True)


class NotificationItem(Open):
    id = fields.Integer(required=True)
    kind = fields.String(required=True)
    enrollment_id = fields.Integer(required=True)
    at = fields.String(required=True)


class Notifications(Open):
    items = fields.List(fields.Nested(NotificationItem), required=True)


class BulkJobCreated(Open):
    job_id = fields.String(required=True)
    created = fields.Boolean(required=True)
    total = fields.Integer(required=True)
    status_url = fields.String(required=True)


class Job(views.JobView, Open):
    done = fields.Integer()
    progress = fields.Float()
    counts = fields.Dict(keys=fields.String(), values=fields.Integer())
    items = fields.List(fields.Nested(views.JobItemView))


class Audit(Open):
    items = fields.List(fields.Nested(views.AuditEntryView), required=True)


class DeadLetter(views.DeadLetterView, Open):
    open = fields.Boolean()


class DeadLetters(Open):
    items = fields.List(fields.Nested(DeadLetter), required=True)


class Jobs(Open):
    items = fields.List(fields.Nested(Job), required=True)


class RefundDone(Open):
    refund = fields.Nested(views.RefundView, required=True)
    changed = fields.Boolean(required=True)
    enrollment = fields.Nested(Enrollment, required=True)


class FlagItem(views.FlagView, Open):
    """A flag, or (kind dead_letter, id null) a dead-lettered event of the enrollment."""

    id = fields.Integer(allow_none=True)
    enrollment = fields.Nested(Enrollment)
    dead_letter_id = fields.Integer()
    stage = fields.String()


class Flags(Open):
    items = fields.List(fields.Nested(FlagItem), required=True)


class ReconciliationRun(views.ReconciliationRunView, Open):
    counts = fields.Dict(keys=fields.String(), values=fields.Integer())
    paid_not_enrolled = fields.List(fields.Integer(allow_none=True))
    enrolled_not_paid = fields.List(fields.Integer(allow_none=True))
    amount_mismatch = fields.List(fields.Integer(allow_none=True))
    errors = fields.List(fields.String())
    findings = fields.List(fields.Nested(views.FindingView))


class ReconciliationRuns(Open):
    items = fields.List(fields.Nested(ReconciliationRun), required=True)


class Statement(views.StatementView, Open):
    counts = fields.Dict(keys=fields.String(), values=fields.Integer())
    lines = fields.List(fields.Nested(views.StatementLineView))
    created = fields.Boolean()


class Statements(Open):
    items = fields.List(fields.Nested(Statement), required=True)


class Confirmation(Open):
    confirmed = fields.Integer(required=True)
    job_id = fields.String(allow_none=True, required=True)
    line_ids = fields.List(fields.Integer())
    status_url = fields.String()
    message = fields.String()


class StreamTicket(Open):
    ticket = fields.String(required=True)
    expires_in = fields.Integer(required=True)
    url = fields.String(required=True)


class Received(Open):
    event_id = fields.Integer(required=True)
    duplicate = fields.Boolean(required=True)


class Status(Open):
    status = fields.String(required=True)


class Readiness(Status):
    checks = fields.Dict(keys=fields.String(), values=fields.String())


class DeadLetterQuery(schemas.PageQuery):
    all = fields.String()


# Every API operation can answer these: bad input, no or a bad token, a database down.
COMMON = (400, 413, 503)
AUTH = (401,)
ADMIN = (401, 403)


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    summary: str
    responses: dict[int, type[Schema] | str]
    errors: tuple[int, ...] = ()
    body: type[Schema] | None = None
    body_required: bool = True
    # A body that is a file, not JSON: its media type (a bank statement as text/csv).
    raw_body: str | None = None
    query: type[Schema] | None = None
    security: str | None = None  # "bearer", "ikhokha" or None
    path_params: dict[str, dict[str, Any]] = field(default_factory=dict)


ID = {"type": "integer", "minimum": 1, "maximum": schemas.MAX_ID}
UUID = {"type": "string", "format": "uuid"}

OPERATIONS = [
    Operation(
        "post",
        "/webhooks/ikhokha",
        "A payment callback from iKhokha, signed with ik-appid and ik-sign",
        {200: Received},
        (400, 401, 413, 503),
        security="ikhokha",
    ),
    Operation("get", "/api/me", "Who the token belongs to", {200: Me}, AUTH, security="bearer"),
    Operation(
        "post",
        "/api/stream-tickets",
        "A one-use ticket for GET <url>?ticket= (the live stream, served by its own process)",
        {201: StreamTicket},
        AUTH,
        security="bearer",
    ),
    Operation(
        "post",
        "/api/enrollments",
        "Enroll in a course: 201 with a new enrollment, 200 with the open one or a retry",
        {200: Enrollment, 201: Enrollment},
        (*AUTH, 404, 409, 502),
        body=schemas.EnrollmentRequest,
        security="bearer",
    ),
    Operation(
        "get",
        "/api/enrollments",
        "The caller's enrollments",
        {200: EnrollmentList},
        AUTH,
        security="bearer",
    ),
    Operation(
        "get",
        "/api/enrollments/{enrollment_id}",
        "One enrollment with its payment and history (its student, or an admin)",
        {200: Enrollment},
        (*AUTH, 404),
        security="bearer",
        path_params={"enrollment_id": ID},
    ),
    Operation("get", "/api/courses", "Courses with the caller's course card", {200: Courses}),
    Operation(
        "get",
        "/api/courses/{course_id}/enrollment-state",
        "The course card for the caller",
        {200: CourseCard},
        (404,),
        path_params={"course_id": ID},
    ),
    Operation(
        "get",
        "/api/notifications",
        "Catch up on pushed changes after an id",
        {200: Notifications},
        AUTH,
        query=schemas.PageQuery,
        security="bearer",
    ),
    Operation(
        "get",
        "/api/admin/enrollments",
        "The approval queue, oldest first",
        {200: Queue},
        ADMIN,
        query=schemas.QueueQuery,
        security="bearer",
    ),
    Operation(
        "post",
        "/api/admin/enrollments/{enrollment_id}/approve",
        "Approve one enrollment waiting for approval (202: above the four-eyes amount, it "
        "now waits for a second admin)",
        {200: Enrollment, 202: Enrollment},
        (*ADMIN, 404, 409),
        security="bearer",
        path_params={"enrollment_id": ID},
    ),
    Operation(
        "post",
        "/api/admin/enrollments/{enrollment_id}/reject",
        "Reject one enrollment, with a reason the student sees",
        {200: Enrollment},
        (*ADMIN, 404, 409),
        body=schemas.RejectRequest,
        security="bearer",
        path_params={"enrollment_id": ID},
    ),
    Operation(
        "post",
        "/api/admin/enrollments/bulk-approve",
        "Approve plain bank transfers in bulk (flagged ones are skipped)",
        {202: BulkJobCreated},
        ADMIN,
        body=schemas.BulkApproveRequest,
        security="bearer",
    ),
    Operation(
        "get",
        "/api/admin/jobs/{job_id}",
        "A bulk job's progress and per-item outcomes",
        {200: Job},
        (*ADMIN, 404),
        query=schemas.PageQuery,
        security="bearer",
        path_params={"job_id": UUID},
    ),
    Operation(
        "get",
        "/api/admin/jobs",
        "The latest bulk jobs with their progress",
        {200: Jobs},
        ADMIN,
        query=schemas.PageQuery,
        security="bearer",
    ),
    Operation(
        "get",
        "/api/admin/search",
        "Enrollments by student e-mail, payment reference, paylink id, payment id or id",
        {200: Search},
        ADMIN,
        query=schemas.SearchQuery,
        security="bearer",
    ),
    Operation(
        "get",
        "/api/admin/enrollments/{enrollment_id}/trail",
        "Everything that happened to an enrollment, in order",
        {200: Trail},
        (*ADMIN, 404),
        security="bearer",
        path_params={"enrollment_id": ID},
    ),
    Operation(
        "get",
        "/api/admin/console",
        "What the operator's console needs: Flower's address, stages, SLA, four-eyes amount",
        {200: Console},
        ADMIN,
        security="bearer",
    ),
    Operation(
        "get",
        "/api/admin/audit",
        "Every change made by a person",
        {200: Audit},
        ADMIN,
        query=schemas.PageQuery,
        security="bearer",
    ),
    Operation(
        "get",
        "/api/admin/dead-letters",
        "Events the pipeline could not complete",
        {200: DeadLetters},
        ADMIN,
        query=DeadLetterQuery,
        security="bearer",
    ),
    Operation(
        "post",
        "/api/admin/dead-letters/{letter_id}/replay",
        "Send a dead event back into the pipeline",
        {202: DeadLetter},
        (*ADMIN, 404, 409),
        body=schemas.ReplayRequest,
        body_required=False,
        security="bearer",
        path_params={"letter_id": ID},
    ),
    Operation(
        "post",
        "/api/admin/enrollments/{enrollment_id}/refund",
        "Refund an approved enrollment, in full (access ends) or in part (Idempotency-Key)",
        {200: RefundDone, 201: RefundDone},
        (*ADMIN, 404, 409, 502),
        body=schemas.RefundRequest,
        security="bearer",
        path_params={"enrollment_id": ID},
    ),
    Operation(
        "get",
        "/api/admin/attention",
        "What needs an admin: flags (reconciliation, paid twice) and dead letters",
        {200: Flags},
        ADMIN,
        query=schemas.PageQuery,
        security="bearer",
    ),
    Operation(
        "post",
        "/api/admin/flags/{flag_id}/clear",
        "Clear a flag, saying what was found",
        {200: views.FlagView},
        (*ADMIN, 404, 409),
        body=schemas.NoteRequest,
        security="bearer",
        path_params={"flag_id": ID},
    ),
    Operation(
        "get",
        "/api/admin/reconciliation",
        "The latest reconciliation runs and what each found",
        {200: ReconciliationRuns},
        ADMIN,
        query=schemas.PageQuery,
        security="bearer",
    ),
    Operation(
        "post",
        "/api/admin/statements",
        "Import a bank statement (CSV or OFX; the body, or multipart field `file`)",
        {200: Statement, 201: Statement},
        (*ADMIN, 409),
        raw_body="text/csv",
        query=schemas.StatementQuery,
        security="bearer",
    ),
    Operation(
        "get",
        "/api/admin/statements",
        "Imported bank statements, newest first, with match counts",
        {200: Statements},
        ADMIN,
        query=schemas.PageQuery,
        security="bearer",
    ),
    Operation(
        "get",
        "/api/admin/statements/{statement_id}",
        "A statement's lines, each with its match and reason",
        {200: Statement},
        (*ADMIN, 404),
        query=schemas.StatementQuery,
        security="bearer",
        path_params={"statement_id": ID},
    ),
    Operation(
        "post",
        "/api/admin/statements/{statement_id}/approve-exact",
        "Approve the statement's exact matches as one bulk job",
        {200: Confirmation, 202: Confirmation},
        (*ADMIN, 404),
        body=schemas.ConfirmRequest,
        body_required=False,
        security="bearer",
        path_params={"statement_id": ID},
    ),
    Operation("get", "/healthz", "Liveness", {200: Status}),
    Operation(
        "get",
        "/readyz",
        "Readiness: database, broker, Redis",
        {200: Readiness, 503: Readiness},
        (401,),
        security="metrics",
    ),
    Operation(
        "get", "/metrics", "Prometheus metrics", {200: "text/plain"}, (401,), security="metrics"
    ),
    Operation(
        "get",
        "/payments/{payment_id}/{outcome}",
        "Where iKhokha sends the student back",
        {200: "text/html"},
        (404, 429),
        path_params={
            "payment_id": UUID,
            "outcome": {"type": "string", "enum": ["success", "failure", "cancel"]},
        },
    ),
]


def _response(status: int, kind: type[Schema] | str) -> dict[str, Any]:
    if isinstance(kind, str):
        return {"description": str(status), "content": {kind: {"schema": {"type": "string"}}}}
    return {"description": str(status), "content": {"application/json": {"schema": kind}}}


def build_spec() -> dict[str, Any]:
    spec = APISpec(
        title="Skillpay",
        version="1",
        openapi_version="3.0.3",
        plugins=[MarshmallowPlugin()],
        info={"description": "iKhokha payments to course enrollments."},
    )
    spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer"})
    spec.components.security_scheme("metrics", {"type": "http", "scheme": "bearer"})
    spec.components.security_scheme(
        "ikhokha", {"type": "apiKey", "in": "header", "name": "ik-sign"}
    )
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        responses = {str(s): _response(s, kind) for s, kind in op.responses.items()}
        for status in (*op.errors, *COMMON):
            responses.setdefault(str(status), _response(status, Error))
        operation: dict[str, Any] = {"summary": op.summary, "responses": responses}
        parameters: list[dict[str, Any]] = [
            {"in": "path", "name": name, "required": True, "schema": schema}
            for name, schema in op.path_params.items()
        ]
        if op.query is not None:
            parameters.append({"in": "query", "schema": op.query})
        if parameters:
            operation["parameters"] = parameters
        if op.body is not None:
            operation["requestBody"] = {
                "required": op.body_required,
                "content": {"application/json": {"schema": op.body}},
            }
        elif op.raw_body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {op.raw_body: {"schema": {"type": "string"}}},
            }
        elif op.security == "ikhokha":
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"type": "object"}}},
            }
        if op.security is not None:
            operation["security"] = [{op.security: []}]
        paths.setdefault(op.path, {})[op.method] = operation
    for path, operations in paths.items():
        spec.path(path=path, operations=operations)
    return spec.to_dict()


@bp.get("/api/openapi.json")
def openapi_document():
    return jsonify(_document())


_cache: dict[str, Any] = {}


def _document() -> dict[str, Any]:
    if "doc" not in _cache:
        _cache["doc"] = build_spec()
    return _cache["doc"]
