"""Real processes: a Celery worker (prefork, with beat) and gunicorn, against PostgreSQL and
Redis. Nothing here is mocked."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import requests
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

from models.db import driver_url
from tests.support import (
    REDIS_URL,
    TEST_APP_ID,
    TEST_SECRET,
    free_port,
    migrated_database,
    unavailable,
    wait_for,
)

ROOT = Path(__file__).resolve().parents[2]
TABLES = (
    "bulk_job_items",
    "bulk_jobs",
    "notifications",
    "dead_letters",
    "stage_attempts",
    "enrollment_history",
    "webhook_events",
    "payments",
    "enrollments",
    "api_tokens",
    "courses",
    "users",
)


@pytest.fixture(scope="session")
def live_database():
    with migrated_database("skillpay_it") as url:
        yield url


@pytest.fixture(scope="session")
def redis_client():
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.exceptions.RedisError as exc:
        unavailable("Redis", exc)
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture(scope="session")
def engine(live_database):
    eng = create_engine(driver_url(live_database))
    yield eng
    eng.dispose()


@pytest.fixture
def db(engine):
    """A session on the live database; every table is emptied after the test."""
    with Session(engine, expire_on_commit=False) as s:
        yield s
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))


@pytest.fixture(scope="session")
def process_env(live_database, redis_client, tmp_path_factory):
    env = dict(os.environ)
    env.update(
        {
            "APP_ENV": "test",
            "DATABASE_URL": live_database,
            "CELERY_BROKER_URL": REDIS_URL,
            "REDIS_URL": REDIS_URL,
            "IKHOKHA_APP_ID": TEST_APP_ID,
            "IKHOKHA_APP_SECRET": TEST_SECRET,
            "SIMULATOR_PORT": str(sim_port := free_port()),
            "IKHOKHA_API_URL": f"http://127.0.0.1:{sim_port}",
            "SIMULATOR_PUBLIC_URL": f"http://127.0.0.1:{sim_port}",
            "SKILLPAY_PIPELINE_MAX_RETRIES": "3",
            "SKILLPAY_PIPELINE_RETRY_BASE_SECONDS": "0.05",
            "SKILLPAY_PIPELINE_RETRY_MAX_SECONDS": "0.5",
            "SKILLPAY_PIPELINE_STALE_AFTER_SECONDS": "3",
            "SKILLPAY_SWEEP_INTERVAL_SECONDS": "1",
            "SKILLPAY_VAR_DIR": str(tmp_path_factory.mktemp("var")),
            "PYTHONUNBUFFERED": "1",
            # A queue of this run's own: a stray worker from another run cannot take its tasks.
            "SKILLPAY_CELERY_QUEUE": f"skillpay-test-{os.getpid()}",
        }
    )
    return env


class Process:
    """A child process in its own process group, logging to a file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name, self.args, self.env = name, args, env
        self.log_path = log_dir / f"{name}-{time.monotonic_ns()}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Process:
        self.log_path = self.log_path.with_name(f"{self.name}-{time.monotonic_ns()}.log")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.args,
            env=self.env,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the whole group: the parent and every pool child, mid-whatever."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._log.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._log.close()


def start_worker(env: dict[str, str], log_dir: Path, concurrency: int = 2) -> Process:
    worker = Process(
        "worker",
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "workers.app",
            "worker",
            "-P",
            "prefork",
            "-c",
            str(concurrency),
            "-B",
            "-s",
            str(log_dir / "beat-schedule"),
            "-Q",
            env["SKILLPAY_CELERY_QUEUE"],
            "--without-mingle",
            "--without-gossip",
            "--loglevel",
            "INFO",
        ],
        env,
        log_dir,
    ).start()
    wait_for(lambda: "ready." in worker.log() or worker.proc.poll() is not None, timeout=60)
    assert worker.proc.poll() is None, worker.log()
    return worker


@pytest.fixture(scope="module")
def worker(process_env, tmp_path_factory):
    w = start_worker(process_env, tmp_path_factory.mktemp("worker"))
    yield w
    w.stop()


def serve(name: str, args: list[str], env: dict[str, str], log_dir: Path, base: str) -> Process:
    server = Process(name, args, env, log_dir).start()

    def up() -> bool:
        if server.proc.poll() is not None:
            raise AssertionError(server.log())
        try:
            return requests.get(base + "/healthz", timeout=2).ok
        except requests.RequestException:
            return False

    try:
        wait_for(up, timeout=60)
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def simulator(process_env, tmp_path_factory):
    """The local iKhokha, as its own process; yields its base URL."""
    base = process_env["IKHOKHA_API_URL"]
    server = serve(
        "simulator",
        [
            sys.executable,
            "-m",
            "gunicorn",
            "simulator.wsgi:app",
            "--bind",
            f"127.0.0.1:{process_env['SIMULATOR_PORT']}",
            "--workers",
            "1",
            "--threads",
            "8",
        ],
        process_env,
        tmp_path_factory.mktemp("simulator"),
        base,
    )
    yield base
    server.stop()


def start_web(env: dict[str, str], log_dir: Path) -> tuple[Process, str]:
    """gunicorn serving the real app on a free port."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = dict(env, PORT=str(port), PUBLIC_BASE_URL=base)
    args = [
        sys.executable,
        "-m",
        "gunicorn",
        "web.wsgi:app",
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        "2",
        "--threads",
        "4",
    ]
    return serve("web", args, env, log_dir, base), base


@pytest.fixture(scope="session")
def web(process_env, simulator, tmp_path_factory):
    """The web app, as its own process; yields its base URL."""
    server, base = start_web(process_env, tmp_path_factory.mktemp("web"))
    yield base
    server.stop()
