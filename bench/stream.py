"""The live stream: from a committed state change to the event at a client, with 1 and with
2,000 idle streams open, against a bare Redis pub/sub round trip on the same machine; and the
stream process's memory per open stream. Writes its section of docs/benchmarks.md.

    .venv/bin/python -m bench.stream            # (make bench runs it too)
    .venv/bin/python -m bench.stream --quick    # fewer samples, 500 idle streams
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import time
import uuid
from pathlib import Path

import aiohttp
import redis
import redis.asyncio as aioredis

from bench.run import (
    REDIS_URL,
    BenchDatabase,
    Server,
    free_port,
    gunicorn,
    pct,
    provenance,
    replace_marked_section,
)

MARK_START, MARK_END = "<!-- stream:start -->", "<!-- stream:end -->"


def stream_server(env: dict[str, str], port: int) -> Server:
    return gunicorn(
        "web.stream:serve",
        port,
        env,
        ("--worker-class", "aiohttp.GunicornWebWorker", "--workers", "1"),
    )


def rss_kib(master_pid: int) -> int:
    """Resident memory of the stream process's worker (gunicorn's child)."""
    children = Path(f"/proc/{master_pid}/task/{master_pid}/children").read_text().split()
    status = Path(f"/proc/{children[0]}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))


def make_users(n: int, waiting_n: int) -> tuple[str, list[str], list[int]]:
    """An admin token, n idle students' tokens, and waiting_n enrollments waiting for
    approval, each of a student of its own who has no stream open."""
    from models import ApiToken, Course, Enrollment, User, session_scope
    from pipeline.accounts import hash_token

    tag = uuid.uuid4().hex[:6]
    with session_scope() as s:
        course = Course(title="Stream bench", price_cents=1000)
        admin = User(email=f"admin-{tag}@example.com", role="admin")
        students = [User(email=f"s{i}-{tag}@example.com") for i in range(n)]
        payers = [User(email=f"p{i}-{tag}@example.com") for i in range(waiting_n)]
        s.add_all([course, admin, *students, *payers])
        s.flush()
        tokens = {u.id: "sp_" + secrets.token_urlsafe(24) for u in [admin, *students]}
        s.add_all(
            ApiToken(user_id=uid, token_hash=hash_token(t), prefix=t[:10])
            for uid, t in tokens.items()
        )
        waiting = [
            Enrollment(
                user_id=payer.id,
                course_id=course.id,
                state="pending_approval",
                payment_method="eft",
            )
            for payer in payers
        ]
        s.add_all(waiting)
        s.flush()
        return tokens[admin.id], [tokens[u.id] for u in students], [e.id for e in waiting]


def approve_and_commit(settings, enrollment_id: int) -> float:
    """An admin approval through the pipeline's own function; the moment its commit returned
    (the notification is published to Redis after that)."""
    from models import User, on_commit, session_scope
    from pipeline.decisions import approve_enrollment

    committed: list[float] = []
    with session_scope() as s:
        admin = s.query(User).filter(User.role == "admin").first()
        # Runs right after COMMIT returns, before the publish the approval registered.
        on_commit(s, lambda: committed.append(time.perf_counter()))
        approve_enrollment(s, settings, enrollment_id, admin)
    return committed[0]


async def ours(url: str, admin: str, idle: list[str], ids: list[int], settings) -> dict:
    arrived: dict[int, float] = {}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout()) as http:
        idle_streams = await asyncio.gather(
            *(http.get(url, headers={"Authorization": f"Bearer {t}"}) for t in idle)
        )
        assert all(r.status == 200 for r in idle_streams)
        measuring = await http.get(url, headers={"Authorization": f"Bearer {admin}"})

        async def read() -> None:
            async for raw in measuring.content:
                line = raw.decode().strip()
                if line.startswith("data: "):
                    data = json.loads(line[6:])
                    arrived[data["enrollment"]["id"]] = time.perf_counter()

        reader = asyncio.create_task(read())
        await asyncio.sleep(0.5)
        latencies = []
        loop = asyncio.get_running_loop()
        for enrollment_id in ids:
            committed = await loop.run_in_executor(
                None, approve_and_commit, settings, enrollment_id
            )
            while enrollment_id not in arrived:
                await asyncio.sleep(0.0005)
            latencies.append(arrived[enrollment_id] - committed)
            await asyncio.sleep(0.02)
        reader.cancel()
        for response in [*idle_streams, measuring]:
            response.close()
    return {"p50_ms": pct(latencies, 50) * 1000, "p99_ms": pct(latencies, 99) * 1000}


async def bare(redis_url: str, idle: int, n: int) -> dict:
    """A bare Redis pub/sub round trip: publish, and one subscriber receives it."""
    subscribers = [aioredis.Redis.from_url(redis_url) for _ in range(idle)]
    idle_subs = [c.pubsub() for c in subscribers]
    for i, sub in enumerate(idle_subs):
        await sub.subscribe(f"bench:idle:{i}")
    client = aioredis.Redis.from_url(redis_url)
    sub = client.pubsub()
    await sub.subscribe("bench:measure")
    publisher = redis.Redis.from_url(redis_url)
    loop = asyncio.get_running_loop()
    latencies = []
    for i in range(n):

        def publish(i: int = i) -> float:
            t = time.perf_counter()
            publisher.publish("bench:measure", str(i))
            return t

        sent = await loop.run_in_executor(None, publish)
        while True:
            message = await sub.get_message(ignore_subscribe_messages=True, timeout=5)
            if message is not None:
                break
        latencies.append(time.perf_counter() - sent)
        await asyncio.sleep(0.02)
    for c in [*idle_subs, sub]:
        await c.aclose()
    for c in [*subscribers, client]:
        await c.aclose()
    return {"p50_ms": pct(latencies, 50) * 1000, "p99_ms": pct(latencies, 99) * 1000}


def write_section(rows: list[dict], memory: dict, command: str) -> None:
    lines = [
        MARK_START,
        "## Live stream: committed change to event at a client",
        "",
        provenance(command),
        "Ours: an admin approval committed in PostgreSQL, published to Redis after commit, read "
        "by the stream process's hub, which loads the notification and the enrollment once and "
        "writes the event to the admins' open stream. Bare: a Redis PUBLISH read by one "
        "subscriber. Idle streams are students' streams that receive nothing.",
        "",
        "| idle streams (plus the measuring one) | ours p50 ms | ours p99 ms | bare p50 ms | bare p99 ms |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        o, b = row["ours"], row["bare"]
        lines.append(
            f"| {row['idle']} | {o['p50_ms']:.1f} | {o['p99_ms']:.1f} | "
            f"{b['p50_ms']:.2f} | {b['p99_ms']:.2f} |"
        )
    lines += [
        "",
        f"Memory: the stream worker's resident set grew by {memory['delta_kib'] / 1024:.1f} MiB "
        f"for {memory['streams']} open streams: **{memory['per_stream_kib']:.1f} KiB per "
        "stream**. Target: p99 under 50 ms with 2,000 streams open.",
        MARK_END,
    ]
    replace_marked_section(MARK_START, MARK_END, lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    idle_n, samples = (500, 50) if args.quick else (2000, 200)
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 20_000), hard))
    database = BenchDatabase("skillpay_stream_bench")
    database_url = database.url
    port = free_port()
    env = dict(
        os.environ,
        APP_ENV="test",
        DATABASE_URL=database_url,
        CELERY_BROKER_URL=REDIS_URL,
        REDIS_URL=REDIS_URL,
        SKILLPAY_LOG_LEVEL="WARNING",
    )
    os.environ.update(env)
    server = None
    try:
        from config import Settings
        from models import configure_database

        configure_database(database_url)
        settings = Settings.from_env()
        admin, students, ids = make_users(idle_n, 2 * samples)
        server = stream_server(env, port)
        url = f"http://127.0.0.1:{port}/api/events"
        rows = []
        before = rss_kib(server.proc.pid)
        rows.append(
            {
                "idle": 0,
                "ours": asyncio.run(ours(url, admin, [], ids[:samples], settings)),
                "bare": asyncio.run(bare(REDIS_URL, 0, samples)),
            }
        )
        memory: dict = {}

        async def with_idle() -> dict:
            result = await ours(url, admin, students, ids[samples : 2 * samples], settings)
            return result

        # Memory is read while the idle streams are open: sample it from a thread.
        import threading

        peak = {"kib": before}

        def sample() -> None:
            while not stop.is_set():
                peak["kib"] = max(peak["kib"], rss_kib(server.proc.pid))
                time.sleep(0.2)

        stop = threading.Event()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        rows.append(
            {
                "idle": idle_n,
                "ours": asyncio.run(with_idle()),
                "bare": asyncio.run(bare(REDIS_URL, idle_n, samples)),
            }
        )
        stop.set()
        sampler.join()
        memory = {
            "streams": idle_n + 1,
            "delta_kib": peak["kib"] - before,
            "per_stream_kib": (peak["kib"] - before) / (idle_n + 1),
        }
        command = ".venv/bin/python -m bench.stream" + (" --quick" if args.quick else "")
        write_section(rows, memory, command)
        print(json.dumps({"rows": rows, "memory": memory}), flush=True)
    finally:
        if server is not None:
            server.stop()
        from models import reset_engine

        reset_engine()
        database.drop()


if __name__ == "__main__":
    main()
