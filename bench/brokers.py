"""Redis and RabbitMQ side by side, in one run on this machine: the same pipeline (a signed
callback over HTTP, the six stages, the approved enrollment) on each broker, idle latency and
burst throughput; and recovery: a worker SIGKILLed in the middle of a burst, a new one started
at once, and the time from the kill to the last enrollment approved. Writes its section of
docs/benchmarks.md.

    .venv/bin/python -m bench.brokers            # (make bench runs it too)
    .venv/bin/python -m bench.brokers --quick
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import time

from bench.run import (
    APP_ID,
    REDIS_URL,
    SECRET,
    BenchDatabase,
    _post_many,
    _seed_payments,
    celery_worker,
    free_port,
    gunicorn,
    measure_pipeline,
    provenance,
    replace_marked_section,
)

RABBITMQ_URL = os.environ.get("SKILLPAY_BENCH_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")
BROKERS = {"redis": REDIS_URL, "rabbitmq": RABBITMQ_URL}
MARK_START, MARK_END = "<!-- brokers:start -->", "<!-- brokers:end -->"


def approved(engine, ids: list[str]) -> tuple[int, float | None]:
    from sqlalchemy import text

    with engine.connect() as conn:
        n, last = conn.execute(
            text(
                "SELECT count(*), extract(epoch FROM max(h.created_at)) FROM enrollment_history h "
                "JOIN payments p ON p.enrollment_id = h.enrollment_id "
                "WHERE p.id = ANY(:ids) AND h.to_state = 'approved'"
            ),
            {"ids": ids},
        ).one()
    return n, (float(last) if last is not None else None)


def recovery(env: dict[str, str], port: int, engine, n: int) -> dict[str, float]:
    """Send n callbacks; once a third are approved, SIGKILL the worker (and its beat) and
    start another at once. Seconds from the kill to the last approval."""
    queue = env["SKILLPAY_CELERY_QUEUE"]
    beat = ("-B", "-s", f"/tmp/skillpay-bench-beat-{os.getpid()}-{time.monotonic_ns()}")
    worker = celery_worker("workers.app", queue, env, *beat)
    payments = _seed_payments(engine, n)
    ids = [p for p, _ in payments]
    with multiprocessing.get_context("fork").Pool(4) as pool:
        sending = pool.map_async(_post_many, [(port, payments[i::4]) for i in range(4)])
        while approved(engine, ids)[0] < n // 3:
            time.sleep(0.05)
        killed = time.time()
        os.killpg(worker.proc.pid, signal.SIGKILL)
        worker.proc.wait()
        worker.log.close()
        worker = celery_worker("workers.app", queue, env, *beat)
        sending.get()
    try:
        deadline = time.time() + 300
        while (state := approved(engine, ids))[0] < n and time.time() < deadline:
            time.sleep(0.1)
        count, last = state
        if count < n:
            raise RuntimeError(f"only {count} of {n} approved after the kill")
    finally:
        worker.stop()
    return {"kill_to_last_s": last - killed}


def run_broker(name: str, url: str, engine, env: dict[str, str], quick: bool) -> dict:
    env = dict(
        env, CELERY_BROKER_URL=url, SKILLPAY_CELERY_QUEUE=f"skillpay-bench-{name}-{os.getpid()}"
    )
    port = free_port()
    web = gunicorn("web.wsgi:app", port, env)
    try:
        worker = celery_worker("workers.app", env["SKILLPAY_CELERY_QUEUE"], env)
        try:
            pipeline = measure_pipeline(
                port, engine, idle_n=30 if quick else 100, burst_n=200 if quick else 1000
            )
        finally:
            worker.stop()
        recovered = recovery(env, port, engine, 150 if quick else 600)
    finally:
        web.stop()
        if url.startswith("amqp"):
            from kombu import Connection

            with Connection(url) as conn:
                conn.default_channel.queue_delete(env["SKILLPAY_CELERY_QUEUE"])
    print(name, pipeline, recovered, flush=True)
    return {**pipeline, **recovered}


def write_section(results: dict[str, dict], command: str) -> None:
    redis_, rabbit = results["redis"], results["rabbitmq"]
    rows = [
        ("idle p50 (ms)", "idle_p50_ms", "{:.1f}"),
        ("idle p99 (ms)", "idle_p99_ms", "{:.1f}"),
        ("sustained events/s", "throughput", "{:.0f}"),
        ("worker killed: kill to last approval (s)", "kill_to_last_s", "{:.1f}"),
    ]
    lines = [
        MARK_START,
        "## Brokers: Redis and RabbitMQ side by side",
        "",
        provenance(command),
        "The same pipeline on each broker, one after the other in one run: a signed callback "
        "over HTTP to its approved enrollment, on a prefork worker with 2 processes (idle: "
        "one at a time; sustained: a burst). RabbitMQ runs a quorum queue with publisher "
        "confirms; Redis the default list queue. Recovery: a burst of callbacks, the worker "
        "(with its beat) SIGKILLed once a third are approved, a new one started at once; "
        "the default sweeper settings (stale after 20 s, every 5 s). On RabbitMQ the dead "
        "worker's messages come back when its connection drops; on Redis they stay invisible "
        "and the sweeper re-drives their events.",
        "",
        "| | Redis | RabbitMQ | RabbitMQ / Redis |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label, key, fmt in rows:
        ratio = rabbit[key] / redis_[key] if redis_[key] else float("nan")
        lines.append(
            f"| {label} | {fmt.format(redis_[key])} | {fmt.format(rabbit[key])} | {ratio:.2f} |"
        )
    lines += ["", MARK_END]
    replace_marked_section(MARK_START, MARK_END, lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    from sqlalchemy import create_engine

    from models.db import driver_url

    database = BenchDatabase("skillpay_broker_bench")
    database_url = database.url
    env = dict(
        os.environ,
        APP_ENV="test",
        DATABASE_URL=database_url,
        REDIS_URL=REDIS_URL,
        IKHOKHA_APP_ID=APP_ID,
        IKHOKHA_APP_SECRET=SECRET,
        SKILLPAY_LOG_LEVEL="WARNING",
    )
    os.environ.update(env)
    try:
        engine = create_engine(driver_url(database_url))
        results = {
            broker: run_broker(broker, url, engine, env, args.quick)
            for broker, url in BROKERS.items()
        }
        engine.dispose()
        command = ".venv/bin/python -m bench.brokers" + (" --quick" if args.quick else "")
        write_section(results, command)
    finally:
        database.drop()


if __name__ == "__main__":
    main()
