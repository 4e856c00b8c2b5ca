"""Bulk approval: a job of many enrollments, approved in batches, resumable and idempotent.

Each batch is one transaction that claims its items with SKIP LOCKED, so two workers on the
same job (a redelivered message, a sweeper re-drive) never take the same item, and a worker
killed mid-batch loses only an uncommitted batch, which the next run takes again.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session

from models import BulkJob, BulkJobItem, State, User, on_commit, session_scope, utcnow
from pipeline.errors import InvalidRequest, NotFound, describe, is_transient
from pipeline.notify import notify_transitions
from pipeline.state_machine import Transition, transition_enrollments

BATCH_SIZE = 500
MAX_ITEMS = 50_000


def create_job(
    session: Session, admin: User, ids: Sequence[int], idempotency_key: str | None, enqueue: Any
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


def run_batch(job_id: str, batch_size: int = BATCH_SIZE) -> int:
    """Approve the next batch of the job's pending items. Returns how many it took (0: done)."""
    with session_scope() as session:
        job = session.get(BulkJob, job_id)
        if job is None:
            raise NotFound(f"bulk job {job_id} does not exist")
        if job.state == "done":
            return 0
        items = list(
            session.scalars(
                select(BulkJobItem)
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
        if not items:
            remaining = session.scalar(
                select(func.count())
                .select_from(BulkJobItem)
                .where(BulkJobItem.job_id == job_id, BulkJobItem.outcome == "pending")
            )
            if not remaining:
                job.state = "done"
                job.finished_at = now
            return 0
        results = transition_enrollments(
            session,
            [item.enrollment_id for item in items],
            State.APPROVED,
            actor=f"admin:{job.admin_user_id}",
            actor_user_id=job.admin_user_id,
            source="admin_bulk",
            reason=f"bulk approval job {job_id}",
            only_from=frozenset({State.PENDING_APPROVAL}),
        )
        changed: list[Transition] = []
        for item in items:
            result = results[item.enrollment_id]
            item.finished_at = now
            if isinstance(result, str):
                item.outcome, item.detail = "skipped", f"enrollment {result}"
            elif result.history is None:
                item.outcome, item.detail = "skipped", "already approved"
            else:
                item.outcome, item.detail = "approved", None
                changed.append(result)
        notify_transitions(session, changed)
        return len(items)


def run_job(job_id: str) -> None:
    """Run every batch; safe to call again on a job that was interrupted or finished.

    A batch that fails for a reason other than a passing one is taken again one item at a
    time, so that only the item at fault is marked failed, with its error.
    """
    size = BATCH_SIZE
    while True:
        try:
            taken = run_batch(job_id, size)
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


def job_view(
    session: Session, job_id: str, *, items_limit: int = 1000, items_offset: int = 0
) -> dict[str, Any]:
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
        .offset(items_offset)
        .limit(items_limit)
    )
    done = job.total - counts.get("pending", 0)
    return {
        "id": job.id,
        "kind": job.kind,
        "state": job.state,
        "admin_user_id": job.admin_user_id,
        "total": job.total,
        "done": done,
        "progress": round(done / job.total, 4) if job.total else 1.0,
        "counts": {k: counts.get(k, 0) for k in ("pending", "approved", "skipped", "failed")},
        "created_at": job.created_at.isoformat(),
        "started_at": job.started_at.isoformat() if job.started_at else None,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        "items": [
            {"enrollment_id": i.enrollment_id, "outcome": i.outcome, "detail": i.detail}
            for i in items
        ],
    }


def stalled_jobs(session: Session, stale_after_seconds: float) -> list[str]:
    """Jobs queued or running whose items made no progress for a while."""
    cutoff = utcnow() - timedelta(seconds=stale_after_seconds)
    last_progress = (
        select(func.max(BulkJobItem.finished_at))
        .where(BulkJobItem.job_id == BulkJob.id)
        .scalar_subquery()
    )
    return list(
        session.scalars(
            select(BulkJob.id).where(
                BulkJob.state.in_(("queued", "running")),
                BulkJob.created_at < cutoff,
                func.coalesce(last_progress, BulkJob.created_at) < cutoff,
            )
        )
    )


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
