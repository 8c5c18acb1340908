# The coordinating site's TLS edge: nginx (Debian's nginx-light) forwarding the SuperLink's Fleet
# API only (docker/edge-nginx.conf). Its certificate and key come from the certs directory at run
# time; nothing secret is baked in.
#   normal host:  FROM debian:bookworm-slim, nginx-light installed with apt-get
#   offline:      docker/build-images.sh --offline builds the base with debootstrap, nginx-light
#                 included (docker/build-offline-base.sh), so nothing is fetched here
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

ARG FEDTUNE_UID=10001
ARG FEDTUNE_GID=10001

RUN if ! command -v nginx >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends nginx-light \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
 && groupadd --gid "${FEDTUNE_GID}" fedtune \
 && useradd --uid "${FEDTUNE_UID}" --gid "${FEDTUNE_GID}" --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin fedtune \
 && rm -rf /etc/nginx/sites-enabled /etc/nginx/conf.d /var/www \
 && install -d -o fedtune -g fedtune -m 0700 /certs

COPY docker/edge-nginx.conf /etc/nginx/fedtune-edge.conf

USER ${FEDTUNE_UID}:${FEDTUNE_GID}
# -e: log to stderr from the start (the default error log under /var/log is not writable here)
CMD ["nginx", "-c", "/etc/nginx/fedtune-edge.conf", "-e", "stderr", "-g", "daemon off;"]
