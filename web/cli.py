"""The `skillpay` command.

What it creates goes to stdout alone (a token, an id); messages go to stderr.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta

import click
from sqlalchemy import select

from config import ConfigError, get_settings


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


@click.group()
def main() -> None:
    """Skillpay: iKhokha payments to course enrollments."""
    from config.logging import configure_logging

    try:
        configure_logging(get_settings())
    except ConfigError as exc:
        _fail(str(exc))


@main.command("validate-config")
def validate_config() -> None:
    """Check the configuration; exit 1 and say why if it is unsafe."""
    settings = get_settings()
    problems = settings.problems()
    for problem in problems:
        click.echo(f"problem: {problem}", err=True)
    if problems:
        sys.exit(1)
    click.echo(f"configuration ok for {settings.app_env}", err=True)


@main.group()
def db() -> None:
    """The database schema."""


@db.command("upgrade")
@click.option("--revision", default="head")
def db_upgrade(revision: str) -> None:
    """Apply the migrations up to REVISION (default: the latest)."""
    from migrations import upgrade

    upgrade(get_settings().database_url, revision)
    click.echo("database schema is up to date", err=True)


@main.group()
def users() -> None:
    """Students and admins."""


@users.command("create")
@click.option("--email", required=True)
@click.option(
    "--role", type=click.Choice(["student", "admin"]), default="student", show_default=True
)
def users_create(email: str, role: str) -> None:
    """Create a user and print their new API token."""
    from models import session_scope
    from pipeline.accounts import create_user, issue_token
    from pipeline.errors import SkillpayError

    try:
        with session_scope() as session:
            token = issue_token(session, create_user(session, email, role))
    except SkillpayError as exc:
        _fail(exc.message)
    click.echo(token)


@users.command("token")
@click.option("--email", required=True)
def users_token(email: str) -> None:
    """Issue another token for an existing user and print it."""
    from models import User, session_scope
    from pipeline.accounts import issue_token

    with session_scope() as session:
        user = session.scalar(select(User).where(User.email == email.strip().lower()))
        if user is None:
            _fail(f"no user with email {email}")
        token = issue_token(session, user)
    click.echo(token)


@users.command("revoke-token")
@click.option("--email", required=True)
@click.option("--token", default=None, help="Revoke only this token (default: all of the user's).")
def users_revoke(email: str, token: str | None) -> None:
    """Revoke a user's tokens."""
    from models import session_scope
    from pipeline.accounts import revoke_tokens
    from pipeline.errors import SkillpayError

    try:
        with session_scope() as session:
            count = revoke_tokens(session, email, token)
    except SkillpayError as exc:
        _fail(exc.message)
    click.echo(f"revoked {count} token(s)", err=True)


@main.group()
def courses() -> None:
    """Courses."""


@courses.command("create")
@click.option("--title", required=True)
@click.option("--price-cents", type=click.IntRange(min=1), required=True)
def courses_create(title: str, price_cents: int) -> None:
    """Create a course and print its id."""
    from models import Course, session_scope

    with session_scope() as session:
        course = Course(title=title.strip()[:200], price_cents=price_cents, currency="ZAR")
        session.add(course)
        session.flush()
        course_id = course.id
    click.echo(course_id)


DEMO_COURSES = [
    ("Python for Data Analysis", 149900),
    ("Web Development Bootcamp", 249900),
    ("Introduction to Machine Learning", 99900),
]


@main.command("demo")
def demo() -> None:
    """Seed demo courses, a student and an admin; print their tokens as JSON."""
    from models import Course, User, session_scope
    from pipeline.accounts import create_user, issue_token

    with session_scope() as session:
        for title, price in DEMO_COURSES:
            if session.scalar(select(Course.id).where(Course.title == title)) is None:
                session.add(Course(title=title, price_cents=price, currency="ZAR"))
        tokens = {}
        for email, role in (("student@example.com", "student"), ("admin@example.com", "admin")):
            user = session.scalar(select(User).where(User.email == email)) or create_user(
                session, email, role
            )
            tokens[role] = issue_token(session, user)
    click.echo(json.dumps({"student_token": tokens["student"], "admin_token": tokens["admin"]}))
    click.echo("demo data ready: 3 courses, student@example.com, admin@example.com", err=True)


@main.group()
def dlq() -> None:
    """Dead letters: events the pipeline could not complete."""


@dlq.command("list")
@click.option("--all", "show_all", is_flag=True, help="Include dead letters already replayed.")
def dlq_list(show_all: bool) -> None:
    """List dead letters, newest first."""
    from models import session_scope
    from pipeline.runner import dead_letters

    with session_scope() as session:
        rows = dead_letters(session, include_replayed=show_all)
        click.echo(
            f"{'id':>6} {'event':>7} {'stage':<24} {'status':<8} {'replays':>7}  error", err=True
        )
        for letter, event in rows:
            click.echo(
                f"{letter.id:>6} {event.id:>7} {letter.stage:<24} {event.callback_status or '':<8} "
                f"{letter.replay_count:>7}  {letter.error_code}: {letter.error[:120]}"
            )


@dlq.command("replay")
@click.argument("letter_id", type=int)
@click.option(
    "--from-stage", default=None, help="Start again from this stage (default: the failed one)."
)
def dlq_replay(letter_id: int, from_stage: str | None) -> None:
    """Send a dead event back into the pipeline."""
    from models import session_scope
    from pipeline.errors import SkillpayError
    from pipeline.runner import replay
    from workers.tasks import enqueue_pipeline

    try:
        with session_scope() as session:
            letter = replay(session, letter_id, enqueue_pipeline, from_stage)
            event_id, stage = letter.event_id, from_stage or letter.stage
    except SkillpayError as exc:
        _fail(exc.message)
    click.echo(f"event {event_id} re-enqueued from {stage}", err=True)


@main.command("reconcile")
@click.option("--older-than-minutes", type=click.IntRange(min=0), default=5, show_default=True)
def reconcile_cmd(older_than_minutes: int) -> None:
    """Ask iKhokha about card payments still waiting, and feed final answers to the pipeline."""
    from models import session_scope
    from pipeline.ikhokha import get_gateway
    from pipeline.reconcile import reconcile
    from workers.tasks import enqueue_pipeline

    settings = get_settings()
    with session_scope() as session:
        report = reconcile(
            session,
            settings,
            get_gateway(settings),
            enqueue_pipeline,
            older_than=timedelta(minutes=older_than_minutes),
        )
    click.echo(
        f"checked {report.checked}, fed {len(report.fed)} to the pipeline, "
        f"unchanged {report.unchanged}, errors {len(report.errors)}",
        err=True,
    )
    for error in report.errors:
        click.echo(f"  {error}", err=True)
    if report.errors:
        sys.exit(1)


@main.command("callback")
@click.option(
    "--payment-id", required=True, help="Our payment id (iKhokha's externalTransactionID)."
)
@click.option(
    "--status", type=click.Choice(["SUCCESS", "FAILURE"]), default="SUCCESS", show_default=True
)
@click.option(
    "--url", default=None, help="Receiver URL (default: PUBLIC_BASE_URL/webhooks/ikhokha)."
)
def send_callback(payment_id: str, status: str, url: str | None) -> None:
    """Send a callback signed as iKhokha would, for trying the pipeline by hand."""
    import requests

    from models import Payment, session_scope
    from pipeline.signing import compact_json, sign

    settings = get_settings()
    with session_scope() as session:
        payment = session.get(Payment, payment_id)
        paylink_id = payment.paylink_id if payment else None
    body = compact_json(
        {
            "paylinkID": paylink_id or "",
            "status": status,
            "externalTransactionID": payment_id,
            "responseCode": "00" if status == "SUCCESS" else "05",
        }
    )
    target = url or settings.url_for_public("/webhooks/ikhokha")
    response = requests.post(
        target,
        data=body,
        timeout=10,
        headers={
            "Content-Type": "application/json",
            "ik-appid": settings.ikhokha_app_id,
            "ik-sign": sign(settings.ikhokha_app_secret, settings.webhook_path, body),
        },
    )
    click.echo(f"{response.status_code} {response.text.strip()}", err=True)
    sys.exit(0 if response.ok else 1)


if __name__ == "__main__":
    main()
