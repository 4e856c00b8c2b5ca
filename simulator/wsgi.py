"""`gunicorn simulator.wsgi:app`: the local iKhokha."""

from simulator.app import create_app

app = create_app()
