"""gunicorn's entry point: `gunicorn web.wsgi:app`."""

from config import get_settings
from web.app import create_app

app = create_app(get_settings())
