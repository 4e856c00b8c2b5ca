from __future__ import annotations

import pytest
from sqlalchemy import func, select

from models import EnrollmentHistory, State
from pipeline.errors import InvalidTransition, NotFound
from pipeline.state_machine import ALLOWED, transition_enrollment, transition_enrollments
from tests.support import make_enrollment


def history_count(session, enrollment_id):
    return session.scalar(
        select(func.count())
        .select_from(EnrollmentHistory)
        .where(EnrollmentHistory.enrollment_id == enrollment_id)
    )


def test_transition_writes_one_history_row(session):
    enrollment, _ = make_enrollment(session)
    result = transition_enrollment(
        session, enrollment.id, State.APPROVED, actor="pipeline", source="webhook", reason="card"
    )
    assert result.changed and result.from_state == "pending_payment"
    assert enrollment.state == "approved" and enrollment.course_access
    row = session.scalar(
        select(EnrollmentHistory).where(EnrollmentHistory.enrollment_id == enrollment.id)
    )
    assert (row.from_state, row.to_state, row.actor, row.source, row.reason) == (
        "pending_payment",
        "approved",
        "pipeline",
        "webhook",
        "card",
    )


def test_same_target_again_changes_nothing(session):
    enrollment, _ = make_enrollment(session)
    transition_enrollment(session, enrollment.id, State.APPROVED, actor="a", source="s")
    again = transition_enrollment(session, enrollment.id, State.APPROVED, actor="a", source="s")
    assert not again.changed
    assert history_count(session, enrollment.id) == 1


def test_failure_never_undoes_an_approval(session):
    enrollment, _ = make_enrollment(session, state=State.APPROVED)
    with pytest.raises(InvalidTransition):
        transition_enrollment(session, enrollment.id, State.PAYMENT_FAILED, actor="a", source="s")
    lenient = transition_enrollment(
        session, enrollment.id, State.PAYMENT_FAILED, actor="a", source="s", strict=False
    )
    assert not lenient.changed and enrollment.state == "approved"
    assert history_count(session, enrollment.id) == 0


def test_only_from_limits_the_starting_states(session):
    enrollment, _ = make_enrollment(session, state=State.PENDING_PAYMENT)
    with pytest.raises(InvalidTransition, match="pending_payment"):
        transition_enrollment(
            session,
            enrollment.id,
            State.APPROVED,
            actor="admin:1",
            source="admin",
            only_from=frozenset({State.PENDING_APPROVAL}),
        )


def test_batch_reports_each_enrollment(session):
    waiting, _ = make_enrollment(session, method="eft", state=State.PENDING_APPROVAL)
    done, _ = make_enrollment(session, method="eft", state=State.APPROVED)
    refused, _ = make_enrollment(session, method="eft", state=State.REJECTED)
    results = transition_enrollments(
        session,
        [waiting.id, done.id, refused.id, 999999],
        State.APPROVED,
        actor="admin:1",
        source="admin_bulk",
    )
    assert results[waiting.id].changed
    assert not results[done.id].changed
    assert results[refused.id] == "is rejected; cannot become approved"
    assert results[999999] == "does not exist"


def test_missing_enrollment_is_not_found(session):
    with pytest.raises(NotFound):
        transition_enrollment(session, 424242, State.APPROVED, actor="a", source="s")


def test_terminal_states_have_no_way_out():
    assert ALLOWED[State.REJECTED] == frozenset()
    assert ALLOWED[State.REFUNDED] == frozenset()
    assert State.PAYMENT_FAILED not in ALLOWED[State.APPROVED]
    assert State.PAYMENT_FAILED not in ALLOWED[State.PENDING_APPROVAL]


def test_unpaid_enrollments_expire_and_paid_ones_do_not(session, settings):
    from datetime import timedelta

    from models import utcnow
    from pipeline.enrollments import expire_stale

    stale, _ = make_enrollment(session)
    fresh, _ = make_enrollment(session)
    paid, _ = make_enrollment(session, state=State.APPROVED)
    stale.expires_at = utcnow() - timedelta(minutes=1)
    fresh.expires_at = utcnow() + timedelta(hours=1)
    paid.expires_at = utcnow() - timedelta(minutes=1)
    session.flush()
    assert expire_stale(session, settings) == 1
    assert (stale.state, fresh.state, paid.state) == ("expired", "pending_payment", "approved")
    assert history_count(session, stale.id) == 1
    assert expire_stale(session, settings) == 0
