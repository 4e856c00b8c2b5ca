from __future__ import annotations

import pytest

from config.settings import DEV_APP_SECRET, ConfigError, Settings


def test_development_needs_no_servers(tmp_path, monkeypatch):
    monkeypatch.setenv("SKILLPAY_VAR_DIR", str(tmp_path))
    s = Settings.from_env({})
    assert s.database_url.startswith("sqlite:///")
    assert s.celery_broker_url.startswith("sqla+sqlite:///")
    assert s.ikhokha_api_url == "http://127.0.0.1:8010"
    assert s.problems() == []


def test_urls_from_the_environment_are_used():
    s = Settings.from_env(
        {
            "DATABASE_URL": "postgresql://db/x",
            "CELERY_BROKER_URL": "redis://r/0",
            "PORT": "9000",
            "SKILLPAY_PIPELINE_MAX_RETRIES": "7",
            "IKHOKHA_CONFIRM_WITH_STATUS": "yes",
        }
    )
    assert (s.database_url, s.celery_broker_url, s.port) == (
        "postgresql://db/x",
        "redis://r/0",
        9000,
    )
    assert s.pipeline_max_retries == 7 and s.ikhokha_confirm_with_status
    assert s.public_base_url == "http://127.0.0.1:9000"


def test_production_refuses_unsafe_configuration_and_says_why():
    s = Settings.from_env({"APP_ENV": "production", "IKHOKHA_APP_SECRET": DEV_APP_SECRET})
    problems = s.problems()
    text = " ".join(problems)
    for name in (
        "DATABASE_URL",
        "CELERY_BROKER_URL",
        "IKHOKHA_APP_ID",
        "IKHOKHA_APP_SECRET",
        "PUBLIC_BASE_URL",
    ):
        assert name in text
    with pytest.raises(ConfigError) as info:
        s.check()
    assert "refusing to start" in str(info.value)
    # The secret's value never appears in the explanation.
    assert DEV_APP_SECRET not in str(info.value)


def test_production_with_safe_configuration_starts():
    s = Settings.from_env(
        {
            "APP_ENV": "production",
            "DATABASE_URL": "postgresql://db/x",
            "CELERY_BROKER_URL": "redis://r/0",
            "IKHOKHA_APP_ID": "real-id",
            "IKHOKHA_APP_SECRET": "a-real-secret-from-the-dashboard",
            "PUBLIC_BASE_URL": "https://pay.example.com",
        }
    )
    assert s.problems() == []
    assert s.ikhokha_confirm_with_status  # on by default in production
    assert "a-real-secret" not in repr(s)


def test_bad_values_are_clear_errors():
    with pytest.raises(ConfigError, match="APP_ENV"):
        Settings.from_env({"APP_ENV": "staging"})
    with pytest.raises(ConfigError, match="SKILLPAY_PIPELINE_MAX_RETRIES"):
        Settings.from_env({"SKILLPAY_PIPELINE_MAX_RETRIES": "many"})


def test_webhook_path_follows_public_base_url_prefix():
    s = Settings(public_base_url="https://example.com/skillpay")
    assert s.webhook_path == "/skillpay/webhooks/ikhokha"
