# The SuperLink image: flwr (docker/requirements-superlink.txt) and nothing else; no torch.
# Certificates and its state database come from volumes at run time.
#
# Needs BuildKit (`docker compose build`, `docker buildx build`); see docs/docker.md.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG FEDTUNE_UID=10001
ARG FEDTUNE_GID=10001
ARG PIP_OFFLINE=0

ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    VIRTUAL_ENV=/opt/venv \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0

RUN groupadd --gid "${FEDTUNE_GID}" fedtune \
 && useradd --uid "${FEDTUNE_UID}" --gid "${FEDTUNE_GID}" --create-home --home-dir /home/fedtune \
      --shell /usr/sbin/nologin fedtune \
 && install -d -o fedtune -g fedtune -m 0700 /certs /state \
 && python3 -m venv /opt/venv

RUN --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    --mount=type=bind,source=docker/wheelhouse,target=/wheels \
    --mount=type=bind,source=docker/requirements-superlink.txt,target=/tmp/requirements.txt \
    if [ "$PIP_OFFLINE" = 1 ]; then set -- --no-index --find-links /wheels; fi; \
    pip install "$@" -r /tmp/requirements.txt \
 && pip check \
 && rm -rf /opt/venv/bin/uv /opt/venv/bin/uvx

COPY docker/healthcheck.py /usr/local/bin/fedtune-healthcheck

WORKDIR /home/fedtune
USER ${FEDTUNE_UID}:${FEDTUNE_GID}
CMD ["flower-superlink", "--help"]
