"""Bulk approval approves plain bank transfers only; anything flagged waits for a person."""

from __future__ import annotations

from models import State, User
from pipeline import bulk
from pipeline.checkout import EFT_WAITING_REASON
from tests.support import make_enrollment, make_user


def test_flagged_enrollments_are_skipped_with_their_reason(session, settings):
    admin, _ = make_user(session, role="admin")
    plain, _ = make_enrollment(session, method="eft", state=State.PENDING_APPROVAL)
    plain.waiting_reason = EFT_WAITING_REASON
    mismatch, _ = make_enrollment(session, method="card", state=State.PENDING_APPROVAL)
    mismatch.waiting_reason = "amount 1 cents, expected 150000"
    session.flush()
    job, _ = bulk.create_job(
        session, session.get(User, admin.id), [plain.id, mismatch.id], None, lambda _: None
    )
    session.commit()
    bulk.run_job(settings, job.id)
    session.expire_all()
    assert (plain.state, mismatch.state) == ("approved", "pending_approval")
    progress = bulk.job_progress(session, job.id)
    assert progress.counts == {"pending": 0, "approved": 1, "skipped": 1, "failed": 0}
    detail = {i.enrollment_id: i.detail for i in progress.items}[mismatch.id]
    assert detail == "flagged (amount 1 cents, expected 150000): approve it on its own"
