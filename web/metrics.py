"""Prometheus metrics.

Counted as they happen, in the web process: callbacks by outcome, callbacks refused by reason,
request latency. Under gunicorn these are whole across its workers (multiprocess mode, see
web/gunicorn_conf.py). Read from the database and the broker at scrape time, so they are right
whichever process did the work: the inbox, dead letters by stage, the approval queue against
its SLA, stage durations, business figures, reconciliation; plus whether the database
answers, the broker queue's depth, and the answering process's own CPU and memory.
"""

from __future__ import annotations

import collections
import os
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from config import Settings
from models import (
    DeadLetter,
    Enrollment,
    EnrollmentFlag,
    EventState,
    Payment,
    PaymentMethod,
    ReconciliationFinding,
    ReconciliationRun,
    StageAttempt,
    State,
    StatementLine,
    WebhookEvent,
    session_scope,
    utcnow,
)
from pipeline.reconcile import KINDS
from pipeline.stages import STAGE_NAMES

REGISTRY = CollectorRegistry()
WEBHOOKS = Counter(
    "skillpay_webhooks_total", "Callbacks received, by outcome", ["outcome"], registry=REGISTRY
)
CALLBACKS_REFUSED = Counter(
    "skillpay_callbacks_refused_total",
    "Callbacks answered 4xx and not stored, by reason (bad_signature, bad_app_id, malformed, "
    "too_large)",
    ["reason"],
    registry=REGISTRY,
)
REQUEST_SECONDS = Histogram(
    "skillpay_http_request_seconds",
    "HTTP request latency",
    ["endpoint", "status"],
    registry=REGISTRY,
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
PROCESS = ProcessCollector(registry=None)

# Stage durations and business figures are over these recent windows.
STAGE_WINDOW = timedelta(minutes=5)
BUSINESS_WINDOW = timedelta(hours=24)
QUANTILES = (0.5, 0.95, 0.99)
MAX_SAMPLES = 20_000


def render(gauges: OperatorGauges) -> bytes:
    """One scrape: this process's counters (or every gunicorn worker's, in multiprocess
    mode), the gauges read from the database and broker, and this process's resources."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        counted: Collector = CollectorRegistry()
        MultiProcessCollector(counted)  # type: ignore[arg-type]
    else:
        counted = REGISTRY
    return generate_latest(_Together((counted, PROCESS, gauges)))  # type: ignore[arg-type]


class _Together:
    def __init__(self, collectors: Iterable[Collector]) -> None:
        self.collectors = collectors

    def collect(self) -> Iterator[Metric]:
        for collector in self.collectors:
            yield from collector.collect()


class OperatorGauges(Collector):
    """Gauges read at scrape time, at most once per CACHE_SECONDS per process: a scrape (or
    anyone looping /metrics) does not run a dozen counts each time."""

    CACHE_SECONDS = 15.0

    def __init__(self, settings: Settings, queue_depth: Callable[[], int | None]) -> None:
        self.settings = settings
        self.queue_depth = queue_depth
        self._at = float("-inf")
        self._families: list[Metric] = []

    def collect(self) -> Iterator[Metric]:
        now = time.monotonic()
        if now - self._at <= self.CACHE_SECONDS:
            yield from self._families
            return
        up = GaugeMetricFamily("skillpay_database_up", "1 when the database answered the scrape")
        try:
            with session_scope() as s:
                families = database_gauges(s, self.settings)
        except Exception:  # noqa: BLE001 - a scrape must not fail because the database did
            up.add_metric([], 0)
            yield up  # nothing cached: the next scrape asks again
            yield from self._broker()
            return
        up.add_metric([], 1)
        self._families, self._at = [up, *families, *self._broker()], now
        yield from self._families

    def _broker(self) -> list[Metric]:
        depth = self.queue_depth()
        if depth is None:
            return []  # the broker cannot say: no sample rather than a wrong one
        family = GaugeMetricFamily(
            "skillpay_queue_depth", "Messages waiting in the broker's task queue", labels=["queue"]
        )
        family.add_metric([self.settings.celery_queue], depth)
        return [family]


def database_gauges(s: Session, settings: Settings) -> list[Metric]:
    return [
        *_inbox(s),
        *_approval_queue(s, settings),
        *_stage_durations(s),
        *_business(s),
        *_money_checks(s),
    ]


def _inbox(s: Session) -> list[Metric]:
    events = GaugeMetricFamily("skillpay_inbox_events", "Inbox events by state", labels=["state"])
    for state, count in s.execute(
        select(WebhookEvent.state, func.count()).group_by(WebhookEvent.state)
    ):
        events.add_metric([state], count)
    oldest = s.scalar(
        select(func.min(WebhookEvent.updated_at)).where(
            WebhookEvent.state.in_([EventState.RECEIVED, EventState.PROCESSING])
        )
    )
    stuck = GaugeMetricFamily(
        "skillpay_inbox_oldest_unfinished_seconds",
        "How long the least recently moved unfinished event has made no progress (0: none)",
    )
    stuck.add_metric([], _age(oldest))
    dead = GaugeMetricFamily(
        "skillpay_dead_letters_open", "Dead letters not yet replayed, by stage", labels=["stage"]
    )
    by_stage = dict.fromkeys(STAGE_NAMES, 0)
    by_stage.update(
        s.execute(
            select(DeadLetter.stage, func.count())
            .where(DeadLetter.resolved_at.is_(None))
            .group_by(DeadLetter.stage)
        ).all()
    )
    for stage, count in by_stage.items():
        dead.add_metric([stage], count)
    enrollments = GaugeMetricFamily(
        "skillpay_enrollments", "Enrollments by state", labels=["state"]
    )
    for state, count in s.execute(
        select(Enrollment.state, func.count()).group_by(Enrollment.state)
    ):
        enrollments.add_metric([state], count)
    return [events, stuck, dead, enrollments]


def _approval_queue(s: Session, settings: Settings) -> list[Metric]:
    sla = settings.approval_sla_hours * 3600
    waiting = Enrollment.state == State.PENDING_APPROVAL
    oldest = s.scalar(select(func.min(Enrollment.waiting_since)).where(waiting))
    over = s.scalar(
        select(func.count())
        .select_from(Enrollment)
        .where(waiting, Enrollment.waiting_since < utcnow() - timedelta(seconds=sla))
    )
    age = GaugeMetricFamily(
        "skillpay_approval_oldest_waiting_seconds",
        "How long the longest-waiting enrollment has waited for an admin (0: none waits)",
    )
    age.add_metric([], _age(oldest))
    target = GaugeMetricFamily(
        "skillpay_approval_sla_seconds", "The approval queue's target (SKILLPAY_APPROVAL_SLA_HOURS)"
    )
    target.add_metric([], sla)
    late = GaugeMetricFamily(
        "skillpay_approvals_over_sla", "Enrollments waiting for an admin longer than the target"
    )
    late.add_metric([], over or 0)
    return [age, target, late]


def _stage_durations(s: Session) -> list[Metric]:
    """Quantiles of each stage's run time over the last few minutes, from the attempts the
    workers record (the workers have no endpoint of their own to scrape)."""
    family = GaugeMetricFamily(
        "skillpay_stage_duration_seconds",
        f"Stage run time over the last {int(STAGE_WINDOW.total_seconds() // 60)} minutes",
        labels=["stage", "quantile"],
    )
    runs = GaugeMetricFamily(
        "skillpay_stage_runs_recent",
        f"Stage attempts in the last {int(STAGE_WINDOW.total_seconds() // 60)} minutes, by outcome",
        labels=["stage", "outcome"],
    )
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    durations: dict[str, list[float]] = {}
    for stage, outcome, ms in s.execute(
        select(StageAttempt.stage, StageAttempt.outcome, StageAttempt.duration_ms)
        .where(StageAttempt.created_at >= utcnow() - STAGE_WINDOW)
        .order_by(StageAttempt.created_at.desc())
        .limit(MAX_SAMPLES)
    ):
        counts[stage, outcome] += 1
        if outcome == "ok":
            durations.setdefault(stage, []).append(ms / 1000)
    for (stage, outcome), count in counts.items():
        runs.add_metric([stage, outcome], count)
    for stage, values in durations.items():
        for q, value in zip(QUANTILES, _quantiles(values), strict=True):
            family.add_metric([stage, str(q)], value)
    return [family, runs]


def _business(s: Session) -> list[Metric]:
    """Card payments settled and time to approval, over the last day."""
    since = utcnow() - BUSINESS_WINDOW
    settled = dict(
        s.execute(
            select(Payment.gateway_status, func.count())
            .where(
                Payment.method == PaymentMethod.CARD,
                Payment.updated_at >= since,
                Payment.gateway_status.in_(["SUCCESS", "FAILURE"]),
            )
            .group_by(Payment.gateway_status)
        ).all()
    )
    cards = GaugeMetricFamily(
        "skillpay_card_payments_settled_24h",
        "Card payments iKhokha settled in the last day, by outcome",
        labels=["outcome"],
    )
    for outcome in ("SUCCESS", "FAILURE"):
        cards.add_metric([outcome.lower()], settled.get(outcome, 0))
    families: list[Metric] = [cards]
    total = sum(settled.values())
    if total:
        ratio = GaugeMetricFamily(
            "skillpay_card_success_ratio_24h",
            "Share of card payments settled in the last day that succeeded",
        )
        ratio.add_metric([], settled.get("SUCCESS", 0) / total)
        families.append(ratio)
    waits: dict[str, list[float]] = {}
    for method, created, approved in s.execute(
        select(Enrollment.payment_method, Enrollment.created_at, Enrollment.approved_at)
        .where(Enrollment.approved_at >= since)
        .limit(MAX_SAMPLES)
    ):
        waits.setdefault(method, []).append((approved - created).total_seconds())
    to_approval = GaugeMetricFamily(
        "skillpay_time_to_approval_seconds",
        "From enrollment to access, for enrollments approved in the last day",
        labels=["method", "quantile"],
    )
    for method, values in waits.items():
        for q, value in zip(QUANTILES, _quantiles(values), strict=True):
            to_approval.add_metric([method, str(q)], value)
    families.append(to_approval)
    return families


def _money_checks(s: Session) -> list[Metric]:
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


def _age(since: datetime | None) -> float:
    if since is None:
        return 0.0
    if since.tzinfo is None:  # SQLite gives back naive UTC
        since = since.replace(tzinfo=UTC)
    return max(0.0, (utcnow() - since).total_seconds())


def _quantiles(values: list[float]) -> list[float]:
    """QUANTILES of the values (inclusive: a single value is every quantile)."""
    if len(values) == 1:
        return [values[0]] * len(QUANTILES)
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return [cuts[round(q * 100) - 1] for q in QUANTILES]
