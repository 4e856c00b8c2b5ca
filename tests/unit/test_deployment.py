"""The Procfile, docker-compose.yml and the entry points they name agree with each other."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml

from pipeline.stages import STAGE_NAMES

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
        service = {"release": "migrate"}.get(name, name)  # compose runs release as a service
        assert services[service]["command"] == command, name
    app_env = services["web"]["environment"]
    assert app_env["DATABASE_URL"].startswith("postgresql://")
    assert app_env["CELERY_BROKER_URL"].startswith("redis://")


def test_the_rabbitmq_option_gives_every_process_the_same_broker_and_changes_no_command():
    base = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    override = yaml.safe_load((ROOT / "docker-compose.rabbitmq.yml").read_text())["services"]
    apps = {"migrate", *({"release": "migrate"}.get(name, name) for name in procfile())}
    assert set(override) == apps | {"rabbitmq"}
    for name in apps:
        broker = override[name]["environment"]["CELERY_BROKER_URL"]
        assert broker.startswith("amqp://") and "${RABBITMQ_PASSWORD:?" in broker, name
        assert "command" not in override[name], name  # the Procfile's command stays
        assert override[name]["depends_on"]["rabbitmq"] == {"condition": "service_healthy"}
        assert base[name]["depends_on"]  # merged with the base file's, not replacing it
    rabbitmq = override["rabbitmq"]
    assert rabbitmq["environment"]["RABBITMQ_DEFAULT_PASS"].startswith("${RABBITMQ_PASSWORD:?")
    assert "healthcheck" in rabbitmq and rabbitmq["volumes"]
    # The consumer timeout the server enforces is the one validate-config checks against.
    timeout_ms = rabbitmq["environment"]["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"].split()[-1]
    seconds = override["worker"]["environment"]["SKILLPAY_BROKER_CONSUMER_TIMEOUT"]
    assert int(timeout_ms) == int(seconds) * 1000


def test_what_is_deployed_fails_closed():
    """A deployment that forgets APP_ENV runs as production (and so refuses to start without
    real credentials); nothing with open test controls is deployable; Flower is on loopback."""
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert "simulator" not in services and "simulator" not in procfile()
    for name in ("web", "worker", "beat", "flower", "migrate"):
        assert services[name]["environment"]["APP_ENV"] == "${APP_ENV:-production}", name
        assert "IKHOKHA_APP_SECRET" in services[name]["environment"], name
    assert services["flower"]["ports"] == ["127.0.0.1:5555:5555"]
    assert "--address=${FLOWER_ADDRESS:-127.0.0.1}" in procfile()["flower"]
    dev = yaml.safe_load((ROOT / "docker-compose.dev.yml").read_text())["services"]
    assert dev["web"]["environment"]["APP_ENV"] == "development"
    assert dev["simulator"]["command"].startswith("gunicorn simulator.wsgi:app")


def test_entry_points_named_by_the_procfile_serve_what_the_processes_need():
    web = importlib.import_module("web.wsgi").app
    rules = {(rule.rule, method) for rule in web.url_map.iter_rules() for method in rule.methods}
    assert ("/webhooks/ikhokha", "POST") in rules and ("/readyz", "GET") in rules
    worker = importlib.import_module("workers.app").celery
    scheduled = {entry["task"] for entry in worker.conf.beat_schedule.values()}
    expected = {f"skillpay.stage.{stage}" for stage in STAGE_NAMES} | {"skillpay.bulk_approve"}
    assert expected | scheduled <= set(worker.tasks)
    # The web app sends to the broker and queue the worker reads: one source of settings.
    sender = web.extensions["skillpay.celery"]
    assert sender.conf.broker_url == worker.conf.broker_url
    assert sender.conf.task_default_queue == worker.conf.task_default_queue
    simulator = importlib.import_module("simulator.wsgi").app
    assert simulator.test_client().get("/healthz").json == {"status": "ok"}


def test_a_production_install_carries_no_development_servers():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = " ".join(project["dependencies"])
    assert "honcho" not in runtime and "fakeredis" not in runtime
    assert any(d.startswith("honcho") for d in project["optional-dependencies"]["run"])
    floors = {d.split(">=")[0]: d for d in project["dependencies"] if ">=" in d}
    assert floors["gunicorn"].startswith("gunicorn>=23")  # past the request-smuggling advisories
    assert floors["requests"].startswith("requests>=2.32.4")  # past CVE-2024-47081


def pins(lock: str) -> dict[str, str]:
    import re

    text = (ROOT / "requirements" / lock).read_text()
    return {
        name.lower().replace("_", "-"): version
        for name, version in re.findall(r"^([A-Za-z0-9_.\-]+)==([^\s\\]+)", text, re.MULTILINE)
    }


def test_the_lock_files_are_current_with_pyproject():
    """`make install` installs only from the hashed locks, so a dependency added to
    pyproject.toml without `make lock` would be missing: this fails first, saying which."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    runtime, dev = pins("runtime.lock"), pins("dev.lock")
    for lock, wanted in (
        (runtime, project["dependencies"]),
        (dev, [*project["dependencies"], *extras["dev"], *extras["run"]]),
    ):
        for line in wanted:
            requirement = Requirement(line)
            name = requirement.name.lower().replace("_", "-")
            assert name in lock, f"{name} is not in the lock: run make lock"
            assert requirement.specifier.contains(lock[name], prereleases=True), (
                f"{name}=={lock[name]} in the lock does not satisfy {line}: run make lock"
            )
    assert {name: dev[name] for name in runtime} == runtime  # the same versions in both
    for line in (ROOT / "requirements" / "dev.lock").read_text().splitlines():
        assert "file://" not in line and not line.startswith(("--index", "--extra-index")), line


def test_processes_wait_for_the_migration_and_read_the_configured_queue():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for name in ("web", "worker", "beat", "flower", "stream"):
        depends = services[name]["depends_on"]
        assert depends["migrate"] == {"condition": "service_completed_successfully"}, name
    assert "migrate" not in services["migrate"]["depends_on"]
    assert procfile()["release"] == "skillpay db upgrade"
    assert "-Q ${SKILLPAY_CELERY_QUEUE:-skillpay}" in procfile()["worker"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    for line in ("EXPOSE 8000", "HEALTHCHECK", 'CMD ["gunicorn", "web.wsgi:app"'):
        assert line in dockerfile, line
