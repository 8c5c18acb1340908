#!/usr/bin/env bash
# The test command: sets up .venv on a fresh machine (PyPI only), then runs the whole suite.
# Usage: scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# Reinstall only when the dependency list changed (torch and friends are several GB).
stamp=.venv/.fedtune-installed
if [ ! -f "$stamp" ] || ! cmp -s pyproject.toml "$stamp"; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e '.[test]'
  cp pyproject.toml "$stamp"
fi
# The Compose stack tests need Docker Compose v2; Debian's docker.io ships only 1.x.
if command -v docker >/dev/null && docker info >/dev/null 2>&1 && ! docker compose version >/dev/null 2>&1; then
  docker/install-compose.sh
fi
# The report's browser test needs Chromium (Debian's package); installed quietly when missing.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  as_root=""; [ "$(id -u)" -eq 0 ] || as_root="sudo -n"
  { $as_root apt-get update -qq && DEBIAN_FRONTEND=noninteractive $as_root apt-get install -y -qq --no-install-recommends chromium; } >/dev/null \
    || echo "scripts/test.sh: could not install chromium; the report's browser test will fail" >&2
fi
export FLWR_TELEMETRY_ENABLED=0 PATH="$PWD/.venv/bin:$PATH"
# -rfEs: every failure, error and skipped test (with its reason) in the closing summary
# (FEDTUNE_REQUIRE_DOCKER=1 turns Docker skips into failures)
exec .venv/bin/python -m pytest -q -rfEs -p no:cacheprovider "$@" tests
