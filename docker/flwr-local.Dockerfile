# Stand-ins for Flower's official images (flwr/superlink, flwr/supernode, flwr/superexec) for
# machines that cannot pull from a registry: the same user (app, uid 49999), virtualenv
# (/python/venv), working directory (/app) and entrypoints, built on any Debian-like base.
# One build, three targets that differ only in the entrypoint:
#   docker build --network host -f docker/flwr-local.Dockerfile --target superlink -t NAME CONTEXT
# CONTEXT holds ca-bundle.crt, the build machine's CA bundle (for networks whose HTTPS goes
# through an inspecting proxy; pip inside the image trusts what the host trusts).
# `make compose-test` (docker/compose_test.py) builds them on an image made with debootstrap.
ARG BASE=debian:bookworm-slim
FROM ${BASE} AS base
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get -y --no-install-recommends install python3 python3-venv ca-certificates libsqlite3-0 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --no-create-home --home-dir /app -c "" --uid 49999 app \
 && mkdir -p /app && chown app:app /app
# no default: the pin on flwr in pyproject.toml (docker/compose_test.py passes it)
ARG FLWR_VERSION
RUN test -n "${FLWR_VERSION}" || { echo 'build with --build-arg FLWR_VERSION=X.Y.Z (the pin in pyproject.toml)'; exit 1; }
COPY ca-bundle.crt /etc/ssl/certs/build-host-ca.crt
ENV PIP_CERT=/etc/ssl/certs/build-host-ca.crt
RUN python3 -m venv /python/venv \
 && /python/venv/bin/pip install --no-cache-dir "flwr==${FLWR_VERSION}" \
 && chown -R app:app /python/venv
ENV PATH=/python/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    PYTHONIOENCODING=UTF-8 LANG=C.UTF-8 LC_ALL=C.UTF-8 HOME=/app
WORKDIR /app
USER app

FROM base AS superlink
ENTRYPOINT ["flower-superlink"]

FROM base AS supernode
ENTRYPOINT ["flower-supernode"]

FROM base AS superexec
ENTRYPOINT ["flower-superexec"]
