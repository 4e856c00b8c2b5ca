"""What an operator's Prometheus sees: /metrics from the real gunicorn (two workers), on each
broker. Counters are whole whichever worker answers the scrape (multiprocess mode), and the
gauges the alerts use come from the real database and broker."""

from __future__ import annotations

import re

import pytest
import requests

from tests.support import (
    REFUSED_SIGNATURE,
    callback_body,
    make_enrollment,
    metric_sample,
    post_callback,
)

pytestmark = pytest.mark.integration


def scrape(web: str) -> str:
    # A new connection each time, so that either gunicorn worker may answer.
    response = requests.get(f"{web}/metrics", headers={"Connection": "close"}, timeout=10)
    assert response.status_code == 200
    return response.text


def refused(text: str) -> float:
    return metric_sample(text, REFUSED_SIGNATURE) or 0.0


def test_counters_are_whole_across_gunicorn_workers(web, worker, db, process_env):
    _, payment = make_enrollment(db)
    db.commit()
    before = refused(scrape(web))
    for _ in range(30):
        response = post_callback(web, callback_body(payment), secret="not-our-secret")
        assert response.status_code == 401
    for _ in range(6):  # whichever worker answers, it counts all 30
        text = scrape(web)
        assert refused(text) == before + 30
    assert "skillpay_database_up 1.0" in text
    queue = process_env["SKILLPAY_CELERY_QUEUE"]  # declared by the worker
    assert re.search(rf'^skillpay_queue_depth\{{queue="{queue}"\}} \d', text, re.M), text[-2000:]
