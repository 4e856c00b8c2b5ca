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
    "statement_lines",
    "bank_statements",
    "reconciliation_findings",
    "reconciliation_runs",
    "enrollment_flags",
    "refunds",
    "scheduled_runs",
    "stream_tickets",
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
    empty_tables(engine)


def empty_tables(engine) -> None:
    """TRUNCATE takes an exclusive lock on each table in turn while the worker (beat's sweeps,
    a last notification) may still be reading them in another order; PostgreSQL then breaks
    the deadlock by failing one side. Cleanup takes that answer and tries again."""
    from sqlalchemy.exc import OperationalError

    for attempt in range(10):
        try:
            with engine.begin() as conn:
                conn.execute(text("SET LOCAL lock_timeout = '5s'"))
                conn.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
            return
        except OperationalError:
            if attempt == 9:
                raise
            time.sleep(0.2 * (attempt + 1))


@pytest.fixture(scope="session")
def base_env(live_database, redis_client, tmp_path_factory):
    """Everything but the broker: for tests that bring a broker of their own."""
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
            "STREAM_PORT": str(stream_port := free_port()),
            "SKILLPAY_STREAM_URL": f"http://127.0.0.1:{stream_port}/api/events",
            "SKILLPAY_STREAM_HEARTBEAT_SECONDS": "1",
            # Every test comes from 127.0.0.1, and schemathesis alone loads return pages
            # dozens of times a minute; the limit itself is tested in tests/unit/test_web.py.
            "SKILLPAY_RETURN_PAGE_RATE_LIMIT": "1000/minute",
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


RABBITMQ_URL = os.environ.get("SKILLPAY_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")


@pytest.fixture(scope="session", params=["redis", "rabbitmq"])
def process_env(request, base_env):
    """The processes' environment, once with Redis and once with RabbitMQ as the broker:
    every integration test that runs a worker or the web app runs on both (each run has a
    queue of its own, so runs cannot meet)."""
    if request.param == "redis":
        yield base_env
        return
    from kombu import Connection

    try:
        with Connection(RABBITMQ_URL, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:  # noqa: BLE001
        unavailable("RabbitMQ", exc)
    yield dict(base_env, CELERY_BROKER_URL=RABBITMQ_URL)
    with Connection(RABBITMQ_URL, connect_timeout=3) as conn:
        conn.default_channel.queue_delete(base_env["SKILLPAY_CELERY_QUEUE"])


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


def start_worker(
    env: dict[str, str],
    log_dir: Path,
    concurrency: int = 2,
    *,
    beat: bool = True,
    name: str = "worker",
) -> Process:
    """A `celery worker` (with an embedded beat unless beat=False), as on a machine of its own."""
    args = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers.app",
        "worker",
        "-n",
        f"{name}-{os.getpid()}@%h",
        "-P",
        "prefork",
        "-c",
        str(concurrency),
        "-Q",
        env["SKILLPAY_CELERY_QUEUE"],
        "--without-mingle",
        "--without-gossip",
        "--loglevel",
        "INFO",
    ]
    if beat:
        args += ["-B", "-s", str(log_dir / f"{name}-beat-schedule")]
    worker = Process(name, args, env, log_dir).start()
    wait_for(lambda: "ready." in worker.log() or worker.proc.poll() is not None, timeout=60)
    assert worker.proc.poll() is None, worker.log()
    return worker


def start_beat(env: dict[str, str], log_dir: Path, name: str = "beat") -> Process:
    beat = Process(
        name,
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "workers.app",
            "beat",
            "-s",
            str(log_dir / f"{name}-schedule"),
            "--loglevel",
            "INFO",
        ],
        env,
        log_dir,
    ).start()
    wait_for(lambda: "beat: Starting" in beat.log() or beat.proc.poll() is not None, timeout=60)
    assert beat.proc.poll() is None, beat.log()
    return beat


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
        "-c",
        "python:web.gunicorn_conf",
        "--access-logfile",
        "-",
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


def start_stream(env: dict[str, str], log_dir: Path, public_base_url: str) -> Process:
    """The live-stream process (gunicorn's aiohttp worker) on STREAM_PORT."""
    port = env["STREAM_PORT"]
    return serve(
        "stream",
        [
            sys.executable,
            "-m",
            "gunicorn",
            "web.stream:serve",
            "-c",
            "python:web.gunicorn_conf",
            "--worker-class",
            "aiohttp.GunicornWebWorker",
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "1",
            "--access-logfile",
            "-",
        ],
        dict(env, PUBLIC_BASE_URL=public_base_url),
        log_dir,
        f"http://127.0.0.1:{port}",
    )


@pytest.fixture(scope="session")
def stream(process_env, web, tmp_path_factory):
    """The live stream, as its own process; yields its events URL."""
    server = start_stream(process_env, tmp_path_factory.mktemp("stream"), web)
    yield process_env["SKILLPAY_STREAM_URL"]
    server.stop()
