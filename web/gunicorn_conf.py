"""gunicorn's settings (`gunicorn -c python:web.gunicorn_conf`).

Logging: gunicorn's own lines, the access log included, go through structlog's processors like
ours, so they are redacted too.

Metrics: each gunicorn worker is a process of its own, so /metrics (answered by any one of
them) would count only that worker's requests. prometheus-client's multiprocess mode makes the
counters and histograms whole: every worker writes its values to files in
PROMETHEUS_MULTIPROC_DIR and a scrape adds them up. The directory must be set before
prometheus_client is imported (this module imports nothing that does); without one set, each
gunicorn master makes its own and removes it when it exits. A directory you set is emptied
when the master starts: values of an earlier run must not be added to this one's.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

_MADE_DIR = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
if _MADE_DIR:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="skillpay-metrics-")
METRICS_DIR = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])


def on_starting(server: object) -> None:
    METRICS_DIR.mkdir(parents=True, exist_ok=True)
    for stale in METRICS_DIR.glob("*.db"):
        stale.unlink()


def child_exit(server: object, worker: object) -> None:
    # A worker that exits keeps its counters in the sum; its live gauges go.
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[attr-defined]


def on_exit(server: object) -> None:
    if _MADE_DIR:
        shutil.rmtree(METRICS_DIR, ignore_errors=True)


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
