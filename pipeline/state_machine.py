"""The one way an enrollment comes to be and changes state.

create_enrollment() makes a new enrollment in one of the allowed first states. The webhook
pipeline, admin actions (one or in bulk), reconciliation, expiry and refunds all move an
enrollment through transition_enrollments(): it locks the rows, leaves alone any enrollment
already in the target state, checks each transition against ALLOWED, and writes exactly one
history row per real change. transition_enrollment() is the same for one row.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Table, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from models import Enrollment, EnrollmentHistory, PaymentMethod, State, utcnow
from models.db import insert_many
from pipeline.errors import InvalidTransition, NotFound

_ENROLLMENTS: Table = Enrollment.__table__  # type: ignore[assignment]
_HISTORY: Table = EnrollmentHistory.__table__  # type: ignore[assignment]

# None is "no enrollment yet": the states a new enrollment may start in.
ALLOWED: dict[State | None, frozenset[State]] = {
    None: frozenset({State.PENDING_PAYMENT, State.PENDING_APPROVAL}),
    State.PENDING_PAYMENT: frozenset(
        {
            State.APPROVED,
            State.PENDING_APPROVAL,
            State.PAYMENT_FAILED,
            State.EXPIRED,
            State.REJECTED,
        }
    ),
    State.PENDING_APPROVAL: frozenset({State.APPROVED, State.REJECTED, State.EXPIRED}),
    # A link stays payable after a failure: a later SUCCESS still counts.
    State.PAYMENT_FAILED: frozenset(
        {State.APPROVED, State.PENDING_APPROVAL, State.PENDING_PAYMENT, State.EXPIRED}
    ),
    # A late payment after expiry waits for an admin.
    State.EXPIRED: frozenset({State.PENDING_APPROVAL}),
    State.APPROVED: frozenset({State.REFUNDED}),
    State.REJECTED: frozenset(),
    State.REFUNDED: frozenset(),
}


class Outcome(enum.Enum):
    CHANGED = "changed"
    ALREADY_THERE = "already there"  # it was in the target state: nothing written
    REFUSED = "refused"  # not allowed from its state (or not from one of only_from)
    MISSING = "missing"  # no such enrollment


@dataclass(frozen=True)
class Transition:
    """What happened to one enrollment. `enrollment` is None only when it is MISSING."""

    enrollment_id: int
    outcome: Outcome
    enrollment: Enrollment | None
    from_state: str | None
    to_state: str
    history: EnrollmentHistory | None = None
    # Why a guard (refuse_if) refused an otherwise allowed change.
    refusal: str | None = None

    @property
    def changed(self) -> bool:
        return self.outcome is Outcome.CHANGED

    def explain(self) -> str:
        """Why nothing changed, in words an admin reads."""
        if self.outcome is Outcome.MISSING:
            return "does not exist"
        if self.outcome is Outcome.REFUSED:
            return self.refusal or f"is {self.from_state}; cannot become {self.to_state}"
        if self.outcome is Outcome.ALREADY_THERE:
            return f"already {self.to_state}"
        return f"{self.from_state} -> {self.to_state}"


def can_transition(from_state: str | None, to_state: str) -> bool:
    return to_state in ALLOWED.get(from_state, frozenset())  # type: ignore[call-overload]


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


def _history(
    enrollment_id: int,
    from_state: str | None,
    to_state: str,
    *,
    actor: str,
    actor_user_id: int | None,
    source: str,
    reason: str | None,
    event_id: int | None,
    at: datetime,
) -> dict[str, Any]:
    return {
        "enrollment_id": enrollment_id,
        "from_state": from_state,
        "to_state": to_state,
        "actor": actor,
        "actor_user_id": actor_user_id,
        "source": source,
        "reason": reason,
        "event_id": event_id,
        "created_at": at,
    }


def entered(state: State, reason: str | None, at: datetime) -> dict[str, Any]:
    """The columns that entering `state` sets, the state among them."""
    values: dict[str, Any] = {
        "state": state,
        "updated_at": at,
        # The approval queue's SLA clock runs from the latest move into the queue.
        "waiting_since": at if state == State.PENDING_APPROVAL else None,
    }
    if state == State.APPROVED:
        values["approved_at"] = at
    if state == State.PENDING_APPROVAL:
        values["waiting_reason"] = reason
    if state == State.REJECTED:
        values["rejection_reason"] = reason
    return values


def create_enrollment(
    session: Session,
    *,
    user_id: int,
    course_id: int,
    state: State,
    payment_method: PaymentMethod,
    expires_at: datetime | None,
    actor: str,
    actor_user_id: int | None,
    source: str,
    reason: str | None = None,
) -> Transition:
    """A new enrollment in an allowed first state, with its first history row (from nothing).

    Raises IntegrityError at flush when the student already has an open enrollment for the
    course (a unique index); the caller decides what to answer.
    """
    if not can_transition(None, state):
        raise InvalidTransition(f"a new enrollment cannot start as {state}")
    now = utcnow()
    enrollment = Enrollment(
        user_id=user_id,
        course_id=course_id,
        payment_method=payment_method,
        expires_at=expires_at,
        created_at=now,
    )
    for key, value in entered(state, reason, now).items():
        setattr(enrollment, key, value)
    session.add(enrollment)
    session.flush()
    history = EnrollmentHistory(
        **_history(
            enrollment.id,
            None,
            state,
            actor=actor,
            actor_user_id=actor_user_id,
            source=source,
            reason=reason,
            event_id=None,
            at=now,
        )
    )
    session.add(history)
    session.flush()
    return Transition(enrollment.id, Outcome.CHANGED, enrollment, None, state, history)


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
    only_from: frozenset[State] | None = None,
    payment_method: PaymentMethod | None = None,
    refuse_if: Callable[[Enrollment], str | None] | None = None,
) -> dict[int, Transition]:
    """Move each enrollment to to_state under its row lock, one history row per change.

    Returns a Transition per id saying what happened. `payment_method`, when given, changes
    with the state (a retry that switches from card to EFT), never on its own. `refuse_if`
    is a caller's policy, asked under the lock about each enrollment that could move: a
    reason refuses it (bulk approval passes over flagged rows this way).
    """
    locked = lock_enrollments(session, ids)
    now = utcnow()
    results: dict[int, Transition] = {}
    changing: list[tuple[Enrollment, str]] = []
    ids = list(dict.fromkeys(ids))
    for enrollment_id in ids:
        enrollment = locked.get(enrollment_id)
        if enrollment is None:
            results[enrollment_id] = Transition(
                enrollment_id, Outcome.MISSING, None, None, to_state
            )
            continue
        current = enrollment.state
        if current == to_state:
            results[enrollment_id] = Transition(
                enrollment_id, Outcome.ALREADY_THERE, enrollment, current, to_state
            )
            continue
        if not can_transition(current, to_state) or (
            only_from is not None and current not in only_from
        ):
            results[enrollment_id] = Transition(
                enrollment_id, Outcome.REFUSED, enrollment, current, to_state
            )
            continue
        if refuse_if is not None and (refusal := refuse_if(enrollment)):
            results[enrollment_id] = Transition(
                enrollment_id, Outcome.REFUSED, enrollment, current, to_state, refusal=refusal
            )
            continue
        changing.append((enrollment, current))
    if changing:
        _write(
            session,
            changing,
            to_state,
            reason,
            payment_method,
            now,
            results,
            actor=actor,
            actor_user_id=actor_user_id,
            source=source,
            event_id=event_id,
        )
    return {enrollment_id: results[enrollment_id] for enrollment_id in ids}


def _write(
    session: Session,
    changing: list[tuple[Enrollment, str]],
    to_state: State,
    reason: str | None,
    payment_method: PaymentMethod | None,
    at: datetime,
    results: dict[int, Transition],
    **who: Any,
) -> None:
    """Apply the changes as statements over all the rows at once: one UPDATE of the
    enrollments (the columns are the same for each) and one INSERT of their history rows. The
    locked objects are brought up to date without being marked changed, so the session does
    not write them again."""
    values = entered(to_state, reason, at)
    if payment_method is not None:
        values["payment_method"] = payment_method
    ids = [enrollment.id for enrollment, _ in changing]
    session.execute(update(_ENROLLMENTS).where(_ENROLLMENTS.c.id.in_(ids)).values(**values))
    rows = [
        _history(enrollment.id, current, to_state, reason=reason, at=at, **who)
        for enrollment, current in changing
    ]
    history_ids = insert_many(session, _HISTORY, rows)
    for (enrollment, current), row, history_id in zip(changing, rows, history_ids, strict=True):
        for key, value in values.items():
            set_committed_value(enrollment, key, value)
        history = EnrollmentHistory(id=history_id, **row)
        results[enrollment.id] = Transition(
            enrollment.id, Outcome.CHANGED, enrollment, current, to_state, history
        )


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
    only_from: frozenset[State] | None = None,
    payment_method: PaymentMethod | None = None,
    strict: bool = True,
) -> Transition:
    """transition_enrollments() for one enrollment.

    A missing enrollment raises NotFound. A transition that is not allowed raises
    InvalidTransition when strict, and comes back REFUSED otherwise: the pipeline uses
    strict=False so that, say, a FAILURE arriving after an approval leaves it alone.
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
        payment_method=payment_method,
    )[enrollment_id]
    if result.outcome is Outcome.MISSING:
        raise NotFound(f"enrollment {enrollment_id} does not exist")
    if result.outcome is Outcome.REFUSED and strict:
        raise InvalidTransition(f"enrollment {enrollment_id} {result.explain()}")
    return result
