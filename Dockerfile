# syntax=docker/dockerfile:1
#
# Two stages: "build" installs the locked dependencies and the package into a virtualenv at /opt/venv;
# "runtime" copies only that virtualenv onto a fresh slim image and runs as an unprivileged user.
# The locked dependencies get their own layer before any source is copied, so editing src/ rebuilds
# only the last, small layer.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv

WORKDIR /build

# 1. Locked third-party dependencies: changes only when requirements.lock changes.
COPY requirements.lock ./
RUN pip install --no-cache-dir -r requirements.lock

# 2. The service itself, without re-resolving anything.
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir --no-deps .


FROM ${PYTHON_IMAGE} AS runtime

ARG APP_UID=10001
ARG APP_GID=10001

# A numeric, non-root user so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
RUN groupadd --system --gid "${APP_GID}" app \
    && useradd --system --uid "${APP_UID}" --gid app --no-create-home --home-dir /tmp \
       --shell /usr/sbin/nologin app

COPY --from=build /opt/venv /opt/venv
# The models file the package ships, at a stable path that MODELS_CONFIG names (mount your own over it).
COPY src/dspy_service/data/models.yaml /app/config/models.yaml

# Nothing is written outside /tmp: no bytecode files, HOME (DSPy's and LiteLLM's caches) under /tmp,
# and LiteLLM reads the model cost map it ships instead of fetching one at import time.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    LITELLM_LOCAL_MODEL_COST_MAP=True \
    MODELS_CONFIG=/app/config/models.yaml \
    HOST=0.0.0.0 \
    PORT=8080

WORKDIR /app
USER ${APP_UID}:${APP_GID}
EXPOSE 8080

# The slim image has no curl: ask /health with the interpreter that is already there.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8080') + '/health', timeout=4)"]

# Exec form: the service is PID 1 and receives SIGTERM itself (it then turns /ready to 503 and drains).
ENTRYPOINT ["dspy-service"]
CMD ["serve"]
