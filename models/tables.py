"""The tables. Rows, not behaviour: state changes live in pipeline/."""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Integer on SQLite so that the primary key is its rowid and autoincrements.
BigId = BigInteger().with_variant(Integer, "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_uuid() -> str:
    return str(uuid.uuid4())


NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: DateTime(timezone=True), dict[str, Any]: JSON}


class Role(enum.StrEnum):
    STUDENT = "student"
    ADMIN = "admin"


class State(enum.StrEnum):
    PENDING_PAYMENT = "pending_payment"
    PENDING_APPROVAL = "pending_approval"
    APPROVED = "approved"
    PAYMENT_FAILED = "payment_failed"
    REJECTED = "rejected"
    REFUNDED = "refunded"
    EXPIRED = "expired"


# An enrollment in one of these states blocks a second one for the same student and course.
OPEN_STATES = (State.PENDING_PAYMENT, State.PENDING_APPROVAL, State.APPROVED)


class PaymentMethod(enum.StrEnum):
    CARD = "card"
    EFT = "eft"


class EventState(enum.StrEnum):
    RECEIVED = "received"  # stored, not yet picked up
    PROCESSING = "processing"  # a stage is running or waiting to retry
    COMPLETED = "completed"
    DEAD = "dead"  # in the dead-letter table


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    role: Mapped[str] = mapped_column(String(16), default=Role.STUDENT)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    @property
    def is_admin(self) -> bool:
        return self.role == Role.ADMIN


class ApiToken(Base):
    """A bearer token, stored only as its SHA-256; the token itself is shown once."""

    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(12))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    # None: never expires (tokens made by tests and scripts that ask for it).
    expires_at: Mapped[datetime | None] = mapped_column(default=None)
    user: Mapped[User] = relationship()


class StreamTicket(Base):
    """A one-use, short-lived credential for GET /api/events?ticket= (EventSource cannot send
    an Authorization header, and the long-lived token must never stand in a URL)."""

    __tablename__ = "stream_tickets"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    ticket_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()
    used_at: Mapped[datetime | None] = mapped_column(default=None)


class Course(Base):
    __tablename__ = "courses"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    title: Mapped[str] = mapped_column(String(200))
    price_cents: Mapped[int] = mapped_column(Integer)
    currency: Mapped[str] = mapped_column(String(3), default="ZAR")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Enrollment(Base):
    __tablename__ = "enrollments"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    course_id: Mapped[int] = mapped_column(ForeignKey("courses.id"), index=True)
    state: Mapped[str] = mapped_column(String(32), index=True)
    payment_method: Mapped[str] = mapped_column(String(8))
    # Why it waits for an admin (EFT, uncertain payment type, amount mismatch, ...).
    waiting_reason: Mapped[str | None] = mapped_column(Text, default=None)
    # Shown to the student when an admin rejects.
    rejection_reason: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    approved_at: Mapped[datetime | None] = mapped_column(default=None)
    expires_at: Mapped[datetime | None] = mapped_column(default=None)
    # When it last began to wait for an admin: the approval queue's SLA clock.
    waiting_since: Mapped[datetime | None] = mapped_column(default=None)
    user: Mapped[User] = relationship()
    course: Mapped[Course] = relationship()

    __table_args__ = (
        Index(
            "uq_enrollments_open_per_course",
            "user_id",
            "course_id",
            unique=True,
            postgresql_where=text("state IN ('pending_payment','pending_approval','approved')"),
            sqlite_where=text("state IN ('pending_payment','pending_approval','approved')"),
        ),
        Index("ix_enrollments_state_waiting_since", "state", "waiting_since"),
    )

    @property
    def course_access(self) -> bool:
        return self.state == State.APPROVED


class Payment(Base):
    """One attempt to pay for an enrollment; its id is iKhokha's externalTransactionID."""

    __tablename__ = "payments"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_uuid)
    enrollment_id: Mapped[int] = mapped_column(ForeignKey("enrollments.id"), index=True)
    method: Mapped[str] = mapped_column(String(8))
    amount_cents: Mapped[int] = mapped_column(Integer)
    currency: Mapped[str] = mapped_column(String(3), default="ZAR")
    reference: Mapped[str] = mapped_column(String(40), unique=True)
    paylink_id: Mapped[str | None] = mapped_column(String(128), unique=True, default=None)
    paylink_url: Mapped[str | None] = mapped_column(Text, default=None)
    gateway_status: Mapped[str | None] = mapped_column(String(32), default=None)
    # When a return page last had iKhokha asked about this payment (at most once a minute).
    status_checked_at: Mapped[datetime | None] = mapped_column(default=None)
    # When reconciliation found iKhokha's word agreeing with an approval (asked once).
    reconciled_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    enrollment: Mapped[Enrollment] = relationship()


class WebhookEvent(Base):
    """The inbox: each callback exactly as received, and how far the pipeline has taken it."""

    __tablename__ = "webhook_events"
    # No index on a column every stage changes (stage, updated_at): a stage's update that
    # changes no indexed column stays on its page and writes no index entry (a HOT update,
    # migration 0007). Only the first and last stage change the state.
    __table_args__ = ({"postgresql_with": {"fillfactor": 80}},)
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    dedupe_key: Mapped[str] = mapped_column(String(64), unique=True)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    path: Mapped[str] = mapped_column(String(300))
    headers: Mapped[dict[str, Any]] = mapped_column(default=dict)
    body: Mapped[bytes] = mapped_column(LargeBinary)
    deliveries: Mapped[int] = mapped_column(Integer, default=1)
    state: Mapped[str] = mapped_column(String(16), default=EventState.RECEIVED, index=True)
    # The next stage to run (or the one that failed, when dead).
    stage: Mapped[str] = mapped_column(String(32))
    paylink_id: Mapped[str | None] = mapped_column(String(128), default=None, index=True)
    external_transaction_id: Mapped[str | None] = mapped_column(String(64), default=None)
    callback_status: Mapped[str | None] = mapped_column(String(32), default=None)
    payment_id: Mapped[str | None] = mapped_column(ForeignKey("payments.id"), default=None)
    enrollment_id: Mapped[int | None] = mapped_column(
        ForeignKey("enrollments.id"), default=None, index=True
    )
    payment_type: Mapped[str | None] = mapped_column(String(16), default=None)
    detection: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    # What the enrollment lookup found wrong (amount, currency, course, student), if anything.
    checks: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    decision: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    history_id: Mapped[int | None] = mapped_column(BigInteger, default=None)
    outcome: Mapped[str | None] = mapped_column(Text, default=None)
    completed_at: Mapped[datetime | None] = mapped_column(default=None)
    # Deliveries of the current stage the broker made again because a worker died holding
    # the message; back to 0 when a stage completes.
    redeliveries: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # When a failed stage is due to be retried: until then the event is not stalled.
    retry_at: Mapped[datetime | None] = mapped_column(default=None)


class StageAttempt(Base):
    __tablename__ = "stage_attempts"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    event_id: Mapped[int] = mapped_column(ForeignKey("webhook_events.id"), index=True)
    stage: Mapped[str] = mapped_column(String(32))
    attempt: Mapped[int] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(16))  # ok | skipped | retry | failed
    error: Mapped[str | None] = mapped_column(Text, default=None)
    duration_ms: Mapped[float] = mapped_column(default=0.0)
    # Indexed for /metrics: the durations of the last few minutes, per stage.
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class DeadLetter(Base):
    __tablename__ = "dead_letters"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    event_id: Mapped[int] = mapped_column(ForeignKey("webhook_events.id"), index=True)
    stage: Mapped[str] = mapped_column(String(32))
    error_code: Mapped[str] = mapped_column(String(64))
    error: Mapped[str] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    replay_count: Mapped[int] = mapped_column(Integer, default=0)
    replayed_at: Mapped[datetime | None] = mapped_column(default=None)
    # Set when a replay was enqueued; a dead letter with it set no longer counts as open.
    resolved_at: Mapped[datetime | None] = mapped_column(default=None)
    event: Mapped[WebhookEvent] = relationship()


class EnrollmentHistory(Base):
    """One row per state change: from, to, who, through what, why, when."""

    __tablename__ = "enrollment_history"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    enrollment_id: Mapped[int] = mapped_column(ForeignKey("enrollments.id"), index=True)
    from_state: Mapped[str | None] = mapped_column(String(32))
    to_state: Mapped[str] = mapped_column(String(32))
    actor: Mapped[str] = mapped_column(String(64))
    actor_user_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id"), default=None, index=True
    )
    source: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str | None] = mapped_column(Text, default=None)
    event_id: Mapped[int | None] = mapped_column(ForeignKey("webhook_events.id"), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Notification(Base):
    """What was pushed to a student or to the admins, kept so a client can catch up."""

    __tablename__ = "notifications"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    audience: Mapped[str] = mapped_column(String(16))  # student | admins
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), default=None, index=True)
    enrollment_id: Mapped[int] = mapped_column(ForeignKey("enrollments.id"), index=True)
    kind: Mapped[str] = mapped_column(String(48))
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class BulkJob(Base):
    """An admin's bulk approval, run by a Celery task in batches, resumable."""

    __tablename__ = "bulk_jobs"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_uuid)
    kind: Mapped[str] = mapped_column(String(32), default="approve")
    admin_user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    # The same Idempotency-Key from the same admin returns the same job.
    idempotency_key: Mapped[str | None] = mapped_column(String(128), default=None)
    state: Mapped[str] = mapped_column(String(16), default="queued")  # queued|running|done
    total: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)

    __table_args__ = (UniqueConstraint("admin_user_id", "idempotency_key"),)


class BulkJobItem(Base):
    __tablename__ = "bulk_job_items"
    job_id: Mapped[str] = mapped_column(ForeignKey("bulk_jobs.id"), primary_key=True)
    enrollment_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    position: Mapped[int] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(
        String(16), default="pending"
    )  # pending|approved|skipped|failed
    detail: Mapped[str | None] = mapped_column(Text, default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)

    __table_args__ = (Index("ix_bulk_job_items_pending", "job_id", "outcome", "position"),)


class ScheduledRun(Base):
    """One row per scheduled task per period: whichever beat's message comes first runs the
    work; a second beat started by mistake finds the period taken (pipeline/schedule.py)."""

    __tablename__ = "scheduled_runs"
    task: Mapped[str] = mapped_column(String(64), primary_key=True)
    period: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)


class Refund(Base):
    """Money given back for an enrollment. A full refund (the rest of what was paid) ends
    course access; a partial one keeps it. What is refunded never exceeds what was paid."""

    __tablename__ = "refunds"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_uuid)
    enrollment_id: Mapped[int] = mapped_column(ForeignKey("enrollments.id"), index=True)
    payment_id: Mapped[str] = mapped_column(ForeignKey("payments.id"), index=True)
    amount_cents: Mapped[int] = mapped_column(Integer)
    is_full: Mapped[bool] = mapped_column(Boolean)
    reason: Mapped[str] = mapped_column(Text)
    # recorded: an admin made it in iKhokha's dashboard or the bank; api: sent to the gateway.
    mode: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))  # requested | done | failed
    gateway_reference: Mapped[str | None] = mapped_column(String(128), default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    admin_user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(128), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)

    __table_args__ = (
        UniqueConstraint("admin_user_id", "idempotency_key"),
        # A payment is refunded in full at most once, whatever races.
        Index(
            "uq_refunds_full_per_payment",
            "payment_id",
            unique=True,
            postgresql_where=text("is_full AND state <> 'failed'"),
            sqlite_where=text("is_full AND state <> 'failed'"),
        ),
    )


class EnrollmentFlag(Base):
    """Something an admin must look at about an enrollment that no state says (an approval
    iKhokha does not confirm, say). It puts the enrollment in the "needs attention" list and
    never changes the enrollment itself; an admin clears it with a note."""

    __tablename__ = "enrollment_flags"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    enrollment_id: Mapped[int] = mapped_column(ForeignKey("enrollments.id"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    cleared_at: Mapped[datetime | None] = mapped_column(default=None)
    cleared_by: Mapped[int | None] = mapped_column(ForeignKey("users.id"), default=None)
    note: Mapped[str | None] = mapped_column(Text, default=None)
    enrollment: Mapped[Enrollment] = relationship()

    __table_args__ = (
        # One open flag of a kind per enrollment: a daily check does not pile them up.
        Index(
            "uq_enrollment_flags_open",
            "enrollment_id",
            "kind",
            unique=True,
            postgresql_where=text("cleared_at IS NULL"),
            sqlite_where=text("cleared_at IS NULL"),
        ),
    )


class ReconciliationRun(Base):
    """One reconciliation: what it checked and found, by kind."""

    __tablename__ = "reconciliation_runs"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    trigger: Mapped[str] = mapped_column(String(16))  # beat | cli | admin
    started_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    checked: Mapped[int] = mapped_column(Integer, default=0)


class ReconciliationFinding(Base):
    __tablename__ = "reconciliation_findings"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("reconciliation_runs.id"), index=True)
    # paid_not_enrolled | enrolled_not_paid | amount_mismatch | unknown_payment | error
    kind: Mapped[str] = mapped_column(String(32))
    # fed (into the pipeline) | flagged (for an admin) | reported
    action: Mapped[str] = mapped_column(String(16))
    enrollment_id: Mapped[int | None] = mapped_column(ForeignKey("enrollments.id"), default=None)
    payment_id: Mapped[str | None] = mapped_column(String(36), default=None)
    detail: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class BankStatement(Base):
    """A bank statement an admin imported; its lines are matched to EFT enrollments."""

    __tablename__ = "bank_statements"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    filename: Mapped[str] = mapped_column(String(200))
    format: Mapped[str] = mapped_column(String(8))  # csv | ofx
    imported_by: Mapped[int] = mapped_column(ForeignKey("users.id"))
    imported_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Lines in the file, and those already imported from another statement (overlapping).
    line_count: Mapped[int] = mapped_column(Integer, default=0)
    already_imported: Mapped[int] = mapped_column(Integer, default=0)


class StatementLine(Base):
    __tablename__ = "statement_lines"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    statement_id: Mapped[int] = mapped_column(ForeignKey("bank_statements.id"), index=True)
    line_no: Mapped[int] = mapped_column(Integer)
    booked_on: Mapped[date] = mapped_column(Date)
    description: Mapped[str] = mapped_column(Text)
    amount_cents: Mapped[int] = mapped_column(BigInteger)
    # The same transaction in two overlapping exports has the same fingerprint.
    fingerprint: Mapped[str] = mapped_column(String(64), unique=True)
    reference: Mapped[str | None] = mapped_column(String(16), default=None)
    # exact | amount_differs | amount_only | not_waiting | unmatched | ignored
    match: Mapped[str] = mapped_column(String(16))
    enrollment_id: Mapped[int | None] = mapped_column(
        ForeignKey("enrollments.id"), default=None, index=True
    )
    reason: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), default="proposed")  # proposed | confirmed
    confirmed_by: Mapped[int | None] = mapped_column(ForeignKey("users.id"), default=None)
    confirmed_at: Mapped[datetime | None] = mapped_column(default=None)
    job_id: Mapped[str | None] = mapped_column(String(36), default=None)

    __table_args__ = (
        # An enrollment is the exact match of one line at most, across every statement.
        Index(
            "uq_statement_lines_exact_enrollment",
            "enrollment_id",
            unique=True,
            postgresql_where=text("match = 'exact'"),
            sqlite_where=text("match = 'exact'"),
        ),
    )


class ApprovalRequest(Base):
    """Four-eyes approval: an admin asked to approve an enrollment above
    SKILLPAY_FOUR_EYES_ABOVE_CENTS; it is approved when another admin confirms."""

    __tablename__ = "approval_requests"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    enrollment_id: Mapped[int] = mapped_column(ForeignKey("enrollments.id"), index=True)
    amount_cents: Mapped[int] = mapped_column(BigInteger)
    requested_by: Mapped[int] = mapped_column(ForeignKey("users.id"))
    requested_at: Mapped[datetime] = mapped_column(default=utcnow)
    confirmed_by: Mapped[int | None] = mapped_column(ForeignKey("users.id"), default=None)
    confirmed_at: Mapped[datetime | None] = mapped_column(default=None)
    # Closed without an approval: the enrollment was rejected or left the queue.
    cancelled_at: Mapped[datetime | None] = mapped_column(default=None)

    __table_args__ = (
        Index(
            "uq_approval_requests_open",
            "enrollment_id",
            unique=True,
            postgresql_where=text("confirmed_at IS NULL AND cancelled_at IS NULL"),
            sqlite_where=text("confirmed_at IS NULL AND cancelled_at IS NULL"),
        ),
    )
