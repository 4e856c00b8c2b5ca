"""The application factory."""

from __future__ import annotations

import time

from flask import Flask, g, request

from config import Settings, get_settings
from config.logging import configure_logging


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or get_settings()
    settings.check()  # production refuses an unsafe configuration, saying why
    configure_logging(settings)
    app = Flask(__name__)
    app.config["SETTINGS"] = settings
    # Callbacks and API bodies are small; anything larger is refused with 413 before parsing.
    app.config["MAX_CONTENT_LENGTH"] = settings.webhook_max_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]

    from web import admin, api, health, metrics, pages, webhooks
    from web.errors import register_error_handlers

    for blueprint in (webhooks.bp, api.bp, admin.bp, health.bp, pages.bp):
        app.register_blueprint(blueprint)
    register_error_handlers(app)

    @app.before_request
    def _start_timer() -> None:
        g.started = time.perf_counter()

    @app.after_request
    def _observe(response):
        started = g.get("started")
        if started is not None and request.url_rule is not None:
            metrics.REQUEST_SECONDS.labels(request.url_rule.endpoint, response.status_code).observe(
                time.perf_counter() - started
            )
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

    @app.teardown_appcontext
    def _close_session(_exc: BaseException | None) -> None:
        session = g.pop("db", None)
        if session is not None:
            session.close()

    return app
