"""Scheduled work runs once per period, however many beats send it.

Celery beat must run as one process; if a second is started by mistake (two machines with
`-B`, a redeploy that overlaps), both send every scheduled task. Each scheduled run first
claims its task's current period in the database; the second claim of a period fails on the
primary key, and that run does nothing. Runs sent by hand (the CLI, Flower) carry no period
and always run.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from models import ScheduledRun, utcnow

KEEP_PERIODS_SECONDS = 86_400  # a day of claims is kept, for whoever wants to look


def claim_period(
    session: Session, task: str, period_seconds: float, now: datetime | None = None
) -> bool:
    """Claim this period of `task`; False if another run has it already."""
    now = now or utcnow()
    period = int(now.timestamp() // period_seconds)
    try:
        with session.begin_nested():
            session.add(ScheduledRun(task=task, period=period, started_at=now))
    except IntegrityError:
        return False
    session.execute(
        delete(ScheduledRun).where(
            ScheduledRun.task == task,
            ScheduledRun.period < period - int(KEEP_PERIODS_SECONDS // period_seconds),
        )
    )
    return True
