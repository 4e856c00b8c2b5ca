"""Run every benchmark against local PostgreSQL and Redis, and write docs/benchmarks.md.

    make bench                 # full run (a few minutes)
    .venv/bin/python -m bench.run --quick      # shorter, for a smoke check

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
    """A gunicorn server, returned once it answers HTTP at all (any status counts)."""
    server = Server(
        [
            sys.executable,
            "-m",
            "gunicorn",
            app,
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
    from pipeline.signing import compact_json, sign

    port, worker_id, duration, signed = args
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    latencies: list[float] = []
    deadline = time.perf_counter() + duration
    i = 0
    while time.perf_counter() < deadline:
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


# -- benchmarks -----------------------------------------------------------------------------


def bench_receiver(env: dict[str, str], duration: float) -> list[dict]:
    rows = []
    ours_port, bare_port = free_port(), free_port()
    # Its events go to a queue of their own, dropped afterwards: no worker takes them here.
    env = dict(env, SKILLPAY_CELERY_QUEUE=QUEUE + "-receiver")
    ours = gunicorn("web.wsgi:app", ours_port, env)
    bare = gunicorn("bench.bare_app:app", bare_port, env)
    try:
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
    finally:
        ours.stop()
        bare.stop()
        import redis

        redis.Redis.from_url(REDIS_URL).delete(QUEUE + "-receiver")
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


# -- report ---------------------------------------------------------------------------------


def write_report(receiver: list[dict], pipeline: dict, bulk_result: dict, command: str) -> None:
    docs = ROOT / "docs"
    docs.mkdir(exist_ok=True)
    lines = [
        "# Benchmarks",
        "",
        provenance(command) + " PostgreSQL and Redis on the same machine (loopback).",
        "This machine is noisy and the load generator shares its 2 cores with the servers: "
        "read ratios and medians, not absolute numbers.",
        "",
        "## Receiver: `POST /webhooks/ikhokha`",
        "",
        "Ours: signature check, durable inbox row (PostgreSQL commit), enqueue to Redis. Bare: a Flask "
        "endpoint that returns 200. Both under gunicorn, 2 workers x 4 threads (gthread); keep-alive "
        "clients, one process per sender.",
        "",
        "| senders | ours req/s | bare req/s | ratio | ours p50 ms | ours p99 ms | bare p50 ms | bare p99 ms |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in receiver:
        o, b = row["ours"], row["bare"]
        lines.append(
            f"| {row['senders']} | {o['rps']:.0f} | {b['rps']:.0f} | {o['rps'] / b['rps']:.2f} | "
            f"{o['p50_ms']:.1f} | {o['p99_ms']:.1f} | {b['p50_ms']:.1f} | {b['p99_ms']:.1f} |"
        )
    o, b = pipeline["ours"], pipeline["bare"]
    lines += [
        "",
        "Targets: at least half the bare endpoint's throughput; p99 under 30 ms at 32 senders.",
        "",
        "## Pipeline: callback to approved enrollment",
        "",
        f"Ours: a signed callback over HTTP, then the six stages on a prefork worker (2 processes), "
        f"to the approved enrollment's history row. Bare: a chain of six no-op Celery tasks on the same "
        f"broker and worker settings, from `apply_async` to the last task. Idle latency over "
        f"{pipeline['idle_n']} events sent one at a time; throughput over a burst of {pipeline['burst_n']}.",
        "",
        "| | ours | no-op chain | ratio |",
        "| --- | ---: | ---: | ---: |",
        f"| idle p50 (ms) | {o['idle_p50_ms']:.1f} | {b['idle_p50_ms']:.1f} | {o['idle_p50_ms'] / b['idle_p50_ms']:.2f} |",
        f"| idle p99 (ms) | {o['idle_p99_ms']:.1f} | {b['idle_p99_ms']:.1f} | {o['idle_p99_ms'] / b['idle_p99_ms']:.2f} |",
        f"| sustained events/s | {o['throughput']:.0f} | {b['throughput']:.0f} | {o['throughput'] / b['throughput']:.2f} |",
        "",
        "Targets: at least 75% of the no-op chain's throughput; p50 under 25 ms when idle.",
        "",
        f"## Bulk approval of {bulk_result['n']:,} enrollments",
        "",
        "Ours: `pipeline.bulk.run_job` (batches of 500 through the state machine: row locks, one history "
        "row and two notification rows per approval, per-item outcomes). Bare: one `UPDATE` and one "
        "`INSERT ... SELECT` of history rows in one transaction. Median of "
        f"{len(bulk_result['ours_all'])} runs.",
        "",
        "| | ours | bare SQL | ratio |",
        "| --- | ---: | ---: | ---: |",
        f"| seconds | {bulk_result['ours_s']:.2f} | {bulk_result['bare_s']:.2f} | "
        f"{bulk_result['ours_s'] / bulk_result['bare_s']:.1f} |",
        "",
        "Target: 10,000 in under 10 seconds.",
        "",
        "![benchmarks](benchmarks.png)",
        "",
    ]
    # Keep the sections other benchmarks write (bench/stream.py), between their markers.
    previous = (docs / "benchmarks.md").read_text() if (docs / "benchmarks.md").exists() else ""
    marked = re.compile(r"<!-- (\w+):start -->.*?<!-- \1:end -->", re.DOTALL)
    sections = [m.group(0) for m in marked.finditer(previous)]
    (docs / "benchmarks.md").write_text("\n".join(lines + sections) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", flush=True)
        return
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    senders = [r["senders"] for r in receiver]
    axes[0].plot(senders, [r["ours"]["rps"] for r in receiver], "o-", label="ours")
    axes[0].plot(senders, [r["bare"]["rps"] for r in receiver], "s--", label="bare Flask")
    axes[0].set(title="Receiver throughput", xlabel="concurrent senders", ylabel="requests/s")
    axes[0].legend()
    axes[1].bar(
        ["ours p50", "no-op p50", "ours p99", "no-op p99"],
        [o["idle_p50_ms"], b["idle_p50_ms"], o["idle_p99_ms"], b["idle_p99_ms"]],
        color=["C0", "C1", "C0", "C1"],
    )
    axes[1].set(title="Callback to approval, idle", ylabel="ms")
    axes[2].bar(
        ["ours", "bare SQL"], [bulk_result["ours_s"], bulk_result["bare_s"]], color=["C0", "C1"]
    )
    axes[2].set(title=f"Bulk approval of {bulk_result['n']:,}", ylabel="seconds")
    fig.tight_layout()
    fig.savefig(docs / "benchmarks.png", dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="shorter runs")
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
    try:
        from models import configure_database, get_engine

        configure_database(database_url)
        engine = get_engine()
        duration = 3.0 if args.quick else 6.0
        receiver = bench_receiver(env, duration)
        pipeline = bench_pipeline(
            env, engine, idle_n=30 if args.quick else 100, burst_n=200 if args.quick else 1000
        )
        bulk_result = bench_bulk(engine, 10_000, repeats=1 if args.quick else 3)
        engine.dispose()
        command = "make bench" if not args.quick else ".venv/bin/python -m bench.run --quick"
        write_report(receiver, pipeline, bulk_result, command)
        print(json.dumps({"written": "docs/benchmarks.md"}), flush=True)
    finally:
        database.drop()


if __name__ == "__main__":
    main()
