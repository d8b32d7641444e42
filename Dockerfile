# The app image for the ServerApp and ClientApp runners: Flower's SuperExec image with this
# project installed (see docker-compose.yml). Layers run from the slowest-changing to the
# fastest, so editing the code rebuilds only the last two.
# FLWR_VERSION has no default: it is the pin on flwr in pyproject.toml, passed by
# docker-compose.yml (`flain compose` writes it there); `docker build` alone needs
# --build-arg FLWR_VERSION=X.Y.Z. The build stops if the image's flwr is not that pin.
ARG FLWR_VERSION
# Another base with flower-superexec as its entrypoint works too (make compose-test uses a
# locally built one: docker/flwr-local.Dockerfile).
ARG BASE_IMAGE=flwr/superexec:${FLWR_VERSION}
FROM ${BASE_IMAGE}
ARG FLWR_VERSION

WORKDIR /app
# CPU wheels keep the image small; set TORCH_INDEX="" (PyPI's CUDA wheels) for the gpu profile.
# PIP_INDEX_URL / PIP_EXTRA_INDEX_URL / PIP_FIND_LINKS (unset by default) point pip at other
# package sources, e.g. a mirror served on the build host (make compose-test does that offline).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH="torch>=2.9 torchvision>=0.24"
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
RUN if [ -z "${PIP_EXTRA_INDEX_URL}" ]; then unset PIP_EXTRA_INDEX_URL; fi \
 && python -m pip install --no-cache-dir ${TORCH_INDEX:+--extra-index-url ${TORCH_INDEX}} ${TORCH}

# The other dependencies from pyproject.toml, before the code. Ray (flwr[simulation]) stays
# out: containers run real SuperNodes, not the simulation; flwr is pyproject's exact pin, and a
# base or FLWR_VERSION of another release is refused here rather than by the SuperLink later.
COPY --chown=app:app pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(d.replace('flwr[simulation]', 'flwr') for d in tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'] if not d.startswith(('torch', 'torchvision'))))" > /tmp/requirements.txt \
 && if [ -z "${PIP_EXTRA_INDEX_URL}" ]; then unset PIP_EXTRA_INDEX_URL; fi \
 && python -m pip install --no-cache-dir -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt \
 && python -c "import sys, flwr; v = flwr.__version__; sys.exit(0 if v == '${FLWR_VERSION}' else f'flwr {v} in the app image is not FLWR_VERSION=${FLWR_VERSION} (the pin in pyproject.toml): regenerate docker-compose.yml with flain compose')"

# Only what the ServerApp and ClientApp import: the launcher package (launch/) stays out.
COPY --chown=app:app server server
COPY --chown=app:app client client
COPY --chown=app:app strategies strategies
COPY --chown=app:app attacks attacks
COPY --chown=app:app models models
COPY --chown=app:app experiment experiment
RUN python -m pip install --no-cache-dir --no-deps . && rm -rf build *.egg-info
# data/ and runs/ are volumes: the data sets come from the host, results land on the host
ENTRYPOINT ["flower-superexec"]
