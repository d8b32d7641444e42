# The app image for the ServerApp and ClientApp runners: Flower's SuperExec image with this
# project installed (see docker-compose.yml; build args keep flwr at pyproject's version).
ARG FLWR_VERSION=1.41.0
FROM flwr/superexec:${FLWR_VERSION}

WORKDIR /app
# CPU wheels keep the image small; drop the index URL to get CUDA wheels for the gpu profile.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# Only what the ServerApp and ClientApp import: the launcher package (launch/) stays out.
COPY pyproject.toml README.md ./
COPY server server
COPY client client
COPY strategies strategies
COPY attacks attacks
COPY models models
COPY experiment experiment
RUN python -m pip install --no-cache-dir --extra-index-url ${TORCH_INDEX} "torch>=2.9" "torchvision>=0.24" \
 && python -m pip install --no-cache-dir .
# data/ and runs/ are volumes: the data sets come from the host, results land on the host
ENTRYPOINT ["flower-superexec"]
