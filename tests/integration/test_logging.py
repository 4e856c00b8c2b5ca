"""gunicorn's and Celery's own log lines go through the same redaction as ours."""

from __future__ import annotations

import re

import pytest
import requests

from tests.integration.conftest import start_web
from tests.support import wait_for

pytestmark = pytest.mark.integration

LEAKED = "sp_" + "leakedtokenvalue0123456789"


def test_access_log_and_server_lines_are_structured_and_redacted(process_env, tmp_path, worker):
    server, base = start_web(process_env, tmp_path)
    try:
        response = requests.get(
            f"{base}/api/courses?token={LEAKED}",
            headers={"Authorization": f"Bearer {LEAKED}"},
            timeout=10,
        )
        assert response.status_code == 200
        wait_for(lambda: "/api/courses?token=[redacted]" in server.log(), timeout=10)
        log = server.log()
    finally:
        server.stop()
    assert LEAKED not in log
    assert "[gunicorn.error]" in log and "[gunicorn.access]" in log  # routed through structlog
    # Celery: the same (structlog pads the event to a column; the node name sets its length)
    assert re.search(r" ready\. +\[celery\.apps\.worker\]", worker.log()), worker.log()[-2000:]
