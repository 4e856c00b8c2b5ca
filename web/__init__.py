"""The Flask app (web.app.create_app): the webhook receiver, the JSON API, pages, health and
metrics. This package imports nothing itself: gunicorn loads web.gunicorn_conf before the app,
and it must set PROMETHEUS_MULTIPROC_DIR before prometheus_client is first imported."""
