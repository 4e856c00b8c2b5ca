"""The application factory."""

from __future__ import annotations

import functools
import secrets
import time
from urllib.parse import urlsplit

from flask import Flask, Response, g, request
from werkzeug.routing import IntegerConverter, Map

from config import Settings
from config.logging import configure_logging
from models import configure_database
from pipeline.ikhokha import Gateway
from web.extensions import limiter
from web.schemas import MAX_ID
from workers.celery_app import SkillpayCelery, make_celery


class IdConverter(IntegerConverter):
    """A row id in a URL (`<id:name>`): 1 to 2^63-1. Anything else is a 404 here, never a
    number the database cannot hold."""

    def __init__(self, url_map: Map) -> None:
        super().__init__(url_map, min=1, max=MAX_ID)


def csp_nonce() -> str:
    """This response's script nonce: only <script nonce="..."> blocks of our pages run."""
    if "csp_nonce" not in g:
        g.csp_nonce = secrets.token_urlsafe(16)
    return g.csp_nonce  # type: ignore[no-any-return]


@functools.cache
def _csp_rest(events_url: str) -> str:
    """The policy after script-src, the same for every response of an app: worked out once."""
    stream = urlsplit(events_url)
    connect = f"'self' {stream.scheme}://{stream.netloc}" if stream.netloc else "'self'"
    return (
        f"connect-src {connect}; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
    )


def add_security_headers(response: Response, settings: Settings) -> None:
    script = f"'nonce-{g.csp_nonce}'" if "csp_nonce" in g else "'none'"
    response.headers.setdefault(
        "Content-Security-Policy",
        f"default-src 'self'; script-src {script}; {_csp_rest(settings.events_url)}",
    )
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    # Return pages carry a payment id in their path: no page of ours sends it elsewhere.
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    if settings.production:
        response.headers.setdefault(
            "Strict-Transport-Security", "max-age=63072000; includeSubDomains"
        )


def create_app(
    settings: Settings, *, celery: SkillpayCelery | None = None, gateway: Gateway | None = None
) -> Flask:
    """The web app for these settings, with the Celery app made from the same settings (or
    the one given) and the gateway they name (or the one given, in tests)."""
    settings.check()  # production refuses an unsafe configuration, saying why
    configure_logging(settings)
    configure_database(settings.database_url, settings.db_lock_timeout_ms)
    app = Flask(__name__)
    celery = celery or make_celery(settings)
    app.extensions["skillpay.settings"] = settings
    app.extensions["skillpay.celery"] = celery
    app.extensions["skillpay.gateway"] = gateway or celery.gateway
    # Callbacks and API bodies are small; anything larger is refused with 413 before parsing.
    app.config["MAX_CONTENT_LENGTH"] = settings.webhook_max_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.url_map.converters["id"] = IdConverter
    app.config["RATELIMIT_STORAGE_URI"] = settings.redis_url or "memory://"
    app.config["RATELIMIT_HEADERS_ENABLED"] = True
    # If Redis is down the limit is not counted, rather than every return page failing.
    app.config["RATELIMIT_SWALLOW_ERRORS"] = True
    limiter.init_app(app)

    from web import admin, api, console, health, metrics, openapi, pages, webhooks
    from web.errors import register_error_handlers

    for blueprint in (webhooks.bp, api.bp, admin.bp, console.bp, health.bp, pages.bp, openapi.bp):
        app.register_blueprint(blueprint)
    register_error_handlers(app)
    app.extensions["skillpay.gauges"] = metrics.OperatorGauges(settings, celery.queue.depth)

    @app.before_request
    def _start_timer() -> None:
        g.started = time.perf_counter()

    @app.context_processor
    def _csp_nonce() -> dict[str, object]:
        return {"csp_nonce": csp_nonce}

    @app.after_request
    def _observe(response):
        started = g.get("started")
        if started is not None and request.url_rule is not None:
            metrics.REQUEST_SECONDS.labels(request.url_rule.endpoint, response.status_code).observe(
                time.perf_counter() - started
            )
        add_security_headers(response, settings)
        return response

    @app.teardown_appcontext
    def _close_session(_exc: BaseException | None) -> None:
        session = g.pop("db", None)
        if session is not None:
            session.close()

    return app
