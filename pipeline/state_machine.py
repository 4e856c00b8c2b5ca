"""The one way an enrollment changes state.

The webhook pipeline, admin actions (one or in bulk), reconciliation, expiry and refunds all
go through transition_enrollments(): it locks the rows, leaves alone any enrollment already in
the target state, checks each transition against ALLOWED, and writes exactly one history row
per real change. transition_enrollment() is the same for one row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from models import Enrollment, EnrollmentHistory, State, utcnow
from pipeline.errors import InvalidTransition, NotFound

S = State
ALLOWED: dict[str, frozenset[str]] = {
    S.PENDING_PAYMENT: frozenset(
        {S.APPROVED, S.PENDING_APPROVAL, S.PAYMENT_FAILED, S.EXPIRED, S.REJECTED}
    ),
    S.PENDING_APPROVAL: frozenset({S.APPROVED, S.REJECTED, S.EXPIRED}),
    # A link stays payable after a failure: a later SUCCESS still counts.
    S.PAYMENT_FAILED: frozenset({S.APPROVED, S.PENDING_APPROVAL, S.PENDING_PAYMENT, S.EXPIRED}),
    # A late payment after expiry waits for an admin.
    S.EXPIRED: frozenset({S.PENDING_APPROVAL}),
    S.APPROVED: frozenset({S.REFUNDED}),
    S.REJECTED: frozenset(),
    S.REFUNDED: frozenset(),
}


@dataclass(frozen=True)
class Transition:
    enrollment: Enrollment
    from_state: str
    to_state: str
    history: EnrollmentHistory | None

    @property
    def changed(self) -> bool:
        return self.history is not None


def can_transition(from_state: str, to_state: str) -> bool:
    return to_state in ALLOWED.get(from_state, frozenset())


def lock_enrollments(session: Session, ids: Sequence[int]) -> dict[int, Enrollment]:
    # Locked in id order, so two transactions locking overlapping sets cannot deadlock.
    # FOR NO KEY UPDATE: rows that merely reference the enrollment (history, notifications,
    # an inbox row's enrollment_id) can still be written by others meanwhile.
    rows = session.scalars(
        select(Enrollment)
        .where(Enrollment.id.in_(sorted(set(ids))))
        .order_by(Enrollment.id)
        .with_for_update(key_share=True)
        .execution_options(populate_existing=True)
    )
    return {row.id: row for row in rows}


def transition_enrollments(
    session: Session,
    ids: Sequence[int],
    to_state: State,
    *,
    actor: str,
    source: str,
    reason: str | None = None,
    actor_user_id: int | None = None,
    event_id: int | None = None,
    only_from: frozenset[str] | None = None,
) -> dict[int, Transition | str]:
    """Move each enrollment to to_state under its row lock, one history row per change.

    Returns, per id, the Transition (history None when it was already in to_state), or a
    string saying why it could not move (missing, or not allowed from its state).
    """
    locked = lock_enrollments(session, ids)
    now = utcnow()
    results: dict[int, Transition | str] = {}
    for enrollment_id in ids:
        enrollment = locked.get(enrollment_id)
        if enrollment is None:
            results[enrollment_id] = "does not exist"
            continue
        current = enrollment.state
        if current == to_state:
            results[enrollment_id] = Transition(enrollment, current, current, None)
            continue
        if not can_transition(current, to_state) or (
            only_from is not None and current not in only_from
        ):
            results[enrollment_id] = f"is {current}; cannot become {to_state}"
            continue
        enrollment.state = to_state
        enrollment.updated_at = now
        if to_state == S.APPROVED:
            enrollment.approved_at = now
        if to_state == S.PENDING_APPROVAL:
            enrollment.waiting_reason = reason
        if to_state == S.REJECTED:
            enrollment.rejection_reason = reason
        history = EnrollmentHistory(
            enrollment_id=enrollment.id,
            from_state=current,
            to_state=to_state,
            actor=actor,
            actor_user_id=actor_user_id,
            source=source,
            reason=reason,
            event_id=event_id,
            created_at=now,
        )
        session.add(history)
        results[enrollment_id] = Transition(enrollment, current, to_state, history)
    session.flush()
    return results


def transition_enrollment(
    session: Session,
    enrollment_id: int,
    to_state: State,
    *,
    actor: str,
    source: str,
    reason: str | None = None,
    actor_user_id: int | None = None,
    event_id: int | None = None,
    only_from: frozenset[str] | None = None,
    strict: bool = True,
) -> Transition:
    """transition_enrollments() for one enrollment.

    A transition that is not allowed raises InvalidTransition when strict, and changes
    nothing otherwise: the pipeline uses strict=False so that, say, a FAILURE arriving after
    an approval leaves the approval alone.
    """
    result = transition_enrollments(
        session,
        [enrollment_id],
        to_state,
        actor=actor,
        source=source,
        reason=reason,
        actor_user_id=actor_user_id,
        event_id=event_id,
        only_from=only_from,
    )[enrollment_id]
    if isinstance(result, Transition):
        return result
    if result == "does not exist":
        raise NotFound(f"enrollment {enrollment_id} does not exist")
    if strict:
        raise InvalidTransition(f"enrollment {enrollment_id} {result}")
    enrollment = session.get(Enrollment, enrollment_id)
    assert enrollment is not None
    return Transition(enrollment, enrollment.state, enrollment.state, None)


def record_creation(
    session: Session,
    enrollment: Enrollment,
    *,
    actor: str,
    actor_user_id: int | None,
    reason: str | None = None,
) -> EnrollmentHistory:
    """The first history row of a new enrollment (from nothing to its first state)."""
    history = EnrollmentHistory(
        enrollment_id=enrollment.id,
        from_state=None,
        to_state=enrollment.state,
        actor=actor,
        actor_user_id=actor_user_id,
        source="checkout",
        reason=reason,
        created_at=utcnow(),
    )
    session.add(history)
    session.flush()
    return history
