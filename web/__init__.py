"""The Flask app: the webhook receiver, the JSON API, pages, health and metrics."""

from web.app import create_app

__all__ = ["create_app"]
