"""The operator's console through the Flask test client, against PostgreSQL: four-eyes
approval, the queue's SLA timers and sort, search, an enrollment's trail, dead letters in
the attention list, and the figures /metrics adds for the alerts."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest
from sqlalchemy import select

from models import (
    ApprovalRequest,
    EnrollmentHistory,
    Notification,
    State,
    User,
    utcnow,
)
from pipeline import bulk, runner
from pipeline.checkout import EFT_WAITING_REASON
from pipeline.errors import UnknownPayment
from pipeline.ikhokha import MemoryGateway
from pipeline.stages import STAGE_NAMES, StageContext
from pipeline.state_machine import transition_enrollment
from tests.support import (
    REFUSED_SIGNATURE,
    RecordingQueue,
    callback_body,
    make_enrollment,
    make_user,
    metric_sample,
    post_callback,
    stored_callback,
)
from web.app import create_app

FOUR_EYES_ABOVE = 100_000  # R 1,000.00


@pytest.fixture
def client(settings, session):
    app = create_app(
        replace(settings, four_eyes_above_cents=FOUR_EYES_ABOVE, approval_sla_hours=24),
        gateway=MemoryGateway(),
    )
    app.extensions["skillpay.celery"].queue = RecordingQueue()
    return app.test_client()


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def dead_letter(session, settings, payment, stage: str, *, known: bool = True):
    """A callback for the payment that failed for good at `stage`."""
    event = stored_callback(session, settings, callback_body(payment))
    event.state, event.stage = "processing", stage
    if known:
        event.payment_id = payment.id  # as detection records it
    session.flush()
    runner.record_failure(stage, event.id, 3, UnknownPayment("gone"), settings, final=True)
    return event


def gauge(text: str, name: str) -> float | None:
    return metric_sample(text, name)


def waiting_transfer(session, amount_cents: int, waited: timedelta = timedelta(0)):
    enrollment, payment = make_enrollment(
        session, method="eft", state=State.PENDING_APPROVAL, amount_cents=amount_cents
    )
    enrollment.waiting_reason = EFT_WAITING_REASON
    enrollment.waiting_since = utcnow() - waited
    session.flush()
    return enrollment, payment


def test_above_the_amount_two_different_admins_approve(client, session):
    first, first_token = make_user(session, role="admin")
    second, second_token = make_user(session, role="admin")
    enrollment, _ = waiting_transfer(session, 150_000)
    url = f"/api/admin/enrollments/{enrollment.id}/approve"

    asked = client.post(url, json={}, headers=auth(first_token))
    assert asked.status_code == 202 and asked.json["state"] == "pending_approval"
    assert asked.json["changed"] is False
    assert asked.json["four_eyes"]["requested_by"] == first.id
    assert "R 1,500.00 is above the four-eyes amount (R 1,000.00)" in asked.json["message"]
    # The one who asked cannot confirm their own approval: asking again changes nothing.
    again = client.post(url, json={}, headers=auth(first_token))
    assert again.status_code == 202 and again.json["state"] == "pending_approval"
    assert len(session.scalars(select(ApprovalRequest)).all()) == 1
    queue = client.get("/api/admin/enrollments", headers=auth(first_token)).json["items"]
    assert queue[0]["four_eyes"]["requested_by_me"] is True
    other_view = client.get("/api/admin/enrollments", headers=auth(second_token)).json["items"]
    assert other_view[0]["four_eyes"]["requested_by_me"] is False
    admins_told = session.scalars(
        select(Notification.audience).where(Notification.kind == "enrollment.approval_requested")
    ).all()
    assert admins_told == ["admins"]

    confirmed = client.post(url, json={}, headers=auth(second_token))
    assert confirmed.status_code == 200 and confirmed.json["state"] == "approved"
    history = session.scalars(
        select(EnrollmentHistory).where(EnrollmentHistory.to_state == "approved")
    ).one()
    assert history.actor_user_id == second.id
    assert history.reason == (
        f"four-eyes approval: asked by admin {first.id}, confirmed by admin {second.id}"
    )
    request = session.scalars(select(ApprovalRequest)).one()
    assert (request.confirmed_by, request.cancelled_at) == (second.id, None)


def test_at_or_below_the_amount_one_admin_approves(client, session):
    _, token = make_user(session, role="admin")
    enrollment, _ = waiting_transfer(session, FOUR_EYES_ABOVE)
    done = client.post(
        f"/api/admin/enrollments/{enrollment.id}/approve", json={}, headers=auth(token)
    )
    assert done.status_code == 200 and done.json["state"] == "approved"


def test_a_rejection_cancels_the_request_and_a_request_from_an_earlier_wait_is_void(
    client, session
):
    _, first_token = make_user(session, role="admin")
    _, second_token = make_user(session, role="admin")
    rejected, _ = waiting_transfer(session, 150_000)
    client.post(f"/api/admin/enrollments/{rejected.id}/approve", json={}, headers=auth(first_token))
    client.post(
        f"/api/admin/enrollments/{rejected.id}/reject",
        json={"reason": "no money arrived"},
        headers=auth(second_token),
    )
    assert session.scalars(select(ApprovalRequest)).one().cancelled_at is not None

    # Asked for, then the enrollment left the queue and came back: that request was about
    # the first wait, so the next admin's approval is a new request, not a confirmation.
    returned, _ = waiting_transfer(session, 150_000)
    url = f"/api/admin/enrollments/{returned.id}/approve"
    client.post(url, json={}, headers=auth(first_token))
    for state in (State.EXPIRED, State.PENDING_APPROVAL):
        transition_enrollment(session, returned.id, state, actor="test", source="test")
    session.flush()
    second_try = client.post(url, json={}, headers=auth(second_token))
    assert second_try.status_code == 202 and second_try.json["state"] == "pending_approval"


def test_bulk_approval_passes_over_rows_above_the_four_eyes_amount(session, settings):
    admin, _ = make_user(session, role="admin")
    small, _ = waiting_transfer(session, 50_000)
    large, _ = waiting_transfer(session, 150_000)
    job, _ = bulk.create_job(
        session, session.get(User, admin.id), [small.id, large.id], None, lambda _: None
    )
    session.commit()
    bulk.run_job(replace(settings, four_eyes_above_cents=FOUR_EYES_ABOVE), job.id)
    session.expire_all()
    assert (small.state, large.state) == ("approved", "pending_approval")
    detail = {i.enrollment_id: i.detail for i in bulk.job_progress(session, job.id).items}
    assert detail[large.id] == "above the four-eyes amount: two admins approve it on its own"


def test_the_queue_shows_each_wait_against_the_target_and_sorts_by_it(client, session):
    _, token = make_user(session, role="admin")
    late, _ = waiting_transfer(session, 50_000, waited=timedelta(hours=30))
    fresh, _ = waiting_transfer(session, 50_000, waited=timedelta(minutes=5))
    middle, _ = waiting_transfer(session, 50_000, waited=timedelta(hours=3))
    longest_first = client.get("/api/admin/enrollments", headers=auth(token)).json
    assert [e["id"] for e in longest_first["items"]] == [late.id, middle.id, fresh.id]
    assert longest_first["sla_seconds"] == 24 * 3600
    by_id = {e["id"]: e for e in longest_first["items"]}
    assert by_id[late.id]["overdue"] is True and by_id[middle.id]["overdue"] is False
    assert abs(by_id[late.id]["waited_seconds"] - 30 * 3600) < 60
    newest_first = client.get("/api/admin/enrollments?sort=-waiting", headers=auth(token)).json
    assert [e["id"] for e in newest_first["items"]] == [fresh.id, middle.id, late.id]
    wrong = client.get("/api/admin/enrollments?sort=amount", headers=auth(token))
    assert wrong.status_code == 400


def test_search_finds_by_email_reference_paylink_and_id(client, session):
    _, token = make_user(session, role="admin")
    student, _ = make_user(session, email="thandi.nkosi@example.com")
    card, card_payment = make_enrollment(session, user=student)
    other, other_payment = make_enrollment(session, method="eft", state=State.PENDING_APPROVAL)

    def found(q: str) -> list[int]:
        answer = client.get("/api/admin/search", query_string={"q": q}, headers=auth(token))
        assert answer.status_code == 200
        return [e["id"] for e in answer.json["items"]]

    assert found("THANDI.nkosi") == [card.id]
    spaced = other_payment.reference.lower().replace("-", " ")  # as a bank line writes it
    assert found(spaced) == [other.id]
    assert found(card_payment.paylink_id) == [card.id]
    assert found(card_payment.id) == [card.id]
    assert found(str(other.id)) == [other.id]
    assert found("%") == [] and found("_@_") == []  # wildcards are plain characters
    assert found("nobody@nowhere.example") == []
    _, student_token = make_user(session)
    assert client.get("/api/admin/search?q=x", headers=auth(student_token)).status_code == 403


def test_the_trail_tells_an_enrollments_whole_story(client, session, settings):
    admin, token = make_user(session, role="admin")
    enrollment, payment = make_enrollment(session)
    dead_letter(session, settings, payment, "enrollment_lookup")
    transition_enrollment(
        session,
        enrollment.id,
        State.PENDING_APPROVAL,
        actor=f"admin:{admin.id}",
        actor_user_id=admin.id,
        source="admin",
        reason="checking by hand",
    )
    session.flush()
    answer = client.get(f"/api/admin/enrollments/{enrollment.id}/trail", headers=auth(token))
    assert answer.status_code == 200
    kinds = [entry["kind"] for entry in answer.json["trail"]]
    assert kinds == ["payment", "callback", "dead_letter", "state"]
    texts = [entry["text"] for entry in answer.json["trail"]]
    assert f"card payment {payment.reference} for R 1,500.00" in texts[0]
    assert "callback SUCCESS" in texts[1] and "dead letter at enrollment_lookup" in texts[1]
    assert texts[2].endswith("at enrollment_lookup after 3 attempt(s): gone")
    assert texts[3].startswith(f"pending_payment -> pending_approval by admin:{admin.id}")
    assert answer.json["trail"][3]["user_email"] == admin.email
    missing = client.get("/api/admin/enrollments/999999/trail", headers=auth(token))
    assert missing.status_code == 404


def test_a_dead_letter_with_a_known_enrollment_needs_attention_until_replayed(
    client, session, settings
):
    _, token = make_user(session, role="admin")
    enrollment, payment = make_enrollment(session)
    dead_letter(session, settings, payment, "approval_routing")
    told = session.scalars(
        select(Notification).where(Notification.kind == "enrollment.needs_attention")
    ).all()
    assert [n.audience for n in told] == ["admins"]  # the student is not shown internals
    assert told[0].payload["stage"] == "approval_routing"
    items = client.get("/api/admin/attention", headers=auth(token)).json["items"]
    assert [(i["kind"], i["enrollment_id"], i["stage"]) for i in items] == [
        ("dead_letter", enrollment.id, "approval_routing")
    ]
    assert items[0]["reason"].endswith("at approval_routing: gone")
    replayed = client.post(
        f"/api/admin/dead-letters/{items[0]['dead_letter_id']}/replay",
        json={"from_stage": "enrollment_lookup"},
        headers=auth(token),
    )
    assert replayed.status_code == 202
    assert client.get("/api/admin/attention", headers=auth(token)).json["items"] == []


def test_an_unknown_callback_dead_letter_is_not_an_enrollments_attention(client, session, settings):
    _, token = make_user(session, role="admin")
    _, payment = make_enrollment(session)
    dead_letter(session, settings, payment, "payment_type_detection", known=False)
    assert client.get("/api/admin/attention", headers=auth(token)).json["items"] == []
    letters = client.get("/api/admin/dead-letters", headers=auth(token)).json["items"]
    assert [letter["stage"] for letter in letters] == ["payment_type_detection"]


def test_jobs_list_shows_progress(client, session, settings):
    admin, token = make_user(session, role="admin")
    small, _ = waiting_transfer(session, 50_000)
    job, _ = bulk.create_job(session, session.get(User, admin.id), [small.id], None, lambda _: 0)
    session.commit()
    queued = client.get("/api/admin/jobs", headers=auth(token)).json["items"]
    assert [(j["id"], j["state"], j["done"], j["total"]) for j in queued] == [
        (job.id, "queued", 0, 1)
    ]
    bulk.run_job(settings, job.id)
    done = client.get("/api/admin/jobs", headers=auth(token)).json["items"][0]
    assert (done["state"], done["progress"], done["counts"]["approved"]) == ("done", 1.0, 1)


def test_the_console_says_where_flower_is_and_which_stages_replay(settings, session):
    app = create_app(
        replace(settings, flower_url="https://flower.example/"), gateway=MemoryGateway()
    )
    _, token = make_user(session, role="admin")
    info = app.test_client().get("/api/admin/console", headers=auth(token)).json
    assert info["flower_url"] == "https://flower.example/"
    assert info["stages"][0] == "signature_check" and info["stages"][-1] == "notification"
    _, student = make_user(session)
    assert app.test_client().get("/api/admin/console", headers=auth(student)).status_code == 403


def refused_count(text: str) -> float:
    return metric_sample(text, REFUSED_SIGNATURE) or 0.0


def metrics_text(client) -> str:
    return client.get("/metrics").get_data(as_text=True)


def test_metrics_carry_what_the_alerts_need(client, session, settings):
    waiting_transfer(session, 50_000, waited=timedelta(hours=30))
    waiting_transfer(session, 50_000, waited=timedelta(hours=1))
    _, payment = make_enrollment(session)
    event = stored_callback(session, settings, callback_body(payment))
    event.updated_at = utcnow() - timedelta(minutes=20)  # an event stuck 20 minutes
    _, other = make_enrollment(session)
    dead_letter(session, settings, other, "signature_check", known=False)
    refused_before = refused_count(metrics_text(client))  # the counter is this process's
    refused = post_callback(client, callback_body(payment), secret="not-the-secret")
    assert refused.status_code == 401
    session.flush()
    text = metrics_text(client)
    assert refused_count(text) == refused_before + 1
    assert "skillpay_database_up 1.0" in text
    assert 'skillpay_dead_letters_open{stage="signature_check"} 1.0' in text
    assert 'skillpay_dead_letters_open{stage="notification"} 0.0' in text
    assert "skillpay_approval_sla_seconds 86400.0" in text
    assert "skillpay_approvals_over_sla 1.0" in text
    assert abs(gauge(text, "skillpay_approval_oldest_waiting_seconds") - 30 * 3600) < 60
    assert abs(gauge(text, "skillpay_inbox_oldest_unfinished_seconds") - 20 * 60) < 60
    assert 'skillpay_queue_depth{queue="skillpay"} 0.0' in text  # the recording queue's
    assert "process_resident_memory_bytes" in text


def test_stage_durations_and_business_figures(client, session, settings):
    ctx = StageContext(settings, MemoryGateway())
    enrollment, payment = make_enrollment(session)
    failed, failed_payment = make_enrollment(session)
    for body in (callback_body(payment), callback_body(failed_payment, "FAILURE")):
        event = stored_callback(session, settings, body)
        for stage in STAGE_NAMES:
            runner.run_stage(stage, event.id, 1, ctx)
    session.expire_all()
    assert (enrollment.state, failed.state) == ("approved", "payment_failed")
    text = metrics_text(client)
    assert 'skillpay_card_payments_settled_24h{outcome="success"} 1.0' in text
    assert 'skillpay_card_payments_settled_24h{outcome="failure"} 1.0' in text
    assert "skillpay_card_success_ratio_24h 0.5" in text
    assert 'skillpay_time_to_approval_seconds{method="card",quantile="0.5"}' in text
    for stage in STAGE_NAMES:
        assert f'skillpay_stage_duration_seconds{{quantile="0.99",stage="{stage}"}}' in text
        assert f'skillpay_stage_runs_recent{{outcome="ok",stage="{stage}"}} 2.0' in text


def statements_for(client, path: str, token: str) -> tuple[int, dict]:
    """The SQL statements one request issues, and its answer."""
    from sqlalchemy import event

    from models import get_engine

    seen: list[str] = []

    def count(_conn, _cursor, statement, *_args) -> None:
        seen.append(statement)

    event.listen(get_engine(), "before_cursor_execute", count)
    try:
        answer = client.get(path, headers=auth(token))
    finally:
        event.remove(get_engine(), "before_cursor_execute", count)
    assert answer.status_code == 200
    return len(seen), answer.json


def test_the_queue_and_search_cost_the_same_few_queries_however_long_the_page(client, session):
    _, token = make_user(session, role="admin")
    for _ in range(2):
        make_enrollment(session, method="eft", state=State.PENDING_APPROVAL)
    session.commit()
    queue = "/api/admin/enrollments?per_page=50"
    search = "/api/admin/search?q=example.com"
    few, answer = statements_for(client, queue, token)
    assert len(answer["items"]) == 2
    few_found, answer = statements_for(client, search, token)
    assert len(answer["items"]) >= 2
    for _ in range(12):
        make_enrollment(session, method="eft", state=State.PENDING_APPROVAL)
    session.commit()
    many, answer = statements_for(client, queue, token)
    assert len(answer["items"]) == 14
    assert all(row["payment"] and row["student_email"] for row in answer["items"])
    many_found, answer = statements_for(client, search, token)
    assert len(answer["items"]) >= 14
    assert (many, many_found) == (few, few_found)
