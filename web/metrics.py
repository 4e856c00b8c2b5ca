"""Prometheus metrics: request counters here, queue and dead-letter gauges read from the database
at scrape time (so they are right whichever process did the work)."""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from models import (
    DeadLetter,
    Enrollment,
    EnrollmentFlag,
    ReconciliationFinding,
    ReconciliationRun,
    StatementLine,
    WebhookEvent,
    session_scope,
)
from pipeline.reconcile import KINDS

REGISTRY = CollectorRegistry()
WEBHOOKS = Counter(
    "skillpay_webhooks_total", "Callbacks received, by outcome", ["outcome"], registry=REGISTRY
)
REQUEST_SECONDS = Histogram(
    "skillpay_http_request_seconds",
    "HTTP request latency",
    ["endpoint", "status"],
    registry=REGISTRY,
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)


class DatabaseCollector(Collector):
    """Gauges counted in the database, at most once per CACHE_SECONDS per process: a scrape
    (or anyone looping /metrics) does not run three full-table counts each time."""

    CACHE_SECONDS = 15.0

    def __init__(self) -> None:
        self._at = float("-inf")
        self._families: list[GaugeMetricFamily] = []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        now = time.monotonic()
        if now - self._at > self.CACHE_SECONDS:
            try:
                self._families, self._at = self._count(), now
            except Exception:  # noqa: BLE001 - a scrape must not fail because the database did
                return  # nothing cached: the next scrape tries again
        yield from self._families

    @staticmethod
    def _count() -> list[GaugeMetricFamily]:
        events = GaugeMetricFamily(
            "skillpay_inbox_events", "Inbox events by state", labels=["state"]
        )
        dead = GaugeMetricFamily("skillpay_dead_letters_open", "Dead letters not yet replayed")
        enrollments = GaugeMetricFamily(
            "skillpay_enrollments", "Enrollments by state", labels=["state"]
        )
        with session_scope() as s:
            for state, count in s.execute(
                select(WebhookEvent.state, func.count()).group_by(WebhookEvent.state)
            ):
                events.add_metric([state], count)
            open_letters = s.scalar(
                select(func.count()).select_from(DeadLetter).where(DeadLetter.resolved_at.is_(None))
            )
            dead.add_metric([], open_letters or 0)
            for state, count in s.execute(
                select(Enrollment.state, func.count()).group_by(Enrollment.state)
            ):
                enrollments.add_metric([state], count)
            extra = _money_checks(s)
        return [events, dead, enrollments, *extra]


def _money_checks(s) -> list[GaugeMetricFamily]:
    """Reconciliation's last run by kind, enrollments flagged for an admin, statement lines
    proposed and not yet confirmed."""
    findings = GaugeMetricFamily(
        "skillpay_reconciliation_findings",
        "What the latest finished reconciliation run found, by kind",
        labels=["kind"],
    )
    last = s.scalar(
        select(ReconciliationRun)
        .where(ReconciliationRun.finished_at.is_not(None))
        .order_by(ReconciliationRun.id.desc())
        .limit(1)
    )
    counts = dict.fromkeys(KINDS, 0)
    if last is not None:
        counts.update(
            s.execute(
                select(ReconciliationFinding.kind, func.count())
                .where(ReconciliationFinding.run_id == last.id)
                .group_by(ReconciliationFinding.kind)
            ).all()
        )
    for kind, count in counts.items():
        findings.add_metric([kind], count)
    finished = GaugeMetricFamily(
        "skillpay_reconciliation_last_run_timestamp_seconds",
        "When the latest reconciliation run finished (Unix time; 0: never)",
    )
    finished.add_metric([], last.finished_at.timestamp() if last and last.finished_at else 0)
    flagged = GaugeMetricFamily(
        "skillpay_enrollments_flagged", "Open flags for an admin, by kind", labels=["kind"]
    )
    for kind, count in s.execute(
        select(EnrollmentFlag.kind, func.count())
        .where(EnrollmentFlag.cleared_at.is_(None))
        .group_by(EnrollmentFlag.kind)
    ):
        flagged.add_metric([kind], count)
    proposed = GaugeMetricFamily(
        "skillpay_statement_lines_proposed",
        "Bank statement lines proposed and not confirmed, by match",
        labels=["match"],
    )
    for match, count in s.execute(
        select(StatementLine.match, func.count())
        .where(StatementLine.state == "proposed", StatementLine.match != "ignored")
        .group_by(StatementLine.match)
    ):
        proposed.add_metric([match], count)
    return [findings, finished, flagged, proposed]


DATABASE_GAUGES = DatabaseCollector()
REGISTRY.register(DATABASE_GAUGES)
