"""The worker's entry module: `celery -A workers.app worker` and `celery -A workers.app beat`."""

from config import get_settings
from workers.celery_app import make_celery

celery = make_celery(get_settings())
app = celery
