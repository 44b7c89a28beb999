# One image for every Mailroom process; the command picks the role:
#   API (default)  gunicorn --bind 0.0.0.0:8000 ... 'mailroom.app:create_app()'
#   worker         celery -A tasks.celery_app worker -Q sync --hostname sync@%h
#   Beat           celery -A tasks.celery_app beat --schedule /tmp/celerybeat-schedule
#   Flower         celery -A tasks.celery_app flower --port=5555
#   migrations     mailroom db upgrade
# Configuration comes from MAILROOM_* variables (see .env.example). deploy/ and
# docker-compose.test.yml show each role's command.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# The web page is built with Node in its own stage; the final image has its files, no Node.
ARG NODE_IMAGE=node:20-bookworm-slim

# --- web: build the page (web/) into static files ---------------------------------------------
FROM ${NODE_IMAGE} AS web
WORKDIR /web
# Dependencies first: this layer is rebuilt only when the lock file changes.
COPY web/package.json web/package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY web/index.html web/tsconfig.json web/vite.config.ts ./
COPY web/src ./src
RUN npm run build

# --- builder: resolve and install everything into a venv ------------------------------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/mailroom
WORKDIR /src
# Dependencies first: this layer is rebuilt only when requirements.txt changes.
COPY requirements.txt ./
RUN /opt/mailroom/bin/pip install -r requirements.txt
COPY pyproject.toml README.md ./
COPY src ./src
COPY services ./services
COPY tasks ./tasks
RUN /opt/mailroom/bin/pip install --no-deps . \
    && /opt/mailroom/bin/python -c "import mailroom.app, tasks.celery_app, services.migrate"

# --- final: the venv on a clean slim image, run as an unprivileged user ---------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="mailroom" \
      org.opencontainers.image.description="Multi-tenant IMAP/SMTP service: API, Celery workers, Beat, Flower"
# PROMETHEUS_MULTIPROC_DIR: gunicorn's workers share metrics through files there. Mount a
# fresh emptyDir/tmpfs over it (deploy/, docker-compose.test.yml) so a restart starts clean.
ENV PATH=/opt/mailroom/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PROMETHEUS_MULTIPROC_DIR=/tmp/prometheus
RUN groupadd --system --gid 10001 mailroom \
    && useradd --system --uid 10001 --gid mailroom --home-dir /app --shell /usr/sbin/nologin mailroom \
    && mkdir -p /app /tmp/prometheus \
    && chown mailroom:mailroom /app /tmp/prometheus
COPY --from=builder /opt/mailroom /opt/mailroom
# Where mailroom.webpage looks first: <venv prefix>/share/mailroom/web.
COPY --from=web /web/dist /opt/mailroom/share/mailroom/web
WORKDIR /app
USER 10001:10001
EXPOSE 8000
# For the API role; worker, Beat and Flower containers override or disable it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["gunicorn", "--bind", "0.0.0.0:8000", "--workers", "2", "--threads", "4", \
     "--no-control-socket", "-c", "python:mailroom.gunicorn_config", "mailroom.app:create_app()"]
