#!/usr/bin/env bash
# Build fedtune's three images with BuildKit through `docker compose build` (Compose v2 carries its
# own BuildKit client, so no buildx plugin is needed):
#
#   fedtune-app:<version>              SuperNodes, the ServerApp's SuperExec, one-shot services
#   fedtune-superlink:flwr-<version>   the SuperLink (flwr only)
#   fedtune-edge:<version>             the coordinating site's TLS edge (nginx-light from Debian)
#
# Usage:
#   docker/build-images.sh             FROM python:3.11-slim-bookworm, packages from PyPI (pip
#                                      cache mount: rebuilds after a lock change download nothing twice)
#   docker/build-images.sh --offline   no registry needed: FROM base images made from Debian
#                                      packages (docker/build-offline-base.sh: Python; nginx-light
#                                      for the edge), packages from docker/wheelhouse, filled here
#                                      with `pip download` on the host
#   extra arguments go to `docker compose build` (e.g. --no-cache, superlink)
#
# Environment: FEDTUNE_BASE_IMAGE (base image; --offline default fedtune-base:bookworm-py3.11),
# FEDTUNE_EDGE_BASE_IMAGE (the edge's; --offline default fedtune-edge-base:bookworm),
# FEDTUNE_UID/FEDTUNE_GID (the containers' user, default 10001), PYTHON (host python for
# `pip download`, default python3). Compose also reads these from ./.env.
set -euo pipefail
cd "$(dirname "$0")/.."

offline=0
args=()
for arg in "$@"; do
  case "$arg" in
    --offline) offline=1 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) args+=("$arg") ;;
  esac
done

docker compose version >/dev/null 2>&1 || {
  echo "Docker Compose v2 is missing: run docker/install-compose.sh" >&2; exit 1; }

if [ "$offline" = 1 ]; then
  export FEDTUNE_BASE_IMAGE=${FEDTUNE_BASE_IMAGE:-fedtune-base:bookworm-py3.11}
  export FEDTUNE_PIP_OFFLINE=1
  if ! docker image inspect "$FEDTUNE_BASE_IMAGE" >/dev/null 2>&1; then
    BASE_TAG=$FEDTUNE_BASE_IMAGE docker/build-offline-base.sh
  fi
  export FEDTUNE_EDGE_BASE_IMAGE=${FEDTUNE_EDGE_BASE_IMAGE:-fedtune-edge-base:bookworm}
  if ! docker image inspect "$FEDTUNE_EDGE_BASE_IMAGE" >/dev/null 2>&1; then
    BASE_TAG=$FEDTUNE_EDGE_BASE_IMAGE PACKAGES=nginx-light docker/build-offline-base.sh
  fi
  # Every pinned wheel, for CPython 3.11 on x86-64 glibc (manylinux up to bookworm's glibc 2.36);
  # files already there are kept.
  platforms=()
  for minor in $(seq 5 36); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
  platforms+=(--platform manylinux1_x86_64 --platform manylinux2010_x86_64 --platform manylinux2014_x86_64)
  echo "filling docker/wheelhouse from the lock files ..."
  "${PYTHON:-python3}" -m pip download --quiet --no-deps --only-binary=:all: "${platforms[@]}" \
    --python-version 3.11 --implementation cp --abi cp311 -d docker/wheelhouse \
    -r docker/requirements-app.txt -r docker/requirements-build.txt -r docker/requirements-superlink.txt
fi

start=$(date +%s)
docker compose -f compose.yaml build "${args[@]}"
# the edge exists only at a coordinating site; its published address does not matter to a build
FEDTUNE_EDGE_PUBLISH=127.0.0.1:9093 docker compose -f compose.superlink.yaml build edge
echo "built in $(( $(date +%s) - start )) s:"
for image in $(docker compose -f compose.yaml config --images | sort -u) \
             $(FEDTUNE_EDGE_PUBLISH=127.0.0.1:9093 docker compose -f compose.superlink.yaml config --images | sort -u); do
  docker image inspect -f "{{index .RepoTags 0}}  {{.Size}}" "$image" | awk '{printf "  %-40s %6.2f GB\n", $1, $2/1e9}'
done
