# fedtune runtime image: SuperNodes (ClientApp + resident trainer), the ServerApp's SuperExec and
# the one-shot services (certs, register, model-cache, run). torch, transformers, peft,
# bitsandbytes, flwr and flwr-datasets at the versions of docker/requirements-app.txt; the
# project itself installed from pyproject.toml. No certificate, key or token is baked in: they
# come from volumes at run time.
#
# Needs BuildKit (`docker compose build`, `docker buildx build`); see docs/docker.md.
#   normal host:  docker compose build            (FROM python:3.11-slim-bookworm, pip from PyPI)
#   offline:      docker/build-images.sh --offline (FROM a debootstrap base, pip from docker/wheelhouse)
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG FEDTUNE_UID=10001
ARG FEDTUNE_GID=10001
# 1: install only from docker/wheelhouse (filled by docker/build-images.sh --offline), no index.
ARG PIP_OFFLINE=0

ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    VIRTUAL_ENV=/opt/venv \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    HF_HOME=/cache/huggingface \
    FEDTUNE_CACHE=/cache/fedtune \
    HF_DATASETS_CACHE=/tmp/hf-datasets \
    MPLCONFIGDIR=/tmp/matplotlib

# The unprivileged user every container runs as; /certs and /cache are created with its
# ownership so that named volumes mounted there start out writable by it (Docker copies a new
# volume's ownership from the image directory it is mounted on).
RUN groupadd --gid "${FEDTUNE_GID}" fedtune \
 && useradd --uid "${FEDTUNE_UID}" --gid "${FEDTUNE_GID}" --create-home --home-dir /home/fedtune \
      --shell /usr/sbin/nologin fedtune \
 && install -d -o fedtune -g fedtune -m 0700 /certs \
 && install -d -o fedtune -g fedtune -m 0755 /cache /results \
 && python3 -m venv /opt/venv

# Dependencies first (the big, rarely changing layer): only the lock file invalidates it.
RUN --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    --mount=type=bind,source=docker/wheelhouse,target=/wheels \
    --mount=type=bind,source=docker/requirements-app.txt,target=/tmp/requirements-app.txt \
    --mount=type=bind,source=docker/requirements-build.txt,target=/tmp/requirements-build.txt \
    if [ "$PIP_OFFLINE" = 1 ]; then set -- --no-index --find-links /wheels; fi; \
    pip install "$@" -r /tmp/requirements-app.txt -r /tmp/requirements-build.txt
# Every dependency's bytecode, readable by the unprivileged user: a ClientApp process starts per
# message and, with PYTHONDONTWRITEBYTECODE, would compile what pip left uncompiled each time
# (`;`: a data file that is not Python 3 must not fail the build).
RUN python -m compileall -q -j 0 /opt/venv/lib >/dev/null; chmod -R a+rX /opt/venv

COPY docker/healthcheck.py /usr/local/bin/fedtune-healthcheck

# The project: pyproject.toml and app/ stay at /opt/fedtune, the directory `flwr run` builds the
# FAB from (`fedtune run`); an editable install puts them on sys.path and adds `fedtune`.
COPY pyproject.toml /opt/fedtune/
COPY app /opt/fedtune/app
RUN pip install --no-deps --no-build-isolation --no-index -e /opt/fedtune \
 && python -m compileall -q /opt/fedtune/app \
 && pip check \
 && fedtune --help >/dev/null

WORKDIR /home/fedtune
USER ${FEDTUNE_UID}:${FEDTUNE_GID}
CMD ["fedtune", "--help"]
