"""Typed settings read from the environment.

The names in the product contract (APP_ENV, DATABASE_URL, CELERY_BROKER_URL, REDIS_URL,
IKHOKHA_*, PUBLIC_BASE_URL, PORT) are kept; everything else has a SKILLPAY_ prefix.
Development needs no servers: SQLite and a SQLite-backed Celery broker under ./var.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import urlsplit

# Placeholders for the local simulator only. They are not credentials: production refuses them.
DEV_APP_ID = "skillpay-dev-app"
DEV_APP_SECRET = "dev-only-secret-not-for-production"  # noqa: S105

APP_ENVS = ("development", "test", "production")


class ConfigError(Exception):
    """The configuration cannot be used; the message says every reason."""


def _bool(value: str) -> bool:
    if value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if value.strip().lower() in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"not a boolean: {value!r}")


def _var_dir() -> Path:
    return Path(os.environ.get("SKILLPAY_VAR_DIR", "var")).resolve()


@dataclass(frozen=True)
class Settings:
    app_env: str = "development"
    database_url: str = ""
    celery_broker_url: str = ""
    redis_url: str = ""
    ikhokha_api_url: str = ""
    ikhokha_app_id: str = ""
    ikhokha_app_secret: str = field(default="", repr=False)
    ikhokha_mode: str = "live"
    # Which gateway speaks for iKhokha: "http" (iKhokha, or the local simulator) or "memory"
    # (tests only; production refuses it).
    ikhokha_gateway: str = "http"
    # Confirm a SUCCESS callback with iKhokha's status endpoint before granting access.
    ikhokha_confirm_with_status: bool = False
    # Refunds (unverified API, see pipeline/refunds.py): "record" a refund an admin made in
    # iKhokha's dashboard, or "api" to have the gateway make it at IKHOKHA_REFUND_PATH.
    refund_mode: str = "record"
    ikhokha_refund_path: str = "/public-api/v1/api/payments/{paylink_id}/refunds"
    ikhokha_connect_timeout: float = 3.05
    ikhokha_read_timeout: float = 10.0
    public_base_url: str = "http://127.0.0.1:8000"
    port: int = 8000
    webhook_max_bytes: int = 64 * 1024
    # Pipeline retries: exponential backoff with full jitter, bounded well below the
    # broker's visibility timeout so a retried message is never also redelivered.
    pipeline_max_retries: int = 5
    pipeline_retry_base_seconds: float = 1.0
    pipeline_retry_max_seconds: float = 60.0
    # An inbox row that made no progress for this long (and has no retry due later) is
    # re-driven by the sweeper: with the sweep interval, this bounds how long an event whose
    # worker crashed waits once a worker is up again (a duplicate message is harmless).
    pipeline_stale_after_seconds: float = 20.0
    sweep_interval_seconds: float = 5.0
    # The sweeper waits while more messages than this are queued (a backlog is not a stall).
    sweep_max_queue_depth: int = 200
    # Ask iKhokha about card payments still waiting (a callback that never came).
    reconcile_interval_seconds: float = 600.0
    # How far back reconciliation looks: approvals to confirm with iKhokha, and card
    # enrollments that expired unpaid (a payment whose callback was lost).
    reconcile_lookback_days: int = 7
    # An EFT enrollment waiting this long for an admin is closed, with a notice to the student
    # (0: never). Only plain bank transfers expire: one parked with money seen (an amount
    # mismatch, a proposed statement match) waits for an admin however long it takes.
    eft_approval_expiry_days: int = 14
    # The approval queue's service level: each waiting row shows how long it has waited
    # against this target, /metrics exports it beside the oldest wait, and an alert fires
    # when the oldest wait passes it.
    approval_sla_hours: float = 24.0
    # Four-eyes approval: an enrollment whose payment is above this amount (cents) is
    # approved only when a second admin confirms the first one's approval (0: off).
    four_eyes_above_cents: int = 0
    # Bank statements (CSV): the header names to look for (comma-separated alternatives,
    # case-insensitive) or 1-based column numbers for a file without a header, the date
    # formats to try in order, and whether amounts use a decimal comma (1 234,56).
    statement_date_columns: str = "date,transaction date,posting date,value date"
    statement_description_columns: str = "description,details,narrative,reference,transaction"
    statement_amount_columns: str = "amount,value,money in"
    statement_date_formats: str = "%Y/%m/%d,%Y-%m-%d,%d/%m/%Y,%d-%m-%Y,%d %b %Y,%d %B %Y,%Y%m%d"
    statement_decimal_comma: bool = False
    # Empty: worked out from the file (comma, semicolon, tab or bar).
    statement_delimiter: str = ""
    broker_visibility_timeout: int = 3600
    # RabbitMQ only: the task queue is a quorum queue (replicated; counts deliveries), and the
    # broker drops a message delivered more often than this. Skillpay moves an event to the
    # dead-letter table well before (SKILLPAY_PIPELINE_MAX_REDELIVERIES), so the broker's
    # limit is a backstop. BROKER_CONSUMER_TIMEOUT is the server's consumer_timeout (seconds;
    # RabbitMQ's default): a task holding its message longer loses its channel.
    broker_quorum_queues: bool = True
    broker_delivery_limit: int = 20
    broker_consumer_timeout: float = 1800.0
    # A stage message the broker hands out again because its worker died holding it counts;
    # past this many, the event is dead-lettered instead of crashing workers for ever.
    pipeline_max_redeliveries: int = 5
    # A task running longer than this is killed; the sweeper re-drives its event or bulk job.
    task_time_limit_seconds: float = 300.0
    celery_queue: str = "skillpay"
    # Payment-type detection: below this confidence a card SUCCESS waits for an admin.
    card_min_confidence: float = 0.8
    enrollment_expiry_hours: int = 72
    db_lock_timeout_ms: int = 5000
    log_level: str = "INFO"
    log_json: bool = False
    # A return page asks iKhokha about a payment at most this often (off the request path),
    # and each address may load return pages at most this often.
    status_check_interval_seconds: float = 60.0
    return_page_rate_limit: str = "30/minute"
    # The live stream (web/stream.py): where browsers reach GET /api/events (empty: the same
    # origin as the pages, behind a proxy that routes it to the stream process), where that
    # process listens, how long a ticket lives and how often an idle stream hears a heartbeat.
    stream_url: str = ""
    stream_port: int = 8001
    stream_ticket_seconds: float = 60.0
    stream_heartbeat_seconds: float = 15.0
    # When set, /metrics and /readyz answer only to `Authorization: Bearer <this token>`.
    metrics_token: str = field(default="", repr=False)
    # Flower's own authentication (read by Flower from the same variables); production
    # refuses to start without one of them.
    flower_basic_auth: str = field(default="", repr=False)
    flower_auth_provider: str = ""
    # Where operators reach Flower (the console links to it; empty: no link).
    flower_url: str = ""

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        app_env = env.get("APP_ENV", "").strip()
        if not app_env:
            # A deployment that forgot it must not run as development, with the placeholder
            # secret and no production checks.
            raise ConfigError(
                "APP_ENV is not set: use APP_ENV=production for a deployment, "
                "or APP_ENV=development on your own machine (make run sets it)"
            )
        if app_env not in APP_ENVS:
            raise ConfigError(f"APP_ENV must be one of {', '.join(APP_ENVS)}, not {app_env!r}")
        production = app_env == "production"
        var = _var_dir()
        port = env.get("PORT", "8000")
        values: dict[str, object] = {
            "app_env": app_env,
            "database_url": env.get("DATABASE_URL") or f"sqlite:///{var}/skillpay.db",
            "celery_broker_url": env.get("CELERY_BROKER_URL")
            or f"sqla+sqlite:///{var}/celery-broker.db",
            "redis_url": env.get("REDIS_URL", ""),
            "ikhokha_api_url": (
                env.get("IKHOKHA_API_URL")
                or ("https://api.ikhokha.com" if production else "http://127.0.0.1:8010")
            ).rstrip("/"),
            "ikhokha_app_id": env.get("IKHOKHA_APP_ID") or ("" if production else DEV_APP_ID),
            "ikhokha_app_secret": env.get("IKHOKHA_APP_SECRET")
            or ("" if production else DEV_APP_SECRET),
            "public_base_url": (
                env.get("PUBLIC_BASE_URL") or ("" if production else f"http://127.0.0.1:{port}")
            ).rstrip("/"),
            "ikhokha_confirm_with_status": production,
            "log_json": production,
        }
        prefixed = {
            "port": "PORT",
            "ikhokha_mode": "IKHOKHA_MODE",
            "ikhokha_gateway": "IKHOKHA_GATEWAY",
            "ikhokha_confirm_with_status": "IKHOKHA_CONFIRM_WITH_STATUS",
            "ikhokha_connect_timeout": "IKHOKHA_CONNECT_TIMEOUT",
            "ikhokha_read_timeout": "IKHOKHA_READ_TIMEOUT",
            "ikhokha_refund_path": "IKHOKHA_REFUND_PATH",
            "flower_basic_auth": "FLOWER_BASIC_AUTH",
            "flower_auth_provider": "FLOWER_AUTH_PROVIDER",
            "stream_port": "STREAM_PORT",
        }
        for f in fields(cls):
            name = prefixed.get(f.name, "SKILLPAY_" + f.name.upper())
            raw = env.get(name)
            if raw is None or raw == "":
                continue
            try:
                if f.type == "bool":
                    values[f.name] = _bool(raw)
                elif f.type == "int":
                    values[f.name] = int(raw)
                elif f.type == "float":
                    values[f.name] = float(raw)
                else:
                    values[f.name] = raw
            except ValueError as exc:
                raise ConfigError(f"{name}={raw!r} is not a valid {f.type}") from exc
        return cls(**values)  # type: ignore[arg-type]

    @property
    def production(self) -> bool:
        return self.app_env == "production"

    @property
    def uses_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def webhook_path(self) -> str:
        """The callback URL's path as iKhokha signs it (PUBLIC_BASE_URL may carry a prefix)."""
        return urlsplit(self.public_base_url).path.rstrip("/") + "/webhooks/ikhokha"

    @property
    def public_origin(self) -> str:
        """Scheme, host and port of PUBLIC_BASE_URL: the origin the pages are served from."""
        parts = urlsplit(self.public_base_url)
        return f"{parts.scheme}://{parts.netloc}"

    @property
    def events_url(self) -> str:
        """Where a browser opens its EventSource."""
        return self.stream_url or self.url_for_public("/api/events")

    def url_for_public(self, path: str) -> str:
        return self.public_base_url + path

    def problems(self) -> list[str]:
        """Every reason this configuration is unsafe; empty when it is fine to run."""
        found: list[str] = []
        if self.ikhokha_mode not in ("live", "test"):
            found.append(f"IKHOKHA_MODE must be 'live' or 'test', not {self.ikhokha_mode!r}")
        if self.ikhokha_gateway not in ("http", "memory"):
            found.append(
                f"IKHOKHA_GATEWAY must be 'http' or 'memory', not {self.ikhokha_gateway!r}"
            )
        if self.refund_mode not in ("record", "api"):
            found.append(
                f"SKILLPAY_REFUND_MODE must be 'record' or 'api', not {self.refund_mode!r}"
            )
        if (
            "{paylink_id}" not in self.ikhokha_refund_path
            or not self.ikhokha_refund_path.startswith("/")
        ):
            found.append(
                "IKHOKHA_REFUND_PATH must be a path starting with / and naming {paylink_id}"
            )
        if self.reconcile_lookback_days < 1 or self.eft_approval_expiry_days < 0:
            found.append(
                "SKILLPAY_RECONCILE_LOOKBACK_DAYS must be at least 1, "
                "SKILLPAY_EFT_APPROVAL_EXPIRY_DAYS at least 0"
            )
        found.extend(self.broker_problems())
        if self.approval_sla_hours <= 0 or self.four_eyes_above_cents < 0:
            found.append(
                "SKILLPAY_APPROVAL_SLA_HOURS must be more than 0, "
                "SKILLPAY_FOUR_EYES_ABOVE_CENTS at least 0 (0: off)"
            )
        if not 0 < self.card_min_confidence <= 1:
            found.append("SKILLPAY_CARD_MIN_CONFIDENCE must be in (0, 1]")
        if self.app_env == "test" and self.ikhokha_app_secret == DEV_APP_SECRET:
            host = urlsplit(self.public_base_url).hostname or ""
            if host not in ("127.0.0.1", "localhost", "::1"):
                found.append(
                    "the placeholder IKHOKHA_APP_SECRET is only for a machine of your own: "
                    "with APP_ENV=test, PUBLIC_BASE_URL must be a loopback address"
                )
        if not self.production:
            return found
        if self.ikhokha_gateway != "http":
            found.append("IKHOKHA_GATEWAY must be 'http' in production: 'memory' is for tests")
        if not self.database_url.startswith("postgresql"):
            found.append("DATABASE_URL must point at PostgreSQL in production")
        broker = self.celery_broker_url
        if not broker or broker.startswith(("sqla+", "memory", "filesystem")):
            found.append("CELERY_BROKER_URL must point at Redis or RabbitMQ in production")
        if not self.ikhokha_app_id or self.ikhokha_app_id == DEV_APP_ID:
            found.append("IKHOKHA_APP_ID must be set to the App ID from the iKhokha dashboard")
        if not self.ikhokha_app_secret or self.ikhokha_app_secret == DEV_APP_SECRET:
            found.append("IKHOKHA_APP_SECRET must be set to the App Secret from iKhokha")
        if not self.public_base_url.startswith("https://"):
            found.append("PUBLIC_BASE_URL must be an https:// URL that iKhokha can reach")
        if not self.ikhokha_api_url.startswith("https://"):
            found.append("IKHOKHA_API_URL must be an https:// URL in production")
        if self.ikhokha_mode != "live":
            found.append("IKHOKHA_MODE must be 'live' in production: test links take no money")
        if not self.flower_basic_auth and not self.flower_auth_provider:
            found.append(
                "FLOWER_BASIC_AUTH (user:password) or FLOWER_AUTH_PROVIDER must be set in "
                "production: Flower shows and controls every worker"
            )
        if not self.ikhokha_confirm_with_status:
            found.append(
                "IKHOKHA_CONFIRM_WITH_STATUS must stay on in production: "
                "a callback alone must not grant access"
            )
        return found

    @property
    def broker_kind(self) -> str:
        """ "redis", "rabbitmq" or "embedded" (SQLite, for a bare machine)."""
        scheme = urlsplit(self.celery_broker_url).scheme
        if scheme in ("redis", "rediss", "sentinel"):
            return "redis"
        if scheme in ("amqp", "amqps", "pyamqp"):
            return "rabbitmq"
        return "embedded"

    @property
    def uses_quorum_queues(self) -> bool:
        return self.broker_kind == "rabbitmq" and self.broker_quorum_queues

    def broker_problems(self) -> list[str]:
        """Settings that would make the broker hand a message to a second worker while the
        first still holds it, or take it away from a task that is still running."""
        found: list[str] = []
        longest_hold = max(self.pipeline_retry_max_seconds, self.task_time_limit_seconds)
        if self.broker_kind == "redis" and longest_hold * 2 >= self.broker_visibility_timeout:
            found.append(
                "SKILLPAY_BROKER_VISIBILITY_TIMEOUT must be more than twice the longest a task "
                "holds its message (SKILLPAY_PIPELINE_RETRY_MAX_SECONDS, "
                "SKILLPAY_TASK_TIME_LIMIT_SECONDS)"
            )
        if self.broker_kind == "rabbitmq" and longest_hold * 2 >= self.broker_consumer_timeout:
            found.append(
                "SKILLPAY_BROKER_CONSUMER_TIMEOUT (RabbitMQ's consumer_timeout) must be more "
                "than twice the longest a task holds its message "
                "(SKILLPAY_PIPELINE_RETRY_MAX_SECONDS, SKILLPAY_TASK_TIME_LIMIT_SECONDS)"
            )
        if self.pipeline_max_redeliveries < 1:
            found.append("SKILLPAY_PIPELINE_MAX_REDELIVERIES must be at least 1")
        limit = self.pipeline_max_redeliveries + 1
        if self.uses_quorum_queues and self.broker_delivery_limit <= limit:
            found.append(
                "SKILLPAY_BROKER_DELIVERY_LIMIT must exceed "
                "SKILLPAY_PIPELINE_MAX_REDELIVERIES + 1, so that the dead-letter table, "
                "not the broker, takes a message that keeps failing"
            )
        return found

    def check(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError(f"refusing to start ({self.app_env}): " + "; ".join(problems))


def get_settings() -> Settings:
    """Settings from this process's environment. Only entry points call it (web/wsgi.py,
    workers/app.py, the CLI); everything else is handed the settings they made."""
    return Settings.from_env()
