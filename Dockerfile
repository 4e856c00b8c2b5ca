FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY web web
COPY workers workers
COPY pipeline pipeline
COPY models models
COPY config config
COPY migrations migrations
COPY simulator simulator
RUN pip install --no-cache-dir .
USER nobody
