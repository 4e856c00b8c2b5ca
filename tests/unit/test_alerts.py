"""The alert rules in ops/prometheus: valid for Prometheus (promtool), unit-tested by promtool,
written against metrics /metrics really exports, and each with its runbook in the README."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.ikhokha import MemoryGateway
from tests.support import RecordingQueue, callback_body, make_enrollment, post_callback, unavailable
from web.app import create_app

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "ops" / "prometheus"


def alerts() -> list[dict]:
    groups = yaml.safe_load((RULES / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        unavailable("promtool", FileNotFoundError("no promtool on PATH (make test installs it)"))
    return path


@pytest.mark.parametrize(
    "args",
    [
        ["check", "rules", "alerts.yml"],
        ["check", "config", "prometheus.yml"],
        ["test", "rules", "alerts_test.yml"],
    ],
    ids=["check-rules", "check-config", "test-rules"],
)
def test_promtool_accepts_the_rules(promtool, args):
    done = subprocess.run([promtool, *args], cwd=RULES, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_a_promtool_test():
    tested = set(re.findall(r"alertname: (\w+)", (RULES / "alerts_test.yml").read_text()))
    assert {rule["alert"] for rule in alerts()} <= tested


def test_every_alert_has_its_runbook_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    headings = set(re.findall(r"^#### (Skillpay\w+)$", readme, re.M))
    for rule in alerts():
        assert rule["alert"] in headings, f"README has no runbook for {rule['alert']}"
        assert rule["annotations"]["runbook_url"] == f"README.md#{rule['alert'].lower()}"


def test_the_rules_use_only_metrics_that_are_exported(settings, session):
    app = create_app(settings, gateway=MemoryGateway())
    app.extensions["skillpay.celery"].queue = RecordingQueue()
    client = app.test_client()
    _, payment = make_enrollment(session)
    post_callback(client, callback_body(payment), secret="wrong")  # a refusal to count
    exported = set(
        re.findall(r"^(?:# TYPE )?(skillpay_\w+)", client.get("/metrics").get_data(True), re.M)
    )
    used = {name for rule in alerts() for name in re.findall(r"\b(skillpay_\w+)", rule["expr"])}
    assert used and used <= exported, used - exported
