"""Request bodies and query strings, validated with marshmallow; errors become 400."""

from __future__ import annotations

from typing import Any

from flask import request
from marshmallow import EXCLUDE, RAISE, Schema, ValidationError, fields, validate

from models import PaymentMethod, State
from pipeline.errors import InvalidRequest
from pipeline.stages import STAGE_NAMES
from pipeline.statements import MATCHES

# Ids are PostgreSQL bigints: anything larger is refused here, not by the database.
MAX_ID = 2**63 - 1
# Ten years: further back than any enrollment, and no overflow in date arithmetic.
MAX_MINUTES = 10 * 366 * 24 * 60


def Id(**kwargs: Any) -> fields.Integer:
    return fields.Integer(validate=validate.Range(min=1, max=MAX_ID), **kwargs)


class Text(fields.String):
    """A string PostgreSQL can store: no NUL character."""

    default_error_messages = {"nul": "Must not contain a NUL character."}

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        if "\x00" in text:
            raise self.make_error("nul")
        return text


class EnrollmentRequest(Schema):
    class Meta:
        unknown = RAISE

    course_id = Id(required=True, strict=True)
    payment_method = fields.String(
        required=True, validate=validate.OneOf([m.value for m in PaymentMethod])
    )


class RejectRequest(Schema):
    class Meta:
        unknown = RAISE

    reason = Text(required=True, validate=validate.Length(min=1, max=1000))


class RefundRequest(Schema):
    class Meta:
        unknown = RAISE

    reason = Text(required=True, validate=validate.Length(min=1, max=1000))
    # Absent: everything not yet refunded (which ends course access).
    amount_cents = fields.Integer(
        load_default=None, strict=True, validate=validate.Range(min=1, max=2**31 - 1)
    )


class NoteRequest(Schema):
    class Meta:
        unknown = RAISE

    note = Text(required=True, validate=validate.Length(min=1, max=1000))


class ConfirmRequest(Schema):
    class Meta:
        unknown = RAISE

    # Absent: every exact match of the statement still proposed.
    line_ids = fields.List(
        Id(strict=True), load_default=None, validate=validate.Length(min=1, max=50_000)
    )


class StatementQuery(Schema):
    class Meta:
        unknown = EXCLUDE

    filename = Text(load_default="statement.csv", validate=validate.Length(max=200))
    format = fields.String(load_default=None, validate=validate.OneOf(["csv", "ofx"]))
    match = fields.String(load_default=None, validate=validate.OneOf(MATCHES))


class BulkApproveRequest(Schema):
    class Meta:
        unknown = RAISE

    ids = fields.List(
        Id(strict=True),
        required=True,
        validate=validate.Length(min=1, max=50_000),
    )


class ReplayRequest(Schema):
    class Meta:
        unknown = RAISE

    from_stage = fields.String(load_default=None, validate=validate.OneOf(STAGE_NAMES))


class QueueQuery(Schema):
    class Meta:
        unknown = EXCLUDE

    status = fields.String(
        load_default=State.PENDING_APPROVAL, validate=validate.OneOf([s.value for s in State])
    )
    course_id = Id(load_default=None)
    payment_method = fields.String(
        load_default=None, validate=validate.OneOf([m.value for m in PaymentMethod])
    )
    older_than_minutes = fields.Integer(
        load_default=None, validate=validate.Range(min=0, max=MAX_MINUTES)
    )
    # waiting: the longest wait first (the SLA's order); -waiting: the newest first.
    sort = fields.String(load_default="waiting", validate=validate.OneOf(["waiting", "-waiting"]))
    page = fields.Integer(load_default=1, validate=validate.Range(min=1, max=1_000_000))
    per_page = fields.Integer(load_default=50, validate=validate.Range(min=1, max=200))


class SearchQuery(Schema):
    class Meta:
        unknown = EXCLUDE

    q = fields.String(load_default="", validate=validate.Length(max=320))


class PageQuery(Schema):
    class Meta:
        unknown = EXCLUDE

    page = fields.Integer(load_default=1, validate=validate.Range(min=1, max=1_000_000))
    per_page = fields.Integer(load_default=50, validate=validate.Range(min=1, max=200))
    after = fields.Integer(load_default=0, validate=validate.Range(min=0, max=MAX_ID))
    admin_id = Id(load_default=None)
    enrollment_id = Id(load_default=None)


def _first_error(messages: Any) -> str:
    if isinstance(messages, dict):
        for key, value in messages.items():
            inner = _first_error(value)
            return f"{key}: {inner}" if not str(key).startswith("_") else inner
    if isinstance(messages, list) and messages:
        return _first_error(messages[0])
    return str(messages)


def load_json(schema: Schema) -> dict[str, Any]:
    try:
        data = request.get_json(silent=True, force=True)
    except RecursionError:  # absurdly deep nesting
        data = None
    if data is None:
        raise InvalidRequest("the body must be valid JSON")
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object")
    try:
        return schema.load(data)
    except ValidationError as exc:
        raise InvalidRequest(_first_error(exc.messages)) from exc


def load_query(schema: Schema) -> dict[str, Any]:
    try:
        return schema.load(request.args.to_dict())
    except ValidationError as exc:
        raise InvalidRequest(_first_error(exc.messages)) from exc
