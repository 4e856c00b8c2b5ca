from __future__ import annotations

from datetime import UTC, datetime

import pytest
from freezegun import freeze_time
from sqlalchemy import func, select

from models import EnrollmentHistory, PaymentMethod, State
from pipeline.errors import InvalidTransition, NotFound
from pipeline.state_machine import (
    ALLOWED,
    Outcome,
    create_enrollment,
    transition_enrollment,
    transition_enrollments,
)
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
    assert again.outcome is Outcome.ALREADY_THERE and again.history is None
    assert history_count(session, enrollment.id) == 1


def test_failure_never_undoes_an_approval(session):
    enrollment, _ = make_enrollment(session, state=State.APPROVED)
    with pytest.raises(InvalidTransition):
        transition_enrollment(session, enrollment.id, State.PAYMENT_FAILED, actor="a", source="s")
    lenient = transition_enrollment(
        session, enrollment.id, State.PAYMENT_FAILED, actor="a", source="s", strict=False
    )
    assert lenient.outcome is Outcome.REFUSED and enrollment.state == "approved"
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
    assert results[waiting.id].outcome is Outcome.CHANGED
    assert results[done.id].outcome is Outcome.ALREADY_THERE
    assert results[refused.id].outcome is Outcome.REFUSED
    assert results[refused.id].explain() == "is rejected; cannot become approved"
    assert results[999999].outcome is Outcome.MISSING and results[999999].enrollment is None


def test_missing_enrollment_is_not_found(session):
    with pytest.raises(NotFound):
        transition_enrollment(session, 424242, State.APPROVED, actor="a", source="s")


def test_terminal_states_have_no_way_out():
    assert ALLOWED[State.REJECTED] == frozenset()
    assert ALLOWED[State.REFUNDED] == frozenset()
    assert State.PAYMENT_FAILED not in ALLOWED[State.APPROVED]
    assert State.PAYMENT_FAILED not in ALLOWED[State.PENDING_APPROVAL]


def test_unpaid_enrollments_expire_and_paid_ones_do_not(session, settings):
    from pipeline.expiry import expire_unpaid_enrollments

    stale, _ = make_enrollment(session)
    fresh, _ = make_enrollment(session)
    paid, _ = make_enrollment(session, state=State.APPROVED)
    for enrollment in (stale, paid):
        enrollment.expires_at = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    fresh.expires_at = datetime(2026, 1, 1, 14, 0, tzinfo=UTC)
    session.flush()
    with freeze_time("2026-01-01 11:59"):
        assert expire_unpaid_enrollments(session, settings) == 0
    with freeze_time("2026-01-01 13:00"):
        assert expire_unpaid_enrollments(session, settings) == 1
        assert expire_unpaid_enrollments(session, settings) == 0
    assert (stale.state, fresh.state, paid.state) == ("expired", "pending_payment", "approved")
    assert history_count(session, stale.id) == 1


def test_a_new_enrollment_starts_only_where_allowed_with_its_first_history_row(session):
    from tests.support import make_course, make_user

    user, _ = make_user(session)
    course = make_course(session)
    created = create_enrollment(
        session,
        user_id=user.id,
        course_id=course.id,
        state=State.PENDING_APPROVAL,
        payment_method=PaymentMethod.EFT,
        expires_at=None,
        actor=f"user:{user.id}",
        actor_user_id=user.id,
        source="checkout",
        reason="EFT payment",
    )
    assert created.outcome is Outcome.CHANGED and created.from_state is None
    enrollment = created.enrollment
    assert (enrollment.state, enrollment.payment_method, enrollment.waiting_reason) == (
        "pending_approval",
        "eft",
        "EFT payment",
    )
    assert (created.history.from_state, created.history.to_state) == (None, "pending_approval")
    with pytest.raises(InvalidTransition, match="cannot start as approved"):
        create_enrollment(
            session,
            user_id=user.id,
            course_id=make_course(session).id,
            state=State.APPROVED,
            payment_method=PaymentMethod.CARD,
            expires_at=None,
            actor="a",
            actor_user_id=None,
            source="s",
        )


def test_payment_method_changes_only_with_a_transition(session):
    enrollment, _ = make_enrollment(session, state=State.PAYMENT_FAILED)
    transition_enrollment(
        session,
        enrollment.id,
        State.PENDING_APPROVAL,
        actor="user:1",
        source="checkout",
        payment_method=PaymentMethod.EFT,
    )
    assert (enrollment.state, enrollment.payment_method) == ("pending_approval", "eft")
    refused = transition_enrollment(
        session,
        enrollment.id,
        State.PENDING_PAYMENT,
        actor="user:1",
        source="checkout",
        payment_method=PaymentMethod.CARD,
        strict=False,
    )
    assert refused.outcome is Outcome.REFUSED and enrollment.payment_method == "eft"


def test_a_guard_refuses_under_the_lock_with_its_reason(session):
    plain, _ = make_enrollment(session, method="eft", state=State.PENDING_APPROVAL)
    odd, _ = make_enrollment(session, method="eft", state=State.PENDING_APPROVAL)
    odd.waiting_reason = "amount mismatch"
    session.flush()
    results = transition_enrollments(
        session,
        [plain.id, odd.id],
        State.APPROVED,
        actor="admin:1",
        source="admin_bulk",
        refuse_if=lambda e: "needs a person" if e.waiting_reason else None,
    )
    assert results[plain.id].changed and plain.state == "approved"
    refused = results[odd.id]
    assert (refused.outcome, refused.explain(), odd.state) == (
        Outcome.REFUSED,
        "needs a person",
        "pending_approval",
    )
    assert history_count(session, odd.id) == 0
