from __future__ import annotations

import pytest

from config.settings import DEV_APP_SECRET, ConfigError, Settings


def test_development_needs_no_servers(tmp_path, monkeypatch):
    monkeypatch.setenv("SKILLPAY_VAR_DIR", str(tmp_path))
    s = Settings.from_env({"APP_ENV": "development"})
    assert s.database_url.startswith("sqlite:///")
    assert s.celery_broker_url.startswith("sqla+sqlite:///")
    assert s.ikhokha_api_url == "http://127.0.0.1:8010"
    assert s.problems() == []


def test_urls_from_the_environment_are_used():
    s = Settings.from_env(
        {
            "APP_ENV": "test",
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
            "FLOWER_BASIC_AUTH": "ops:a-long-password",
        }
    )
    assert s.problems() == []
    assert s.ikhokha_confirm_with_status  # on by default in production
    assert "a-real-secret" not in repr(s)


def test_bad_values_are_clear_errors():
    with pytest.raises(ConfigError, match="APP_ENV"):
        Settings.from_env({"APP_ENV": "staging"})
    with pytest.raises(ConfigError, match="SKILLPAY_PIPELINE_MAX_RETRIES"):
        Settings.from_env({"APP_ENV": "test", "SKILLPAY_PIPELINE_MAX_RETRIES": "many"})


@pytest.mark.parametrize("value", [None, "", "  "])
def test_a_deployment_that_forgets_app_env_refuses_to_start(value):
    """Unset, APP_ENV used to mean development: the placeholder secret, no status check,
    no production checks. Anyone could then sign a SUCCESS for their own enrollment."""
    env = {"IKHOKHA_APP_SECRET": DEV_APP_SECRET} | ({} if value is None else {"APP_ENV": value})
    with pytest.raises(ConfigError, match="APP_ENV is not set"):
        Settings.from_env(env)


SAFE_PRODUCTION = {
    "APP_ENV": "production",
    "DATABASE_URL": "postgresql://db/x",
    "CELERY_BROKER_URL": "redis://r/0",
    "IKHOKHA_APP_ID": "real-id",
    "IKHOKHA_APP_SECRET": "a-real-secret-from-the-dashboard",
    "PUBLIC_BASE_URL": "https://pay.example.com",
    "FLOWER_BASIC_AUTH": "ops:a-long-password",
}


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"IKHOKHA_MODE": "test"}, "IKHOKHA_MODE"),
        ({"FLOWER_BASIC_AUTH": ""}, "FLOWER_BASIC_AUTH"),
        ({"IKHOKHA_GATEWAY": "memory"}, "IKHOKHA_GATEWAY"),
        ({"IKHOKHA_CONFIRM_WITH_STATUS": "off"}, "IKHOKHA_CONFIRM_WITH_STATUS"),
    ],
)
def test_production_refuses_test_modes_and_an_open_flower(change, named):
    assert Settings.from_env(SAFE_PRODUCTION).problems() == []
    problems = Settings.from_env(SAFE_PRODUCTION | change).problems()
    assert len(problems) == 1 and named in problems[0]


def test_flower_provider_counts_as_authentication_and_secrets_stay_out_of_repr():
    s = Settings.from_env(
        SAFE_PRODUCTION
        | {"FLOWER_BASIC_AUTH": "", "FLOWER_AUTH_PROVIDER": "flower.views.auth.GithubLoginHandler"}
    )
    assert s.problems() == []
    with_token = Settings.from_env(SAFE_PRODUCTION | {"SKILLPAY_METRICS_TOKEN": "m-token"})
    assert "a-long-password" not in repr(with_token) and "m-token" not in repr(with_token)


def test_webhook_path_follows_public_base_url_prefix():
    s = Settings(public_base_url="https://example.com/skillpay")
    assert s.webhook_path == "/skillpay/webhooks/ikhokha"


def test_the_placeholder_secret_stays_on_loopback_outside_explicit_development():
    public = {"APP_ENV": "test", "PUBLIC_BASE_URL": "https://pay.example.com"}
    assert "loopback" in " ".join(Settings.from_env(public).problems())
    assert Settings.from_env(public | {"IKHOKHA_APP_SECRET": "own-secret"}).problems() == []
    assert Settings.from_env({"APP_ENV": "test"}).problems() == []  # 127.0.0.1
    assert Settings.from_env(public | {"APP_ENV": "development"}).problems() == []


RABBIT = "amqp://guest:guest@127.0.0.1:5672//"


@pytest.mark.parametrize(
    ("broker", "change", "named"),
    [
        ("redis://r:6379/0", {"broker_visibility_timeout": 100}, "VISIBILITY_TIMEOUT"),
        (RABBIT, {"broker_consumer_timeout": 500}, "CONSUMER_TIMEOUT"),
        (RABBIT, {"task_time_limit_seconds": 1000}, "CONSUMER_TIMEOUT"),
        (RABBIT, {"broker_delivery_limit": 6}, "DELIVERY_LIMIT"),
        (RABBIT, {"pipeline_max_redeliveries": 0}, "MAX_REDELIVERIES"),
    ],
)
def test_broker_settings_that_would_hand_a_held_message_to_a_second_worker_are_refused(
    broker, change, named
):
    assert Settings(celery_broker_url=broker).broker_problems() == []
    problems = Settings(celery_broker_url=broker, **change).broker_problems()
    assert len(problems) == 1 and named in problems[0]


def test_rabbitmq_gets_a_quorum_queue_with_a_delivery_limit_and_publisher_confirms():
    from workers.celery_app import task_queue, transport_options

    rabbit = Settings(celery_broker_url=RABBIT, celery_queue="q", broker_delivery_limit=9)
    queue = task_queue(rabbit)
    assert queue.durable and queue.exchange.type == "topic"  # native delayed delivery
    assert queue.queue_arguments == {"x-queue-type": "quorum", "x-delivery-limit": 9}
    assert transport_options(rabbit) == {"confirm_publish": True}
    classic = Settings(celery_broker_url=RABBIT, broker_quorum_queues=False)
    assert not task_queue(classic).queue_arguments
    redis = Settings(celery_broker_url="redis://r:6379/0")
    assert not task_queue(redis).queue_arguments
    assert task_queue(redis).exchange.type == "direct"  # published straight to the queue
    assert transport_options(redis)["visibility_timeout"] == redis.broker_visibility_timeout
    assert Settings(celery_broker_url="sqla+sqlite:///x.db").broker_kind == "embedded"
