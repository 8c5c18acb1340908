#!/usr/bin/env bash
# Build the base image of fedtune's Dockerfiles locally, for hosts that reach no container
# registry: Debian bookworm (python3 3.11, python3-venv, pip) from Debian packages with
# debootstrap, turned into an image with `docker import`.
#
#   docker/build-offline-base.sh                 # -> fedtune-base:bookworm-py3.11
#   docker/build-images.sh --offline             # builds FROM it (--build-arg BASE_IMAGE=...)
#
# Needs root (debootstrap), the `debootstrap` package (installed with apt-get when missing) and
# a Debian mirror (MIRROR, default http://deb.debian.org/debian). Idempotent: does nothing when
# the tag exists, unless --force.
#
# Environment: BASE_TAG (default fedtune-base:bookworm-py3.11), MIRROR, SUITE (default bookworm),
# PACKAGES (comma-separated; default python3,python3-venv,python3-pip,ca-certificates; the edge's
# base is BASE_TAG=fedtune-edge-base:bookworm PACKAGES=nginx-light), WORKDIR (scratch space;
# default a temporary directory, removed afterwards).
set -euo pipefail

BASE_TAG=${BASE_TAG:-fedtune-base:bookworm-py3.11}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SUITE=${SUITE:-bookworm}
PACKAGES=${PACKAGES:-python3,python3-venv,python3-pip,ca-certificates}
force=0
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done

if [ "$force" = 0 ] && docker image inspect "$BASE_TAG" >/dev/null 2>&1; then
  echo "$BASE_TAG exists (use --force to rebuild it)"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "debootstrap needs root: run this script with sudo" >&2
  exit 1
fi
if ! command -v debootstrap >/dev/null; then
  apt-get update -qq && apt-get install -y -qq debootstrap
fi

work=${WORKDIR:-$(mktemp -d /tmp/fedtune-base.XXXXXX)}
root="$work/rootfs"
cleanup() { if [ -z "${WORKDIR:-}" ]; then rm -rf "$work"; fi; }
trap cleanup EXIT

echo "debootstrap $SUITE from $MIRROR into $root ..."
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$MIRROR" >"$work/debootstrap.log" 2>&1 \
  || { tail -30 "$work/debootstrap.log" >&2; exit 1; }

# Make it a container image: no package caches, no docs, no host-specific files.
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/log/* \
  "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/tmp/* \
  "$root"/etc/hostname "$root"/etc/machine-id
: >"$root/etc/machine-id"
printf 'deb %s %s main\n' "$MIRROR" "$SUITE" >"$root/etc/apt/sources.list"
if [ -x "$root/usr/bin/python3" ]; then
  about="python $(chroot "$root" python3 -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')"
else
  about="no python"
fi

tar -C "$root" --numeric-owner -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  --message "debian $SUITE minbase + $PACKAGES ($about) by fedtune docker/build-offline-base.sh" \
  - "$BASE_TAG" >/dev/null
echo "built $BASE_TAG (Debian $SUITE, $about): $(docker image inspect -f '{{.Size}}' "$BASE_TAG" | awk '{printf "%.0f MB", $1/1e6}')"
