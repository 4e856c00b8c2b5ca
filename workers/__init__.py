"""Celery: the app, the six pipeline tasks, and the scheduled jobs."""
