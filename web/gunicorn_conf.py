"""gunicorn's settings (`gunicorn -c python:web.gunicorn_conf`): its own log lines, the access
log included, go through structlog's processors like ours, so they are redacted too."""

logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"structlog": {"()": "config.logging.gunicorn_formatter"}},
    "handlers": {
        "stderr": {
            "class": "logging.StreamHandler",
            "formatter": "structlog",
            "stream": "ext://sys.stderr",
        }
    },
    "root": {"level": "INFO", "handlers": ["stderr"]},
    "loggers": {
        name: {"level": "INFO", "handlers": [], "propagate": True, "qualname": name}
        for name in ("gunicorn.error", "gunicorn.access")
    },
}
