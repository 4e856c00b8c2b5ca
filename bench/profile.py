"""Where the time goes: py-spy samples of the receiver under load and of a worker running a
burst of events, summed up into the top costs per request and per stage.

    .venv/bin/python -m bench.profile              # writes the profile section of docs/benchmarks.md
    .venv/bin/python -m bench.profile --label before --keep /tmp/prof   # keep the raw stacks
    .venv/bin/python -m bench.profile --label before --stacks /tmp/prof --commit c8d5407
                                                   # summarise stacks kept from an earlier run

py-spy (`pip install -e '.[bench]'`) samples the running processes from outside, so the code
measured is the code that runs; it needs to be allowed to ptrace them (root, or
kernel.yama.ptrace_scope=0). One gunicorn worker and one Celery process are profiled, so each
sample is one request's or one stage's stack.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.run import (
    APP_ID,
    QUEUE,
    REDIS_URL,
    SECRET,
    BenchDatabase,
    _post_many,
    _seed_payments,
    celery_worker,
    free_port,
    gunicorn,
    load,
    provenance,
    replace_marked_section,
)

RATE = 200  # samples per second
# What a sample is doing: the first of these that any frame of its stack matches.
ACTIVITIES = (
    ("PostgreSQL: commit", ("do_commit", "_commit_impl")),
    ("PostgreSQL: statements", ("do_execute", "do_executemany", "_exec_insertmany_context")),
    ("PostgreSQL: connect and pool", ("sqlalchemy/pool/", "do_ping")),
    ("broker: publish", ("Producer.publish", "send_task")),
    ("Redis: notifications", ("pipeline/notify.py publish",)),
    ("signature check and parsing", ("pipeline/signing.py", "pipeline/callbacks.py")),
    ("SQLAlchemy: compile, ORM, results", ("sqlalchemy/",)),
    ("metrics and logging", ("prometheus_client/", "structlog/", "logging/")),
    ("Flask and gunicorn", ("flask/", "werkzeug/", "gunicorn/", "flask_limiter/")),
    ("Celery and kombu: receive, ack, dispatch", ("celery/", "kombu/", "billiard/", "amqp/")),
)


@dataclass
class Profile:
    """Samples whose stack passes through `root`, grouped by what they were doing."""

    root: str
    total: int = 0
    activities: collections.Counter = field(default_factory=collections.Counter)
    functions: collections.Counter = field(default_factory=collections.Counter)
    by_group: dict[str, collections.Counter] = field(default_factory=dict)


def _frame(raw: str) -> tuple[str, str]:
    """(function, file relative to site-packages or the repository) of a py-spy frame."""
    name, _, where = raw.partition(" (")
    path = where.rsplit(":", 1)[0]
    for marker in ("site-packages/", "python3.11/", str(Path.cwd()) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return name, path


def _activity(frames: list[tuple[str, str]]) -> str:
    texts = [f"{path} {name}" for name, path in frames]
    for activity, needles in ACTIVITIES:
        if any(n in text for text in texts for n in needles):
            return activity
    return "our code and the rest"


def summarise(raw_file: Path, root: str, group_by: tuple[str, ...] = ()) -> Profile:
    """Read py-spy's raw (collapsed) stacks. `group_by`: function names (the stages) whose
    samples are also summed per name."""
    profile = Profile(root)
    for line in raw_file.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = [_frame(f) for f in stack.split(";")]
        names = [n for n, _ in frames]
        if root not in names:
            continue
        n = int(count)
        profile.total += n
        activity = _activity(frames)
        profile.activities[activity] += n
        ours = {f"{name} ({path})" for name, path in frames if not path.startswith(("/", "<"))}
        for key in ours:
            if path_is_ours(key):
                profile.functions[key] += n
        group = next((g for g in group_by if g in names), None)
        if group is not None:
            profile.by_group.setdefault(group, collections.Counter())[activity] += n
    return profile


def path_is_ours(key: str) -> bool:
    return any(f"({p}/" in key for p in ("web", "pipeline", "workers", "models", "config"))


def record(pid: int, seconds: float, out: Path) -> subprocess.Popen:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return subprocess.Popen(
        [
            py_spy,
            "record",
            "-p",
            str(pid),
            "-d",
            str(int(seconds)),
            "-r",
            str(RATE),
            "-f",
            "raw",
            "-o",
            str(out),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def child_pids(pid: int) -> list[int]:
    done = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in done.stdout.split()]


ONE_WORKER = ("--workers", "1", "--threads", "4", "--worker-class", "gthread")


def profile_receiver(env: dict[str, str], out: Path, seconds: float = 8.0) -> Profile:
    env = dict(env, SKILLPAY_CELERY_QUEUE=QUEUE + "-profile")
    port = free_port()
    server = gunicorn("web.wsgi:app", port, env, ONE_WORKER)
    try:
        (worker,) = child_pids(server.proc.pid)
        spy = record(worker, seconds + 1, out)
        time.sleep(0.5)
        load(port, 4, seconds, signed=True)
        spy.wait(timeout=60)
    finally:
        server.stop()
        import redis

        redis.Redis.from_url(REDIS_URL).delete(QUEUE + "-profile")
    return summarise(out, "ikhokha_callback")


STAGE_FUNCTIONS = (
    "check_signature",
    "detect_payment_type",
    "look_up_enrollment",
    "route_approval",
    "update_status",
    "send_notifications",
)
# The runner's own statements around a stage: its row lock and saving its progress (before:
# lock_event and the ORM's flush).
PLUMBING = ("_lock_for_stage", "lock_event", "_save_progress")


def profile_pipeline(env: dict[str, str], engine, out: Path, events: int = 150) -> Profile:
    port = free_port()
    web = gunicorn("web.wsgi:app", port, env)
    worker = celery_worker("workers.app", env["SKILLPAY_CELERY_QUEUE"], env, "-c", "1")
    try:
        (child,) = child_pids(worker.proc.pid)
        payments = _seed_payments(engine, events)
        chunks = [payments[i::2] for i in range(2)]
        spy = record(child, 15, out)
        time.sleep(0.5)
        with multiprocessing.get_context("fork").Pool(2) as pool:
            pool.map(_post_many, [(port, c) for c in chunks])
        spy.wait(timeout=60)
    finally:
        worker.stop()
        web.stop()
    return summarise(out, "run_pipeline_stage", group_by=(*STAGE_FUNCTIONS, *PLUMBING))


def table(profile: Profile, top: int) -> list[str]:
    lines = ["| what the samples were doing | share |", "| --- | ---: |"]
    for activity, n in profile.activities.most_common():
        lines.append(f"| {activity} | {100 * n / profile.total:.0f}% |")
    lines += ["", "| our function (inclusive) | share |", "| --- | ---: |"]
    for key, n in profile.functions.most_common(top):
        lines.append(f"| `{key}` | {100 * n / profile.total:.0f}% |")
    return lines


def stage_table(profile: Profile) -> list[str]:
    lines = [
        "| inside | share of all stage samples | of which PostgreSQL | SQLAlchemy |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name in (*STAGE_FUNCTIONS, *PLUMBING):
        counts = profile.by_group.get(name, collections.Counter())
        n = sum(counts.values())
        if not n:
            continue
        pg = sum(v for k, v in counts.items() if k.startswith("PostgreSQL"))
        sa = counts["SQLAlchemy: compile, ORM, results"]
        lines.append(
            f"| `{name}` | {100 * n / profile.total:.0f}% | {100 * pg / n:.0f}% | "
            f"{100 * sa / n:.0f}% |"
        )
    return lines


def report(
    label: str, receiver: Profile, pipeline: Profile, command: str, commit: str | None = None
) -> list[str]:
    measured = provenance(command)
    if commit is not None:
        measured = re.sub(r"commit \w+", f"commit {commit}", measured)
    return [
        f"<!-- profile-{label}:start -->",
        f"### Profile: {label}",
        "",
        measured,
        f"py-spy at {RATE} samples/s (wall clock: waiting on a socket counts). Receiver: one "
        f"gunicorn worker (4 threads) under 4 closed-loop senders, {receiver.total} samples "
        "inside the view. Pipeline: one Celery process running a burst of card callbacks to "
        f"approval, {pipeline.total} samples inside a stage task.",
        "",
        "**Per request** (`POST /webhooks/ikhokha`)",
        "",
        *table(receiver, 8),
        "",
        "**Per stage** (the six stage tasks together)",
        "",
        *table(pipeline, 10),
        "",
        *stage_table(pipeline),
        f"<!-- profile-{label}:end -->",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--label", default="after", help="the section's name: before or after")
    parser.add_argument("--keep", type=Path, help="keep the raw py-spy stacks in this folder")
    parser.add_argument("--stacks", type=Path, help="summarise the stacks kept in this folder")
    parser.add_argument("--commit", help="with --stacks: the commit they were sampled at")
    args = parser.parse_args()
    if args.stacks is not None:
        receiver = summarise(args.stacks / f"receiver-{args.label}.raw", "ikhokha_callback")
        pipeline = summarise(
            args.stacks / f"pipeline-{args.label}.raw",
            "run_pipeline_stage",
            group_by=(*STAGE_FUNCTIONS, *PLUMBING),
        )
        command = f".venv/bin/python -m bench.profile --label {args.label} (at {args.commit})"
        lines = report(args.label, receiver, pipeline, command, args.commit)
        replace_marked_section(lines[0], lines[-1], lines)
        return
    database = BenchDatabase("skillpay_profile")
    env = dict(
        os.environ,
        APP_ENV="test",
        DATABASE_URL=database.url,
        CELERY_BROKER_URL=REDIS_URL,
        REDIS_URL=REDIS_URL,
        IKHOKHA_APP_ID=APP_ID,
        IKHOKHA_APP_SECRET=SECRET,
        SKILLPAY_CELERY_QUEUE=QUEUE + "-pipeline",
        SKILLPAY_LOG_LEVEL="WARNING",
        SKILLPAY_SWEEP_INTERVAL_SECONDS="3600",
    )
    os.environ.update(env)
    folder = args.keep or Path(tempfile.mkdtemp(prefix="skillpay-profile-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        from models import configure_database, get_engine

        configure_database(database.url)
        engine = get_engine()
        receiver = profile_receiver(env, folder / f"receiver-{args.label}.raw")
        pipeline = profile_pipeline(env, engine, folder / f"pipeline-{args.label}.raw")
        engine.dispose()
    finally:
        database.drop()
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)
    command = f".venv/bin/python -m bench.profile --label {args.label}"
    lines = report(args.label, receiver, pipeline, command)
    replace_marked_section(lines[0], lines[-1], lines)
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
