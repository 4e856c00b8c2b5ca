"""The `skillpay` command.

What it creates goes to stdout alone (a token, an id); messages go to stderr.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from typing import TYPE_CHECKING, NoReturn

import click
from sqlalchemy import select

from config import ConfigError, Settings, get_settings
from config.logging import configure_logging
from models import configure_database

if TYPE_CHECKING:
    from workers.celery_app import SkillpayCelery


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def _celery(settings: Settings) -> SkillpayCelery:
    """A Celery app made from the same settings: the workers' queue and the gateway."""
    from workers.celery_app import make_celery

    return make_celery(settings)


pass_settings = click.make_pass_decorator(Settings)


@click.group()
@click.pass_context
def main(ctx: click.Context) -> None:
    """Skillpay: iKhokha payments to course enrollments."""
    try:
        settings = get_settings()
    except ConfigError as exc:
        _fail(str(exc))
    configure_logging(settings)
    configure_database(settings.database_url, settings.db_lock_timeout_ms)
    ctx.obj = settings


@main.command("validate-config")
@click.option(
    "--broker", "check_broker", is_flag=True, help="Also connect to the broker and check its queue."
)
@pass_settings
def validate_config(settings: Settings, check_broker: bool) -> None:
    """Check the configuration; exit 1 and say why if it is unsafe."""
    problems = settings.problems()
    if check_broker:
        from workers.celery_app import broker_report

        facts, broker_problems = broker_report(settings)
        for fact in facts:
            click.echo(fact, err=True)
        problems += broker_problems
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
@pass_settings
def db_upgrade(settings: Settings, revision: str) -> None:
    """Apply the migrations up to REVISION (default: the latest)."""
    from migrations import upgrade

    upgrade(settings.database_url, revision)
    click.echo("database schema is up to date", err=True)


@main.group()
def users() -> None:
    """Students and admins."""


def _expiry(text: str) -> timedelta | None:
    from pipeline.accounts import parse_duration
    from pipeline.errors import SkillpayError

    try:
        return parse_duration(text)
    except SkillpayError as exc:
        _fail(exc.message)


expires_in_option = click.option(
    "--expires-in",
    default="30d",
    show_default=True,
    help="How long the token is valid: 30d, 12h, 90m, or never.",
)


@users.command("create")
@click.option("--email", required=True)
@click.option(
    "--role", type=click.Choice(["student", "admin"]), default="student", show_default=True
)
@expires_in_option
def users_create(email: str, role: str, expires_in: str) -> None:
    """Create a user and print their new API token."""
    from models import session_scope
    from pipeline.accounts import create_user, issue_token
    from pipeline.errors import SkillpayError

    lifetime = _expiry(expires_in)
    try:
        with session_scope() as session:
            token = issue_token(session, create_user(session, email, role), lifetime)
    except SkillpayError as exc:
        _fail(exc.message)
    click.echo(token)


@users.command("token")
@click.option("--email", required=True)
@expires_in_option
def users_token(email: str, expires_in: str) -> None:
    """Issue another token for an existing user and print it."""
    from models import session_scope
    from pipeline.accounts import find_user, issue_token

    lifetime = _expiry(expires_in)
    with session_scope() as session:
        user = find_user(session, email)
        if user is None:
            _fail(f"no user with email {email}")
        token = issue_token(session, user, lifetime)
    click.echo(token)


@users.command("revoke-token")
@click.option("--email", required=True)
@click.option(
    "--token-stdin",
    is_flag=True,
    help="Revoke only the token read from standard input (default: all of the user's).",
)
def users_revoke(email: str, token_stdin: bool) -> None:
    """Revoke a user's tokens. The token to revoke is read from standard input, so that it
    never appears in a command line, a process list or a shell history."""
    from models import session_scope
    from pipeline.accounts import revoke_tokens
    from pipeline.errors import SkillpayError

    token = None
    if token_stdin:
        token = click.get_text_stream("stdin").readline().strip()
        if not token:
            _fail("--token-stdin: no token on standard input")
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


def _not_in_production(settings: Settings, what: str) -> None:
    if settings.production:
        _fail(f"{what} is for development and tests; it refuses to run in production")


@main.command("demo")
@pass_settings
def demo(settings: Settings) -> None:
    """Seed demo courses, a student and an admin; print their tokens as JSON."""
    from models import Course, User, session_scope
    from pipeline.accounts import create_user, issue_token

    _not_in_production(settings, "skillpay demo")

    with session_scope() as session:
        for title, price in DEMO_COURSES:
            if session.scalar(select(Course.id).where(Course.title == title)) is None:
                session.add(Course(title=title, price_cents=price, currency="ZAR"))
        tokens = {}
        for email, role in (("student@example.com", "student"), ("admin@example.com", "admin")):
            user = session.scalar(select(User).where(User.email == email)) or create_user(
                session, email, role
            )
            tokens[role] = issue_token(session, user, timedelta(days=7))
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
    from pipeline.dead_letters import list_dead_letters

    with session_scope() as session:
        letters = list_dead_letters(session, include_replayed=show_all)
        click.echo(
            f"{'id':>6} {'event':>7} {'stage':<24} {'status':<8} {'replays':>7}  error", err=True
        )
        for letter in letters:
            click.echo(
                f"{letter.id:>6} {letter.event_id:>7} {letter.stage:<24} "
                f"{letter.event.callback_status or '':<8} "
                f"{letter.replay_count:>7}  {letter.error_code}: {letter.error[:120]}"
            )


@dlq.command("replay")
@click.argument("letter_id", type=int)
@click.option(
    "--from-stage", default=None, help="Start again from this stage (default: the failed one)."
)
@pass_settings
def dlq_replay(settings: Settings, letter_id: int, from_stage: str | None) -> None:
    """Send a dead event back into the pipeline."""
    from models import session_scope
    from pipeline.dead_letters import replay_dead_letter
    from pipeline.errors import SkillpayError

    queue = _celery(settings).queue
    try:
        with session_scope() as session:
            letter = replay_dead_letter(session, letter_id, queue.stage, from_stage)
            event_id, stage = letter.event_id, from_stage or letter.stage
    except SkillpayError as exc:
        _fail(exc.message)
    click.echo(f"event {event_id} re-enqueued from {stage}", err=True)


@main.command("reconcile")
@click.option("--older-than-minutes", type=click.IntRange(min=0), default=5, show_default=True)
@pass_settings
def reconcile_cmd(settings: Settings, older_than_minutes: int) -> None:
    """Reconcile with iKhokha both ways and print the report: payments iKhokha reports paid
    that no callback brought (fed to the pipeline), approvals iKhokha does not confirm
    (flagged for an admin, never revoked), amount mismatches, and errors. Exit 1 on errors."""
    from models import session_scope
    from pipeline.reconcile import KINDS, reconcile

    celery = _celery(settings)
    with session_scope() as session:
        report = reconcile(
            session,
            settings,
            celery.gateway,
            celery.queue.stage,
            older_than=timedelta(minutes=older_than_minutes),
            trigger="cli",
        )
        lines = [(f.kind, f.detail) for f in report.findings]
    click.echo(f"reconciliation run {report.run_id}: checked {report.checked} payment(s)")
    for kind, label in KINDS.items():
        click.echo(f"  {label}: {report.count(kind)}")
        for found_kind, detail in lines:
            if found_kind == kind:
                click.echo(f"    {detail}")
    if report.errors:
        sys.exit(1)


def _admin(email: str | None):
    """The admin a command acts as, recorded as who did it: --admin, or the only admin."""
    from models import Role, User, session_scope
    from pipeline.accounts import find_user

    with session_scope() as session:
        if email:
            admin = find_user(session, email)
            if admin is None or not admin.is_admin:
                _fail(f"{email} is not an admin")
        else:
            admins = session.scalars(select(User).where(User.role == Role.ADMIN).limit(2)).all()
            if len(admins) != 1:
                _fail("name the admin this is done as: --admin EMAIL (recorded as who did it)")
            admin = admins[0]
        session.expunge(admin)
    return admin


admin_option = click.option(
    "--admin",
    "admin_email",
    default=None,
    help="The admin's e-mail, recorded as who did it (may be left out when there is one admin).",
)


@main.command("refund")
@click.argument("enrollment_id", type=click.IntRange(min=1))
@click.option("--reason", required=True, help="Why; the student sees it.")
@click.option(
    "--amount-cents",
    type=click.IntRange(min=1),
    default=None,
    help="A partial refund, which keeps access (default: all that is left, which ends it).",
)
@click.option("--idempotency-key", default=None, help="Run again with the same key: one refund.")
@admin_option
@pass_settings
def refund_cmd(
    settings: Settings,
    enrollment_id: int,
    reason: str,
    amount_cents: int | None,
    idempotency_key: str | None,
    admin_email: str | None,
) -> None:
    """Refund an approved enrollment (SKILLPAY_REFUND_MODE says how: record one made in
    iKhokha's dashboard, or ask the gateway). Prints the refund's id."""
    from models import session_scope
    from pipeline.errors import SkillpayError
    from pipeline.refunds import refund_enrollment

    admin = _admin(admin_email)
    gateway = _celery(settings).gateway
    try:
        with session_scope() as session:
            result = refund_enrollment(
                session,
                settings,
                gateway,
                enrollment_id,
                admin,
                reason=reason,
                amount_cents=amount_cents,
                idempotency_key=idempotency_key,
            )
            refund = result.refund
            summary = (
                f"{'refunded' if result.created else 'already refunded'}: "
                f"{refund.amount_cents} cents of enrollment {enrollment_id} "
                f"({'full: access ended' if refund.is_full else 'partial: access kept'}; "
                f"{refund.mode}, {refund.state})"
            )
            refund_id = refund.id
    except SkillpayError as exc:
        _fail(exc.message)
    click.echo(summary, err=True)
    click.echo(refund_id)


@main.group()
def statements() -> None:
    """Bank statements: import one, see what it matches, confirm the exact matches."""


@statements.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["csv", "ofx"]), default=None)
@click.option(
    "--approve-exact",
    is_flag=True,
    help="Also approve the exact matches (reference and amount) as one bulk job.",
)
@admin_option
@pass_settings
def statements_import(
    settings: Settings, file: str, fmt: str | None, approve_exact: bool, admin_email: str | None
) -> None:
    """Import a statement (CSV or OFX) and print each line's proposed match; without
    --approve-exact it only reports."""
    from pathlib import Path

    from models import session_scope
    from pipeline.errors import SkillpayError
    from pipeline.payments import rand
    from pipeline.statements import import_statement

    admin = _admin(admin_email)
    path = Path(file)
    try:
        with session_scope() as session:
            imported = import_statement(session, settings, admin, path.read_bytes(), path.name, fmt)
            statement = imported.statement
            rows = [
                (
                    line.line_no,
                    line.booked_on.isoformat(),
                    rand(line.amount_cents),
                    line.match,
                    line.enrollment_id or "",
                    line.reason,
                )
                for line in imported.lines
            ]
            head = (
                f"statement {statement.id}: {statement.line_count} line(s), "
                f"{statement.already_imported} imported before"
                if imported.created
                else f"statement {statement.id} was imported before: nothing imported again"
            )
            statement_id = statement.id
    except SkillpayError as exc:
        _fail(exc.message)
    click.echo(head, err=True)
    click.echo(
        f"{'line':>5} {'date':<10} {'amount':>14} {'match':<15} {'enr':>6}  reason", err=True
    )
    for n, day, amount, match, enrollment, reason in rows:
        click.echo(f"{n:>5} {day:<10} {amount:>14} {match:<15} {enrollment!s:>6}  {reason}")
    exact = sum(1 for row in rows if row[3] == "exact")
    if approve_exact:
        _approve_exact(settings, statement_id, admin)
    elif exact:
        click.echo(
            f"{exact} exact match(es): skillpay statements approve-exact {statement_id}", err=True
        )


@statements.command("approve-exact")
@click.argument("statement_id", type=click.IntRange(min=1))
@admin_option
@pass_settings
def statements_approve_exact(
    settings: Settings, statement_id: int, admin_email: str | None
) -> None:
    """Approve an imported statement's exact matches in one bulk job; print the job's id."""
    _approve_exact(settings, statement_id, _admin(admin_email))


def _approve_exact(settings: Settings, statement_id: int, admin) -> None:
    from models import session_scope
    from pipeline.errors import SkillpayError
    from pipeline.statements import confirm_matches

    queue = _celery(settings).queue
    try:
        with session_scope() as session:
            confirmed = confirm_matches(session, statement_id, admin, queue.bulk_job)
            job_id = confirmed.job.id if confirmed.job else None
    except SkillpayError as exc:
        _fail(exc.message)
    if job_id is None:
        click.echo("nothing left to confirm", err=True)
        return
    click.echo(
        f"{len(confirmed.line_ids)} line(s) confirmed; a worker approves them "
        f"(GET /api/admin/jobs/{job_id})",
        err=True,
    )
    click.echo(job_id)


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
@pass_settings
def send_callback(settings: Settings, payment_id: str, status: str, url: str | None) -> None:
    """Send a callback signed as iKhokha would, for trying the pipeline by hand."""
    import requests

    from models import Payment, session_scope
    from pipeline.callbacks import callback_body
    from pipeline.signing import signed_callback

    _not_in_production(settings, "skillpay callback")

    with session_scope() as session:
        payment = session.get(Payment, payment_id)
        paylink_id = payment.paylink_id if payment else None
    body, headers = signed_callback(
        callback_body(paylink_id=paylink_id, external_transaction_id=payment_id, status=status),
        path=settings.webhook_path,
        app_id=settings.ikhokha_app_id,
        secret=settings.ikhokha_app_secret,
    )
    target = url or settings.url_for_public("/webhooks/ikhokha")
    response = requests.post(target, data=body, timeout=10, headers=headers)
    click.echo(f"{response.status_code} {response.text.strip()}", err=True)
    sys.exit(0 if response.ok else 1)


if __name__ == "__main__":
    main()
