"""The `skillpay` command as a script uses it: a real process, the embedded SQLite default."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SKILLPAY = str(Path(sys.executable).parent / "skillpay")


def run(args, tmp_path, **env):
    full = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CELERY_BROKER_URL")}
    full.update({"SKILLPAY_VAR_DIR": str(tmp_path), "APP_ENV": "development"}, **env)
    return subprocess.run([SKILLPAY, *args], env=full, capture_output=True, text=True, timeout=60)


def test_commands_print_only_what_they_create(tmp_path):
    assert run(["db", "upgrade"], tmp_path).returncode == 0
    course = run(["courses", "create", "--title", "Algebra", "--price-cents", "1000"], tmp_path)
    assert course.returncode == 0 and course.stdout.strip() == "1"
    user = run(["users", "create", "--email", "a@example.com", "--role", "admin"], tmp_path)
    assert user.returncode == 0
    assert user.stdout.strip().startswith("sp_") and len(user.stdout.split()) == 1
    again = run(["users", "create", "--email", "a@example.com"], tmp_path)
    assert again.returncode == 1 and "exists" in again.stderr and again.stdout == ""
    demo = run(["demo"], tmp_path)
    tokens = json.loads(demo.stdout)
    assert set(tokens) == {"student_token", "admin_token"}
    revoke = run(["users", "revoke-token", "--email", "a@example.com"], tmp_path)
    assert revoke.returncode == 0 and "revoked 1" in revoke.stderr
    listing = run(["dlq", "list"], tmp_path)
    assert listing.returncode == 0 and listing.stdout == ""
    missing = run(["dlq", "replay", "42"], tmp_path)
    assert missing.returncode == 1 and "does not exist" in missing.stderr


def test_validate_config_explains_an_unsafe_production_configuration(tmp_path):
    result = run(["validate-config"], tmp_path, APP_ENV="production")
    assert result.returncode == 1
    assert "IKHOKHA_APP_SECRET" in result.stderr and "PUBLIC_BASE_URL" in result.stderr
    assert run(["validate-config"], tmp_path).returncode == 0


def test_the_web_app_refuses_to_start_on_an_unsafe_production_configuration(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IKHOKHA_", "DATABASE_URL"))}
    env.update(APP_ENV="production", SKILLPAY_VAR_DIR=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "-c", "import web.wsgi"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "refusing to start (production)" in result.stderr


def test_demo_and_callback_refuse_to_run_in_production(tmp_path):
    env = {
        "APP_ENV": "production",
        "DATABASE_URL": "postgresql://nobody@127.0.0.1:9/none",
        "IKHOKHA_APP_SECRET": "a-real-secret",
    }
    demo = run(["demo"], tmp_path, **env)
    assert demo.returncode == 1 and "refuses to run in production" in demo.stderr
    callback = run(["callback", "--payment-id", "x"], tmp_path, **env)
    assert callback.returncode == 1 and "refuses to run in production" in callback.stderr
    assert demo.stdout == callback.stdout == ""


def test_tokens_expire_and_are_revoked_from_standard_input(tmp_path):
    assert run(["db", "upgrade"], tmp_path).returncode == 0
    first = run(["users", "create", "--email", "b@example.com"], tmp_path).stdout.strip()
    second = run(["users", "token", "--email", "b@example.com", "--expires-in", "12h"], tmp_path)
    assert second.returncode == 0 and second.stdout.startswith("sp_")
    bad = run(["users", "token", "--email", "b@example.com", "--expires-in", "soon"], tmp_path)
    assert bad.returncode == 1 and "not a duration" in bad.stderr
    full = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CELERY_BROKER_URL")}
    full.update(SKILLPAY_VAR_DIR=str(tmp_path), APP_ENV="development")
    revoke = subprocess.run(
        [SKILLPAY, "users", "revoke-token", "--email", "b@example.com", "--token-stdin"],
        input=first + "\n",
        env=full,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert revoke.returncode == 0 and "revoked 1" in revoke.stderr
    assert first not in revoke.stderr + revoke.stdout


def test_statements_and_refunds_from_the_command_line(tmp_path):
    assert run(["db", "upgrade"], tmp_path).returncode == 0
    assert run(["users", "create", "--email", "boss@example.com", "--role", "admin"], tmp_path)
    statement = tmp_path / "nov.csv"
    statement.write_text("Date,Description,Amount\n2026-11-20,SOMEONE,499.00\n20/11/2026,FEE,-5\n")
    first = run(["statements", "import", str(statement)], tmp_path)  # the only admin acts
    assert first.returncode == 0, first.stderr
    assert "statement 1: 2 line(s), 0 imported before" in first.stderr
    assert "unmatched" in first.stdout and "no EFT enrollment waits for R 499.00" in first.stdout
    assert "ignored" in first.stdout
    again = run(["statements", "import", str(statement), "--approve-exact"], tmp_path)
    assert again.returncode == 0 and "imported before: nothing imported again" in again.stderr
    assert "nothing left to confirm" in again.stderr
    statement.write_text("Date,Description,Amount\n2026-11-20,SOMEONE,4,99\n")
    bad = run(["statements", "import", str(statement)], tmp_path)
    assert bad.returncode == 1 and "line 2: 4 columns where the header has 3" in bad.stderr
    missing = run(["refund", "7", "--reason", "asked"], tmp_path)
    assert missing.returncode == 1 and "enrollment 7 does not exist" in missing.stderr
    assert run(["users", "create", "--email", "two@example.com", "--role", "admin"], tmp_path)
    who = run(["refund", "7", "--reason", "asked"], tmp_path)
    assert who.returncode == 1 and "--admin EMAIL" in who.stderr
