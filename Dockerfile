FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY requirements/runtime.lock requirements/runtime.lock
# Pinned and hash-checked; the project itself adds nothing the lock does not have.
RUN pip install --no-cache-dir --require-hashes -r requirements/runtime.lock
COPY web web
COPY workers workers
COPY pipeline pipeline
COPY models models
COPY config config
COPY cli cli
COPY migrations migrations
COPY simulator simulator
RUN pip install --no-cache-dir --no-deps .
USER nobody
EXPOSE 8000 8001
HEALTHCHECK --interval=10s --timeout=4s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=3)"
# The web process; the Procfile (and docker-compose.yml) name the others.
CMD ["gunicorn", "web.wsgi:app", "-c", "python:web.gunicorn_conf", "--bind", "0.0.0.0:8000", "--access-logfile", "-"]
