"""Run the benchmarks against local PostgreSQL and Redis, and write docs/benchmarks.md.

    make bench                 # full run (several minutes)
    .venv/bin/python -m bench.run --quick      # shorter, for a smoke check
    .venv/bin/python -m bench.run --only receiver latency     # some of them

Each benchmark replaces its own section of docs/benchmarks.md (between its markers) and keeps
its figures in that section, so the plot (docs/benchmarks.png) is redrawn from all of them
after any run.

Each benchmark runs our path and a bare baseline on the same machine, servers and settings in
one run, and reports medians, p99 and the ratio. Servers come from SKILLPAY_BENCH_DATABASE_URL
(an admin URL; a fresh database is created) and SKILLPAY_BENCH_REDIS_URL.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parents[1]
ADMIN_URL = os.environ.get(
    "SKILLPAY_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("SKILLPAY_BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
APP_ID, SECRET = "bench-app", "bench-secret"
QUEUE = f"skillpay-bench-{os.getpid()}"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


class BenchDatabase:
    """A new PostgreSQL database on ADMIN_URL's server, migrated, for one benchmark run;
    `drop()` removes it."""

    def __init__(self, prefix: str) -> None:
        from sqlalchemy import create_engine, text

        from migrations import upgrade
        from models.db import driver_url

        self.name = f"{prefix}_{os.getpid()}"
        self.url = urlunsplit(urlsplit(ADMIN_URL)._replace(path="/" + self.name))
        self._admin = create_engine(driver_url(ADMIN_URL), isolation_level="AUTOCOMMIT")
        with self._admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{self.name}"'))
        try:
            upgrade(self.url)
        except BaseException:
            self.drop()
            raise

    def drop(self) -> None:
        from sqlalchemy import text

        with self._admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
        self._admin.dispose()


def commit_id() -> str:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    return done.stdout.strip() or "unknown"


def provenance(command: str) -> str:
    """When, where and from which commit a table was measured, and the command that did it."""
    return (
        f"Run on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, "
        f"{platform.python_version()}, commit {commit_id()}. Command: `{command}`."
    )


def replace_marked_section(start: str, end: str, lines: list[str]) -> None:
    """Write `lines` (which begin with `start` and end with `end`) into docs/benchmarks.md in
    place of the section between those markers, or at the end; the rest stays as it is."""
    path = ROOT / "docs" / "benchmarks.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in text:
        head, _, rest = text.partition(start)
        text = head + "\n".join(lines) + rest.partition(end)[2]
    else:
        text = text.rstrip() + "\n\n" + "\n".join(lines) + "\n"
    path.write_text(text)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.log = open(f"/tmp/skillpay-bench-{args[2]}-{time.monotonic_ns()}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            args,
            env=env,
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop(self) -> None:
        import signal

        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


GTHREAD = ("--workers", "2", "--threads", "4", "--worker-class", "gthread")


def gunicorn(
    app: str, port: int, env: dict[str, str], workers: tuple[str, ...] = GTHREAD
) -> Server:
    """A gunicorn server, returned once it answers HTTP at all (any status counts). Our app
    runs with the production settings module (metrics in multiprocess mode, the log
    formatter); the bare one without."""
    config = ("-c", "python:web.gunicorn_conf") if app.startswith("web.") else ()
    server = Server(
        [
            sys.executable,
            "-m",
            "gunicorn",
            app,
            *config,
            "--bind",
            f"127.0.0.1:{port}",
            *workers,
            "--log-level",
            "warning",
        ],
        env,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("POST", "/webhooks/ikhokha", body=b"{}")
            conn.getresponse().read()
            return server
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{app} did not start")


def celery_worker(app: str, queue: str, env: dict[str, str], *extra: str) -> Server:
    server = Server(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            app,
            "worker",
            "-P",
            "prefork",
            "-c",
            "2",
            "-Q",
            queue,
            "--without-mingle",
            "--without-gossip",
            "--loglevel",
            "WARNING",
            *extra,
        ],
        env,
    )
    time.sleep(4)
    return server


# -- load generation ------------------------------------------------------------------------


def _sender(args: tuple[int, int, float, bool]) -> list[float]:
    port, worker_id, duration, signed = args
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    latencies: list[float] = []
    deadline = time.perf_counter() + duration
    i = 0
    while time.perf_counter() < deadline:
        body, headers = _signed_request(worker_id, i, signed)
        start = time.perf_counter()
        conn.request("POST", "/webhooks/ikhokha", body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        latencies.append(time.perf_counter() - start)
        if response.status != 200:
            raise RuntimeError(f"status {response.status}")
        i += 1
    return latencies


def load(port: int, senders: int, duration: float, signed: bool) -> dict[str, float]:
    with multiprocessing.get_context("fork").Pool(senders) as pool:
        results = pool.map(_sender, [(port, w, duration, signed) for w in range(senders)])
    latencies = [x for r in results for x in r]
    return {
        "rps": len(latencies) / duration,
        "p50_ms": pct(latencies, 50) * 1000,
        "p99_ms": pct(latencies, 99) * 1000,
        "n": len(latencies),
    }


def _signed_request(worker_id: int, i: int, signed: bool) -> tuple[bytes, dict[str, str]]:
    from pipeline.signing import compact_json, sign

    body = compact_json(
        {
            "paylinkID": f"bench-{worker_id}-{i}-{uuid.uuid4().hex[:6]}",
            "status": "SUCCESS",
            "externalTransactionID": str(uuid.uuid4()),
        }
    )
    headers = {"Content-Type": "application/json"}
    if signed:
        headers |= {"ik-appid": APP_ID, "ik-sign": sign(SECRET, "/webhooks/ikhokha", body)}
    return body, headers


OPEN_LOOP_PROCESSES, OPEN_LOOP_THREADS = 4, 16


def _open_loop_sender(args: tuple[int, int, float, float, float, bool]) -> list[float]:
    """This process's share of an open loop: OPEN_LOOP_THREADS connections, each sending at
    its fixed times whatever the answers do. A latency counts from the time the request was
    due, so a request held up behind a slow one is charged its wait (no coordinated omission)."""
    import threading

    port, first, rate, duration, start, signed = args
    slots = OPEN_LOOP_PROCESSES * OPEN_LOOP_THREADS
    latencies: list[float] = []
    lock = threading.Lock()

    def connection(slot: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine: list[float] = []
        k = 0
        while True:
            due = start + (k * slots + slot) / rate
            if due >= start + duration:
                break
            body, headers = _signed_request(slot, k, signed)
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            conn.request("POST", "/webhooks/ikhokha", body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"status {response.status}")
            mine.append(time.monotonic() - due)
            k += 1
        with lock:
            latencies.extend(mine)

    threads = [
        threading.Thread(target=connection, args=(first + t,)) for t in range(OPEN_LOOP_THREADS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies


def open_loop(port: int, rate: float, duration: float, signed: bool) -> dict[str, float]:
    """Callbacks offered at `rate` per second for `duration` seconds, spread evenly."""
    start = time.monotonic() + 1.0  # every sender ready before the first is due
    args = [
        (port, p * OPEN_LOOP_THREADS, rate, duration, start, signed)
        for p in range(OPEN_LOOP_PROCESSES)
    ]
    with multiprocessing.get_context("fork").Pool(OPEN_LOOP_PROCESSES) as pool:
        results = pool.map(_open_loop_sender, args)
    latencies = [x for r in results for x in r]
    finished = max(latencies) if latencies else 0.0
    return {
        "offered": rate,
        "n": len(latencies),
        "p50_ms": pct(latencies, 50) * 1000,
        "p99_ms": pct(latencies, 99) * 1000,
        "max_ms": finished * 1000,
    }


# -- benchmarks -----------------------------------------------------------------------------


@contextmanager
def ours_and_bare(env: dict[str, str], name: str) -> Iterator[tuple[int, int]]:
    """Our app and the bare endpoint under gunicorn, side by side: their ports. Our events go
    to a queue of their own, dropped afterwards: no worker takes them here."""
    queue = f"{QUEUE}-{name}"
    env = dict(env, SKILLPAY_CELERY_QUEUE=queue)
    ours_port, bare_port = free_port(), free_port()
    ours = gunicorn("web.wsgi:app", ours_port, env)
    bare = gunicorn("bench.bare_app:app", bare_port, env)
    try:
        yield ours_port, bare_port
    finally:
        ours.stop()
        bare.stop()
        import redis

        redis.Redis.from_url(REDIS_URL).delete(queue)


def bench_receiver(env: dict[str, str], duration: float) -> list[dict]:
    rows = []
    with ours_and_bare(env, "receiver") as (ours_port, bare_port):
        for senders in (1, 8, 32):
            # Alternate, so slow drift on a noisy machine hits both alike.
            b = load(bare_port, senders, duration, signed=False)
            o = load(ours_port, senders, duration, signed=True)
            rows.append({"senders": senders, "ours": o, "bare": b})
            print(
                f"receiver {senders:>2} senders: ours {o['rps']:.0f}/s p50 {o['p50_ms']:.1f} ms "
                f"p99 {o['p99_ms']:.1f} ms | bare {b['rps']:.0f}/s p50 {b['p50_ms']:.1f} ms",
                flush=True,
            )
    return rows


LATENCY_RATES = (100, 300, 600)


def bench_latency(env: dict[str, str], duration: float) -> list[dict]:
    """Open loop: a fixed offered rate of callbacks, ours and the bare endpoint, p50 and p99."""
    rows = []
    with ours_and_bare(env, "latency") as (ours_port, bare_port):
        for rate in LATENCY_RATES:
            b = open_loop(bare_port, rate, duration, signed=False)
            o = open_loop(ours_port, rate, duration, signed=True)
            rows.append({"rate": rate, "ours": o, "bare": b})
            print(
                f"open loop {rate}/s: ours p50 {o['p50_ms']:.1f} ms p99 {o['p99_ms']:.1f} ms | "
                f"bare p50 {b['p50_ms']:.1f} ms p99 {b['p99_ms']:.1f} ms",
                flush=True,
            )
    return rows


def _seed_payments(engine, n: int) -> list[tuple[str, str]]:
    from sqlalchemy import text

    tag = uuid.uuid4().hex[:8]
    with engine.begin() as conn:
        course = conn.execute(
            text(
                "INSERT INTO courses (title, price_cents, currency, created_at) "
                "VALUES ('Bench', 1000, 'ZAR', now()) RETURNING id"
            )
        ).scalar()
        conn.execute(
            text(
                "INSERT INTO users (email, role, created_at) SELECT 'b' || g || '-' || :t || "
                "'@example.com', 'student', now() FROM generate_series(1, :n) g"
            ),
            {"t": tag, "n": n},
        )
        conn.execute(
            text(
                "INSERT INTO enrollments (user_id, course_id, state, payment_method, created_at, "
                "updated_at) SELECT id, :c, 'pending_payment', 'card', now(), now() FROM users "
                "WHERE email LIKE '%-' || :t || '@example.com'"
            ),
            {"c": course, "t": tag},
        )
        rows = conn.execute(
            text(
                "INSERT INTO payments (id, enrollment_id, method, amount_cents, currency, reference, paylink_id, "
                "created_at, updated_at) SELECT gen_random_uuid()::text, id, 'card', 1000, 'ZAR', "
                "'B' || id || :t, 'PL' || id || :t, now(), now() FROM enrollments WHERE course_id = :c "
                "RETURNING id, paylink_id"
            ),
            {"c": course, "t": tag},
        ).all()
    return [(r[0], r[1]) for r in rows]


def _post_callback(port: int, payment_id: str, paylink_id: str) -> None:
    from pipeline.signing import compact_json, sign

    body = compact_json(
        {"paylinkID": paylink_id, "status": "SUCCESS", "externalTransactionID": payment_id}
    )
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(
        "POST",
        "/webhooks/ikhokha",
        body=body,
        headers={
            "Content-Type": "application/json",
            "ik-appid": APP_ID,
            "ik-sign": sign(SECRET, "/webhooks/ikhokha", body),
        },
    )
    response = conn.getresponse()
    response.read()
    assert response.status == 200, response.status


def _post_many(args: tuple[int, list[tuple[str, str]]]) -> None:
    port, items = args
    for payment_id, paylink_id in items:
        _post_callback(port, payment_id, paylink_id)


def measure_pipeline(port: int, engine, idle_n: int, burst_n: int) -> dict[str, float]:
    """Idle latency (one callback at a time, to its approval) and burst throughput, through
    the web app on `port` and whichever workers read its queue."""
    from sqlalchemy import text

    approved_at = text(
        "SELECT extract(epoch FROM h.created_at) FROM enrollment_history h JOIN payments p "
        "ON p.enrollment_id = h.enrollment_id WHERE p.id = :p AND h.to_state = 'approved'"
    )
    idle = []
    for payment_id, paylink_id in _seed_payments(engine, idle_n):
        start = time.time()
        _post_callback(port, payment_id, paylink_id)
        while True:
            with engine.connect() as conn:
                done = conn.execute(approved_at, {"p": payment_id}).scalar()
            if done:
                idle.append(float(done) - start)
                break
            time.sleep(0.002)
        time.sleep(0.05)
    payments = _seed_payments(engine, burst_n)
    chunks = [payments[i::8] for i in range(8)]
    start = time.time()
    with multiprocessing.get_context("fork").Pool(8) as pool:
        pool.map(_post_many, [(port, c) for c in chunks])
    ids = [p for p, _ in payments]
    count = text(
        "SELECT count(*), extract(epoch FROM max(h.created_at)) FROM enrollment_history h JOIN payments p "
        "ON p.enrollment_id = h.enrollment_id WHERE p.id = ANY(:ids) AND h.to_state = 'approved'"
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        with engine.connect() as conn:
            n, last = conn.execute(count, {"ids": ids}).one()
        if n == burst_n:
            break
        time.sleep(0.2)
    ours = {
        "idle_p50_ms": pct(idle, 50) * 1000,
        "idle_p99_ms": pct(idle, 99) * 1000,
        "throughput": burst_n / (float(last) - start),
    }
    return ours


def bench_pipeline(env: dict[str, str], engine, idle_n: int, burst_n: int) -> dict:
    import redis

    port = free_port()
    web = gunicorn("web.wsgi:app", port, env)
    worker = celery_worker("workers.app", env["SKILLPAY_CELERY_QUEUE"], env)
    try:
        ours = measure_pipeline(port, engine, idle_n, burst_n)
    finally:
        worker.stop()
        web.stop()

    from bench import noop_app

    client = redis.Redis.from_url(REDIS_URL)
    client.delete("bench:noop:done")
    noop_worker = celery_worker("bench.noop_app", QUEUE + "-noop", env)
    try:
        idle = []
        for i in range(idle_n):
            start = time.time()
            noop_app.noop_chain(i).apply_async()
            _, value = client.blpop("bench:noop:done", timeout=30)
            idle.append(float(value.decode().split(":")[1]) - start)
            time.sleep(0.05)
        start = time.time()
        for i in range(burst_n):
            noop_app.noop_chain(i).apply_async()
        last = 0.0
        for _ in range(burst_n):
            _, value = client.blpop("bench:noop:done", timeout=60)
            last = max(last, float(value.decode().split(":")[1]))
        bare = {
            "idle_p50_ms": pct(idle, 50) * 1000,
            "idle_p99_ms": pct(idle, 99) * 1000,
            "throughput": burst_n / (last - start),
        }
    finally:
        noop_worker.stop()
    print(
        f"pipeline: ours idle p50 {ours['idle_p50_ms']:.1f} ms p99 {ours['idle_p99_ms']:.1f} ms, "
        f"{ours['throughput']:.0f}/s | no-op chain p50 {bare['idle_p50_ms']:.1f} ms, {bare['throughput']:.0f}/s",
        flush=True,
    )
    return {"ours": ours, "bare": bare, "idle_n": idle_n, "burst_n": burst_n}


def bench_bulk(engine, n: int, repeats: int) -> dict:
    from sqlalchemy import text
    from sqlalchemy.orm import Session

    from config import Settings
    from models import User
    from pipeline import bulk

    settings = Settings.from_env()

    def waiting_ids() -> list[int]:
        tag = uuid.uuid4().hex[:8]
        with engine.begin() as conn:
            course = conn.execute(
                text(
                    "INSERT INTO courses (title, price_cents, currency, created_at) "
                    "VALUES ('Bulk', 1000, 'ZAR', now()) RETURNING id"
                )
            ).scalar()
            conn.execute(
                text(
                    "INSERT INTO users (email, role, created_at) SELECT 'k' || g || '-' || :t || "
                    "'@example.com', 'student', now() FROM generate_series(1, :n) g"
                ),
                {"t": tag, "n": n},
            )
            return list(
                conn.execute(
                    text(
                        "INSERT INTO enrollments (user_id, course_id, state, payment_method, created_at, updated_at) "
                        "SELECT id, :c, 'pending_approval', 'eft', now(), now() FROM users WHERE email LIKE "
                        "'%-' || :t || '@example.com' RETURNING id"
                    ),
                    {"c": course, "t": tag},
                ).scalars()
            )

    with Session(engine) as s:
        admin = User(email=f"bench-admin-{uuid.uuid4().hex[:6]}@example.com", role="admin")
        s.add(admin)
        s.commit()
        admin_id = admin.id
    ours, bare = [], []
    for _ in range(repeats):
        ids = waiting_ids()
        with Session(engine, expire_on_commit=False) as s:
            job, _ = bulk.create_job(s, s.get(User, admin_id), ids, None, lambda _job_id: None)
            s.commit()
        start = time.perf_counter()
        bulk.run_job(settings, job.id)
        ours.append(time.perf_counter() - start)
        ids = waiting_ids()
        start = time.perf_counter()
        with engine.begin() as conn:
            conn.execute(
                text(
                    "UPDATE enrollments SET state = 'approved', approved_at = now(), updated_at = now() "
                    "WHERE id = ANY(:ids) AND state = 'pending_approval'"
                ),
                {"ids": ids},
            )
            conn.execute(
                text(
                    "INSERT INTO enrollment_history (enrollment_id, from_state, to_state, actor, source, "
                    "created_at) SELECT unnest(CAST(:ids AS bigint[])), 'pending_approval', 'approved', "
                    "'bench', 'bench', now()"
                ),
                {"ids": ids},
            )
        bare.append(time.perf_counter() - start)
    result = {
        "n": n,
        "ours_s": statistics.median(ours),
        "bare_s": statistics.median(bare),
        "ours_all": ours,
        "bare_all": bare,
    }
    print(
        f"bulk {n}: ours median {result['ours_s']:.2f} s, bare SQL {result['bare_s']:.2f} s",
        flush=True,
    )
    return result


SCALES = ((1_000, 10), (100_000, 10))  # enrollments, history rows per enrollment


def _grow(engine, enrollments: int, history_each: int) -> None:
    """Add students, each with one enrollment (every 20th waiting for approval by bank
    transfer, the rest approved), its payment and `history_each` history rows."""
    from sqlalchemy import text

    tag = uuid.uuid4().hex[:8]
    with engine.begin() as conn:
        course = conn.execute(
            text(
                "INSERT INTO courses (title, price_cents, currency, created_at) "
                "VALUES ('Scale', 1000, 'ZAR', now()) RETURNING id"
            )
        ).scalar()
        conn.execute(
            text(
                "INSERT INTO users (email, role, created_at) SELECT 's' || g || '-' || :t || "
                "'@example.com', 'student', now() FROM generate_series(1, :n) g"
            ),
            {"t": tag, "n": enrollments},
        )
        conn.execute(
            text(
                "INSERT INTO enrollments (user_id, course_id, state, payment_method, created_at, "
                "updated_at, waiting_since, waiting_reason) SELECT u.id, :c, "
                "CASE WHEN u.id % 20 = 0 THEN 'pending_approval' ELSE 'approved' END, "
                "CASE WHEN u.id % 20 = 0 THEN 'eft' ELSE 'card' END, "
                "now() - u.id * interval '1 second', now(), "
                "CASE WHEN u.id % 20 = 0 THEN now() - u.id * interval '1 second' END, "
                "CASE WHEN u.id % 20 = 0 THEN 'waiting for the bank transfer' END "
                "FROM users u WHERE u.email LIKE '%-' || :t || '@example.com'"
            ),
            {"c": course, "t": tag},
        )
        conn.execute(
            text(
                "INSERT INTO payments (id, enrollment_id, method, amount_cents, currency, "
                "reference, paylink_id, created_at, updated_at) SELECT gen_random_uuid()::text, "
                "e.id, e.payment_method, 1000, 'ZAR', 'S' || e.id || :t, 'Q' || e.id || :t, "
                "e.created_at, now() FROM enrollments e WHERE e.course_id = :c"
            ),
            {"c": course, "t": tag},
        )
        conn.execute(
            text(
                "INSERT INTO enrollment_history (enrollment_id, from_state, to_state, actor, "
                "source, created_at) SELECT e.id, 'pending_payment', e.state, 'bench', 'bench', "
                "e.created_at + g * interval '1 millisecond' FROM enrollments e, "
                "generate_series(1, :k) g WHERE e.course_id = :c"
            ),
            {"c": course, "k": history_each},
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("ANALYZE"))


def _timed_gets(port: int, token: str, paths: list[str]) -> dict[str, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    latencies = []
    for path in paths:
        start = time.perf_counter()
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
        response = conn.getresponse()
        response.read()
        latencies.append(time.perf_counter() - start)
        if response.status != 200:
            raise RuntimeError(f"GET {path}: status {response.status}")
    return {"p50_ms": pct(latencies, 50) * 1000, "p99_ms": pct(latencies, 99) * 1000}


def bench_queries(env: dict[str, str], requests: int) -> list[dict]:
    """The admin queue page and one enrollment, at a small size and then at 100,000
    enrollments with 1,000,000 history rows (a database of its own): the same requests
    should cost the same."""
    database = BenchDatabase("skillpay_scale")
    try:
        return _queries(dict(env, DATABASE_URL=database.url), database.url, requests)
    finally:
        database.drop()


def _queries(env: dict[str, str], url: str, requests: int) -> list[dict]:
    import random

    from sqlalchemy import create_engine, text
    from sqlalchemy.orm import Session

    from models import User
    from models.db import driver_url
    from pipeline.accounts import issue_token

    engine = create_engine(driver_url(url))
    with Session(engine) as s:
        admin = User(email=f"scale-admin-{uuid.uuid4().hex[:6]}@example.com", role="admin")
        s.add(admin)
        s.flush()
        token = issue_token(s, admin)
        s.commit()
    port = free_port()
    web = gunicorn("web.wsgi:app", port, env)
    rows = []
    try:
        added = 0
        for enrollments, history_each in SCALES:
            _grow(engine, enrollments - added, history_each)
            added = enrollments
            with engine.connect() as conn:
                counts = conn.execute(
                    text(
                        "SELECT (SELECT count(*) FROM enrollments), "
                        "(SELECT count(*) FROM enrollment_history), "
                        "(SELECT count(*) FROM enrollments WHERE state = 'pending_approval')"
                    )
                ).one()
                waiting = list(
                    conn.execute(
                        text("SELECT id FROM enrollments WHERE state = 'pending_approval'")
                    ).scalars()
                )
            # The page an admin opens: the 50 that waited longest, and how many wait.
            queue_paths = ["/api/admin/enrollments?per_page=50"] * requests
            one_paths = [f"/api/enrollments/{random.choice(waiting)}" for _ in range(requests)]
            _timed_gets(port, token, queue_paths[:10] + one_paths[:10])  # warm up
            row = {
                "enrollments": counts[0],
                "history": counts[1],
                "waiting": counts[2],
                "queue": _timed_gets(port, token, queue_paths),
                "enrollment": _timed_gets(port, token, one_paths),
            }
            rows.append(row)
            print(
                f"queries at {counts[0]:,} enrollments / {counts[1]:,} history: queue page p50 "
                f"{row['queue']['p50_ms']:.1f} ms, one enrollment p50 "
                f"{row['enrollment']['p50_ms']:.1f} ms",
                flush=True,
            )
    finally:
        web.stop()
        engine.dispose()
    return rows


# -- report ---------------------------------------------------------------------------------


HEADER = [
    "# Benchmarks",
    "",
    "Each section says when, on which machine and from which commit it was measured, and the "
    "command. This machine is noisy and the load generator shares its 2 cores with the servers "
    "(PostgreSQL, Redis and RabbitMQ on the same machine, loopback): read ratios and medians, "
    "not absolute numbers. Ours and its baseline always run side by side in one run.",
    "",
    "![ours against each baseline](benchmarks.png)",
    "",
]
DATA = re.compile(r"<!-- data (\{.*?\}) -->")


def write_section(name: str, title: str, body: list[str], data: object, command: str) -> None:
    """Replace this benchmark's section of docs/benchmarks.md; its figures go with it (for
    the plot)."""
    path = ROOT / "docs" / "benchmarks.md"
    if not path.exists() or not path.read_text().startswith("# Benchmarks"):
        path.write_text("\n".join(HEADER) + "\n")
    lines = [
        f"<!-- {name}:start -->",
        f"## {title}",
        "",
        provenance(command),
        *body,
        f"<!-- data {json.dumps({'name': name, 'rows': data})} -->",
        f"<!-- {name}:end -->",
    ]
    replace_marked_section(lines[0], lines[-1], lines)


def section_receiver(rows: list[dict], command: str) -> None:
    body = [
        "Ours: signature check, the inbox row stored durably (one autocommitted INSERT, "
        "PostgreSQL waits for the WAL flush), the event sent to Redis. Bare: a Flask endpoint "
        "that returns 200. Both under gunicorn, 2 workers x 4 threads (gthread), ours with its "
        "production settings module (web.gunicorn_conf); keep-alive clients, one process per "
        "sender, each sending its next request when the last is answered (closed loop).",
        "",
        "| senders | ours req/s | bare req/s | ratio | ours p50 ms | ours p99 ms | bare p50 ms "
        "| bare p99 ms |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        o, b = row["ours"], row["bare"]
        body.append(
            f"| {row['senders']} | {o['rps']:.0f} | {b['rps']:.0f} | {o['rps'] / b['rps']:.2f} "
            f"| {o['p50_ms']:.1f} | {o['p99_ms']:.1f} | {b['p50_ms']:.1f} | {b['p99_ms']:.1f} |"
        )
    body += ["", "Target: at least half the bare endpoint's throughput (ratio >= 0.5)."]
    write_section(
        "receiver", "Receiver: `POST /webhooks/ikhokha`, closed loop", body, rows, command
    )


def section_latency(rows: list[dict], duration: float, command: str) -> None:
    body = [
        f"The same two servers, offered a fixed rate of callbacks for {duration:g} s whatever "
        f"the answers do ({OPEN_LOOP_PROCESSES} processes x {OPEN_LOOP_THREADS} keep-alive "
        "connections, each sending at its own fixed times). A latency counts from when the "
        "request was due, so time spent waiting behind a slow request is included.",
        "",
        "| offered /s | ours p50 ms | ours p99 ms | bare p50 ms | bare p99 ms | requests |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        o, b = row["ours"], row["bare"]
        body.append(
            f"| {row['rate']} | {o['p50_ms']:.1f} | {o['p99_ms']:.1f} | {b['p50_ms']:.1f} "
            f"| {b['p99_ms']:.1f} | {o['n']} |"
        )
    body += ["", "Target: p99 under 25 ms at 300 callbacks/s."]
    write_section("latency", "Receiver: open loop at a fixed rate", body, rows, command)


def section_pipeline(result: dict, command: str) -> None:
    o, b = result["ours"], result["bare"]
    body = [
        "Ours: a signed callback over HTTP, then the six stages on a prefork worker (2 "
        "processes), to the approved enrollment's history row. Bare: a chain of six no-op "
        "Celery tasks on the same broker and worker settings, from `apply_async` to the last "
        f"task. Idle latency over {result['idle_n']} events sent one at a time; throughput over "
        f"a burst of {result['burst_n']} (ours: the callbacks are sent over HTTP during the "
        "burst, by 8 processes on the same 2 cores).",
        "",
        "| | ours | no-op chain | ratio |",
        "| --- | ---: | ---: | ---: |",
        f"| idle p50 (ms) | {o['idle_p50_ms']:.1f} | {b['idle_p50_ms']:.1f} | "
        f"{o['idle_p50_ms'] / b['idle_p50_ms']:.2f} |",
        f"| idle p99 (ms) | {o['idle_p99_ms']:.1f} | {b['idle_p99_ms']:.1f} | "
        f"{o['idle_p99_ms'] / b['idle_p99_ms']:.2f} |",
        f"| sustained events/s | {o['throughput']:.0f} | {b['throughput']:.0f} | "
        f"{o['throughput'] / b['throughput']:.2f} |",
        "",
        "Targets: sustained at least 0.75 of the no-op chain; idle p50 at most 1.3 times it.",
    ]
    write_section("pipeline", "Pipeline: callback to approved enrollment", body, result, command)


def section_bulk(result: dict, command: str) -> None:
    body = [
        "Ours: `pipeline.bulk.run_job` (batches of 500 through the state machine: row locks, "
        "one history row and two notification rows per approval, each item's outcome, the "
        "pushes to Redis). Bare: one `UPDATE` and one `INSERT ... SELECT` of history rows in one "
        f"transaction. Median of {len(result['ours_all'])} runs.",
        "",
        "| | ours | bare SQL | ratio |",
        "| --- | ---: | ---: | ---: |",
        f"| seconds | {result['ours_s']:.2f} | {result['bare_s']:.2f} | "
        f"{result['ours_s'] / result['bare_s']:.1f} |",
        "",
        "Target: at most 3 times the bare SQL, and under 3 s.",
    ]
    title = f"Bulk approval of {result['n']:,} enrollments"
    write_section("bulk", title, body, result, command)


def section_queries(rows: list[dict], requests: int, command: str) -> None:
    body = [
        "Our app (gunicorn as above) with an admin's token, on a database of its own; each "
        f"request sent {requests} times, one at a time, first with 1,000 enrollments, then with "
        "the same database grown to 100,000 enrollments and 1,000,000 history rows (one in 20 "
        "waiting for approval). Queue page: `GET /api/admin/enrollments?per_page=50`, the page "
        "an admin opens (the 50 that waited longest, each with its latest payment, student, "
        "course and four-eyes state, and the count of all that wait). One enrollment: `GET "
        "/api/enrollments/<id>` of a waiting one, with its history.",
        "",
        "| enrollments | history rows | waiting | queue page p50 ms | p99 ms | one enrollment "
        "p50 ms | p99 ms |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        body.append(
            f"| {row['enrollments']:,} | {row['history']:,} | {row['waiting']:,} | "
            f"{row['queue']['p50_ms']:.1f} | {row['queue']['p99_ms']:.1f} | "
            f"{row['enrollment']['p50_ms']:.1f} | {row['enrollment']['p99_ms']:.1f} |"
        )
    if len(rows) > 1:
        small, large = rows[0], rows[-1]
        body += [
            "",
            f"Grown {large['enrollments'] / small['enrollments']:.0f} times: the queue page's "
            f"p50 x{large['queue']['p50_ms'] / small['queue']['p50_ms']:.2f}, one enrollment's "
            f"x{large['enrollment']['p50_ms'] / small['enrollment']['p50_ms']:.2f}. The number "
            "of queries per page is fixed (tests/unit/test_console.py counts them).",
        ]
    write_section("queries", "Cost as the data grows", body, rows, command)


def plot() -> None:
    """docs/benchmarks.png from the figures every section of docs/benchmarks.md keeps."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", flush=True)
        return
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    data = {d["name"]: d["rows"] for d in map(json.loads, DATA.findall(text))}
    panels = [
        name for name in ("receiver", "latency", "pipeline", "bulk", "queries") if name in data
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), squeeze=False)
    for ax, name in zip(axes[0], panels, strict=True):
        rows = data[name]
        if name == "receiver":
            x = [r["senders"] for r in rows]
            ax.plot(x, [r["ours"]["rps"] for r in rows], "o-", label="ours")
            ax.plot(x, [r["bare"]["rps"] for r in rows], "s--", label="bare Flask")
            ax.set(title="Receiver, closed loop", xlabel="senders", ylabel="requests/s")
        elif name == "latency":
            x = [r["rate"] for r in rows]
            ax.plot(x, [r["ours"]["p99_ms"] for r in rows], "o-", label="ours p99")
            ax.plot(x, [r["ours"]["p50_ms"] for r in rows], "o:", label="ours p50")
            ax.plot(x, [r["bare"]["p99_ms"] for r in rows], "s--", label="bare p99")
            ax.axhline(25, color="grey", lw=0.8)  # the target for p99 at 300/s
            ax.set_yscale("log")
            ax.set(title="Receiver, open loop", xlabel="offered callbacks/s", ylabel="ms (log)")
        elif name == "pipeline":
            o, b = rows["ours"], rows["bare"]
            ax.bar([0, 1], [o["throughput"], b["throughput"]], color=["C0", "C1"])
            ax.set_xticks([0, 1], ["ours", "no-op chain"])
            ax.set(title="Pipeline, sustained", ylabel="events/s")
        elif name == "bulk":
            ax.bar([0, 1], [rows["ours_s"], rows["bare_s"]], color=["C0", "C1"])
            ax.set_xticks([0, 1], ["ours", "bare SQL"])
            ax.set(title=f"Bulk approval of {rows['n']:,}", ylabel="seconds")
        elif name == "queries":
            labels = [f"{r['enrollments']:,}" for r in rows]
            ax.plot(labels, [r["queue"]["p50_ms"] for r in rows], "o-", label="queue page")
            ax.plot(labels, [r["enrollment"]["p50_ms"] for r in rows], "s-", label="one enrollment")
            ax.set(title="As the data grows (p50)", xlabel="enrollments", ylabel="ms")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "benchmarks.png", dpi=90)


BENCHMARKS = ("receiver", "latency", "pipeline", "bulk", "queries")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="shorter runs")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
    args = parser.parse_args()

    database = BenchDatabase("skillpay_bench")
    database_url = database.url
    env = dict(
        os.environ,
        APP_ENV="test",
        DATABASE_URL=database_url,
        CELERY_BROKER_URL=REDIS_URL,
        REDIS_URL=REDIS_URL,
        IKHOKHA_APP_ID=APP_ID,
        IKHOKHA_APP_SECRET=SECRET,
        SKILLPAY_CELERY_QUEUE=QUEUE,
        SKILLPAY_LOG_LEVEL="WARNING",
        SKILLPAY_SWEEP_INTERVAL_SECONDS="3600",
    )
    os.environ.update(env)
    command = "make bench" if not args.quick else ".venv/bin/python -m bench.run --quick"
    if args.only != list(BENCHMARKS):
        command = f".venv/bin/python -m bench.run {'--quick ' if args.quick else ''}--only " + (
            " ".join(args.only)
        )
    try:
        from models import configure_database, get_engine

        configure_database(database_url)
        engine = get_engine()
        duration = 3.0 if args.quick else 6.0
        if "receiver" in args.only:
            section_receiver(bench_receiver(env, duration), command)
        if "latency" in args.only:
            section_latency(bench_latency(env, duration), duration, command)
        if "pipeline" in args.only:
            idle_n, burst_n = (30, 200) if args.quick else (100, 1000)
            section_pipeline(bench_pipeline(env, engine, idle_n, burst_n), command)
        if "bulk" in args.only:
            section_bulk(bench_bulk(engine, 10_000, repeats=1 if args.quick else 3), command)
        if "queries" in args.only:
            requests = 50 if args.quick else 200
            section_queries(bench_queries(env, requests), requests, command)
        engine.dispose()
        plot()
        print(json.dumps({"written": "docs/benchmarks.md"}), flush=True)
    finally:
        database.drop()


if __name__ == "__main__":
    main()
