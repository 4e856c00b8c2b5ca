"""Bulk approval: a job of many enrollments, approved in batches, resumable and idempotent.

Only plain bank transfers are approved in bulk; an enrollment parked for anything else (see
decisions.needs_individual_review), or above the four-eyes amount, is skipped with its reason,
for admins to approve on its own.

Each batch is one transaction that claims its items with SKIP LOCKED, so two workers on the
same job (a redelivered message, a sweeper re-drive) never take the same item, and a worker
killed mid-batch loses only an uncommitted batch, which the next run takes again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Table, bindparam, func, insert, select, update
from sqlalchemy.orm import Session

from config import Settings
from models import BulkJob, BulkJobItem, Enrollment, State, User, on_commit, session_scope, utcnow
from pipeline.decisions import needs_individual_review, needs_two_admins
from pipeline.errors import InvalidRequest, NotFound, describe, is_transient
from pipeline.notify import notify
from pipeline.payments import amounts_due
from pipeline.state_machine import Outcome, Transition, transition_enrollments

_ITEMS: Table = BulkJobItem.__table__  # type: ignore[assignment]
BATCH_SIZE = 500
MAX_ITEMS = 50_000


def create_job(
    session: Session,
    admin: User,
    ids: Sequence[int],
    idempotency_key: str | None,
    enqueue: Callable[[str], object],
) -> tuple[BulkJob, bool]:
    """Create the job and its items (or return the job this key already made)."""
    if idempotency_key:
        existing = session.scalar(
            select(BulkJob).where(
                BulkJob.admin_user_id == admin.id, BulkJob.idempotency_key == idempotency_key
            )
        )
        if existing is not None:
            return existing, False
    unique_ids = list(dict.fromkeys(ids))
    if not unique_ids:
        raise InvalidRequest("ids must list at least one enrollment id")
    if len(unique_ids) > MAX_ITEMS:
        raise InvalidRequest(f"at most {MAX_ITEMS} enrollments per job")
    job = BulkJob(admin_user_id=admin.id, idempotency_key=idempotency_key, total=len(unique_ids))
    session.add(job)
    session.flush()
    session.execute(
        insert(BulkJobItem),
        [
            {"job_id": job.id, "enrollment_id": eid, "position": pos}
            for pos, eid in enumerate(unique_ids)
        ],
    )
    on_commit(session, lambda: enqueue(job.id))
    return job, True


def run_batch(settings: Settings, job_id: str, batch_size: int = BATCH_SIZE) -> int:
    """Approve the next batch of the job's pending items. Returns how many it took (0: done)."""
    with session_scope() as session:
        job = session.get(BulkJob, job_id)
        if job is None:
            raise NotFound(f"bulk job {job_id} does not exist")
        if job.state == "done":
            return 0
        ids = list(
            session.scalars(
                select(BulkJobItem.enrollment_id)
                .where(BulkJobItem.job_id == job_id, BulkJobItem.outcome == "pending")
                .order_by(BulkJobItem.position)
                .limit(batch_size)
                .with_for_update(skip_locked=True)
            )
        )
        now = utcnow()
        if job.started_at is None:
            job.started_at = now
        job.state = "running"
        if not ids:
            remaining = session.scalar(
                select(func.count())
                .select_from(BulkJobItem)
                .where(BulkJobItem.job_id == job_id, BulkJobItem.outcome == "pending")
            )
            if not remaining:
                job.state = "done"
                job.finished_at = now
            return 0
        amounts = amounts_due(session, ids) if settings.four_eyes_above_cents else {}

        def refuse(enrollment: Enrollment) -> str | None:
            if needs_two_admins(settings, amounts.get(enrollment.id)):
                return "above the four-eyes amount: two admins approve it on its own"
            return _flagged(enrollment)

        results = transition_enrollments(
            session,
            ids,
            State.APPROVED,
            actor=f"admin:{job.admin_user_id}",
            actor_user_id=job.admin_user_id,
            source="admin_bulk",
            reason=f"bulk approval job {job_id}",
            only_from=frozenset({State.PENDING_APPROVAL}),
            refuse_if=refuse,
        )
        _record_outcomes(session, job_id, results, now)
        notify(session, settings, results.values())
        return len(ids)


def _record_outcomes(
    session: Session, job_id: str, results: dict[int, Transition], at: datetime
) -> None:
    """Each item's outcome: the approved in one statement, the skipped with their reasons."""
    approved = [i for i, result in results.items() if result.changed]
    if approved:
        session.execute(
            update(_ITEMS)
            .where(_ITEMS.c.job_id == job_id, _ITEMS.c.enrollment_id.in_(approved))
            .values(outcome="approved", detail=None, finished_at=at)
        )
    skipped = [
        {"item": i, "detail": _why_skipped(result)}
        for i, result in results.items()
        if not result.changed
    ]
    if skipped:
        session.execute(
            update(_ITEMS)
            .where(_ITEMS.c.job_id == job_id, _ITEMS.c.enrollment_id == bindparam("item"))
            .values(outcome="skipped", finished_at=at),
            skipped,
        )


def _flagged(enrollment: Enrollment) -> str | None:
    if not needs_individual_review(enrollment):
        return None
    return f"flagged ({enrollment.waiting_reason}): approve it on its own"[:500]


def _why_skipped(result: Transition) -> str:
    if result.outcome is Outcome.ALREADY_THERE or result.refusal:
        return result.explain()
    return f"enrollment {result.explain()}"


def run_job(settings: Settings, job_id: str) -> None:
    """Run every batch; safe to call again on a job that was interrupted or finished.

    A batch that fails for a reason other than a passing one is taken again one item at a
    time, so that only the item at fault is marked failed, with its error.
    """
    size = BATCH_SIZE
    while True:
        try:
            taken = run_batch(settings, job_id, size)
        except Exception as exc:
            if is_transient(exc):
                raise
            if size > 1:
                size = 1
                continue
            mark_failed(job_id, _next_pending(job_id), describe(exc)[1])
            continue
        if not taken:
            return


def _next_pending(job_id: str) -> list[int]:
    with session_scope() as session:
        return list(
            session.scalars(
                select(BulkJobItem.enrollment_id)
                .where(BulkJobItem.job_id == job_id, BulkJobItem.outcome == "pending")
                .order_by(BulkJobItem.position)
                .limit(1)
            )
        )


@dataclass(frozen=True)
class JobProgress:
    job: BulkJob
    counts: dict[str, int]  # items by outcome: pending, approved, skipped, failed
    items: list[BulkJobItem]  # the page asked for, in the order the admin gave

    @property
    def done(self) -> int:
        return self.job.total - self.counts["pending"]


def job_progress(
    session: Session, job_id: str, *, limit: int = 1000, offset: int = 0
) -> JobProgress:
    job = session.get(BulkJob, job_id)
    if job is None:
        raise NotFound(f"bulk job {job_id} does not exist")
    counts = dict(
        session.execute(
            select(BulkJobItem.outcome, func.count())
            .where(BulkJobItem.job_id == job_id)
            .group_by(BulkJobItem.outcome)
        ).all()
    )
    items = session.scalars(
        select(BulkJobItem)
        .where(BulkJobItem.job_id == job_id)
        .order_by(BulkJobItem.position)
        .offset(offset)
        .limit(limit)
    )
    outcomes = ("pending", "approved", "skipped", "failed")
    return JobProgress(job, {k: counts.get(k, 0) for k in outcomes}, list(items))


def mark_failed(job_id: str, enrollment_ids: Sequence[int], error: str) -> None:
    with session_scope() as session:
        session.execute(
            update(BulkJobItem)
            .where(
                BulkJobItem.job_id == job_id,
                BulkJobItem.enrollment_id.in_(enrollment_ids),
                BulkJobItem.outcome == "pending",
            )
            .values(outcome="failed", detail=error[:500], finished_at=utcnow())
        )
