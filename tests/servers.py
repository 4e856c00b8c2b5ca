"""PostgreSQL, Redis and RabbitMQ instances of a test's own, on free ports, that it may stop and start."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from tests.support import free_port, wait_for


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else (shutil.which(name) or name)


def _as_postgres(args: list[str]) -> list[str]:
    # initdb and postgres refuse to run as root.
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *args]
    return args


class OwnPostgres:
    def __init__(self) -> None:
        # Outside pytest's tmp tree, which the postgres user may not enter.
        base = Path(tempfile.mkdtemp(prefix="skillpay-pg-"))
        self.base = base
        self.dir = base / "pgdata"
        self.sock = base / "pgsock"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def init(self) -> OwnPostgres:
        self.sock.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.base, "postgres")
            shutil.chown(self.sock, "postgres")
        subprocess.run(
            _as_postgres(
                [
                    _pg_bin("initdb"),
                    "-D",
                    str(self.dir),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--no-sync",
                    "-E",
                    "UTF8",
                ]
            ),
            check=True,
            capture_output=True,
        )
        return self.start()

    def start(self) -> OwnPostgres:
        subprocess.run(
            _as_postgres(
                [
                    _pg_bin("pg_ctl"),
                    "-D",
                    str(self.dir),
                    "-l",
                    str(self.dir.parent / "pg.log"),
                    "-w",
                    "start",
                    "-o",
                    f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 -c fsync=off",
                ]
            ),
            check=True,
            capture_output=True,
        )
        return self

    def stop(self) -> None:
        subprocess.run(
            _as_postgres([_pg_bin("pg_ctl"), "-D", str(self.dir), "-m", "immediate", "-w", "stop"]),
            check=False,
            capture_output=True,
        )

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


class OwnRedis:
    def __init__(self, base: Path) -> None:
        self.port = free_port()
        self.base = base
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> OwnRedis:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.base),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.exceptions.ConnectionError:
                return False

        wait_for(up, timeout=10)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def restart_after(server: OwnPostgres | OwnRedis | OwnRabbitMQ, down_seconds: float) -> None:
    server.stop()
    time.sleep(down_seconds)
    server.start()


class OwnRabbitMQ:
    """A RabbitMQ node of the test's own: its own name, ports and data directory, so that
    killing it touches nothing else; started again, it finds its durable queues."""

    BIN = "/usr/lib/rabbitmq/bin/rabbitmq-server"

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="skillpay-rabbitmq-"))
        self.port = free_port()
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}//"
        (self.base / "enabled_plugins").write_text("[].\n")
        # guest may connect over 127.0.0.1 (loopback) only by default; the port is ours.
        (self.base / "rabbitmq.conf").write_text("loopback_users = none\n")
        self.env = dict(
            os.environ,
            HOME=str(self.base),
            RABBITMQ_NODENAME=f"skillpay-test-{self.port}@localhost",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(free_port()),
            RABBITMQ_MNESIA_BASE=str(self.base / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.base / "log"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.base / "enabled_plugins"),
            RABBITMQ_CONFIG_FILE=str(self.base / "rabbitmq"),
            RABBITMQ_PID_FILE=str(self.base / "pid"),
        )
        self.proc: subprocess.Popen | None = None

    def start(self) -> OwnRabbitMQ:
        from kombu import Connection

        self.proc = subprocess.Popen(
            [self.BIN],
            env=self.env,
            cwd=self.base,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

        def up() -> bool:
            try:
                with Connection(self.url, connect_timeout=1) as conn:
                    conn.ensure_connection(max_retries=1)
                return True
            except Exception:  # noqa: BLE001 - not up yet
                return False

        wait_for(up, timeout=60, interval=0.25)
        return self

    def stop(self) -> None:
        """SIGKILL the node (every process of its group): a crash, not a shutdown."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)
