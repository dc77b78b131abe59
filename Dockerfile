# agent-bff container image. Build from the repository root:
#   docker build -t agent-bff .
# Configuration only through the environment (README: Configuration), e.g.
#   docker run -p 8080:8080 -e SESSION_STORE=redis -e REDIS_URL=redis://redis:6379/0 agent-bff
# The build runs scripts/install, the same script tests/test_container.py runs on the host to
# exercise these steps without a Docker engine.

ARG PYTHON_IMAGE=python:3.11-slim

# -- build: a virtualenv in /opt/venv ----------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# Dependencies first, in their own layer: rebuilt only when pyproject.toml changes.
COPY pyproject.toml ./
COPY scripts/install scripts/install
RUN scripts/install --venv /opt/venv --deps-only
# Then the application itself, as a regular (non-editable) install: /src is not in the image.
# app/ holds the load kit (app/loadkit) too: a plain install, so its code ships (never imported
# by `python -m app`) but not its `load` extra (hdrhistogram, matplotlib); agent-bff-stub runs,
# agent-bff-loadgen and agent-bff-bench say what to install.
COPY README.md LICENSE ./
COPY app app
RUN scripts/install --venv /opt/venv --no-editable

# -- runtime: the virtualenv, a non-root user, nothing else --------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 agent \
    && useradd --system --no-log-init --uid 10001 --gid agent --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin agent
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOST=0.0.0.0 \
    PORT=8080 \
    UVLOOP=1
# An empty working directory: no stray .env file is read (configuration is the environment).
WORKDIR /srv/agent-bff
USER 10001:10001
EXPOSE 8080
# Liveness of the process itself (/healthz touches nothing); no curl in the image.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8080') + '/healthz', timeout=2)"]
# Exec form: python is PID 1 and receives SIGTERM itself, so the graceful drain runs
# (SHUTDOWN_TIMEOUT_SECONDS; give the orchestrator a longer stop timeout).
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "app"]
