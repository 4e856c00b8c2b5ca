"""The Procfile, docker-compose.yml and the entry points they name agree with each other."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def procfile() -> dict[str, str]:
    entries = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, command = line.partition(":")
            entries[name.strip()] = command.strip()
    return entries


def test_procfile_has_web_on_port_worker_and_beat():
    entries = procfile()
    assert {"web", "worker", "beat"} <= set(entries)
    assert "${PORT" in entries["web"]
    assert entries["worker"].startswith("celery -A workers.app worker")
    assert entries["beat"].startswith("celery -A workers.app beat")


def test_compose_runs_the_procfile_commands_and_the_servers():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "redis", "web", "worker", "beat", "flower"} <= set(services)
    for name, command in procfile().items():
        assert services[name]["command"] == command, name
    app_env = services["web"]["environment"]
    assert app_env["DATABASE_URL"].startswith("postgresql://")
    assert app_env["CELERY_BROKER_URL"].startswith("redis://")


def test_entry_points_named_by_the_procfile_import():
    assert importlib.import_module("web.wsgi").app.name
    assert importlib.import_module("simulator.wsgi").app.name
    celery = importlib.import_module("workers.app").celery
    assert "skillpay.stage.signature_check" in celery.tasks
