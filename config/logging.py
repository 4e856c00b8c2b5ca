"""structlog set up once per process: JSON in production, readable in development.

Our own log lines and the standard library's (Celery's, gunicorn's, SQLAlchemy's) go through
the same processors, so every line is redacted the same way: a field whose name says it holds
a secret is dropped, and anything shaped like one of our tokens or a stream ticket is masked
wherever it appears, in an access log's URL too.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import structlog

from config.settings import Settings

_SECRET_KEYS = ("secret", "token", "password", "authorization", "ik-sign", "sign", "ticket")
# Bearer tokens (sp_...) and ?ticket=/&token= values, wherever they appear in a line.
_SECRET_TEXT = re.compile(r"sp_[A-Za-z0-9_\-]{8,}|([?&](?:ticket|token)=)[^&\s\"']+")


def _mask(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    return _SECRET_TEXT.sub(lambda m: (m.group(1) or "") + "[redacted]", value)


def redact(_logger: object, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    for key in list(event):
        if any(word in key.lower() for word in _SECRET_KEYS):
            event[key] = "[redacted]"
        else:
            event[key] = _mask(event[key])
    return event


def _shared_processors() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact,
    ]


def stdlib_formatter(json: bool) -> structlog.stdlib.ProcessorFormatter:
    """The formatter every handler uses: standard-library records get the same processors as
    structlog's own events (redaction included) before they are rendered."""
    renderer = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared_processors(),
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, redact, renderer],
    )


def gunicorn_formatter() -> structlog.stdlib.ProcessorFormatter:
    """For gunicorn's logconfig_dict (web/gunicorn_conf.py), before any app is loaded."""
    return stdlib_formatter(json=Settings.from_env().log_json)


def configure_logging(settings: Settings) -> None:
    level = getattr(logging, settings.log_level.upper(), logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(stdlib_formatter(settings.log_json))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    structlog.configure(
        processors=[
            *_shared_processors(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
