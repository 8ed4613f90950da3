# cxr-node image: the DICOM node (Storage SCP + classifier worker + SR sender).
#
#   docker build -t cxr-node .                                      # CPU torch (default)
#   docker build -t cxr-node-gpu --build-arg TORCH_INDEX_URL=...    # CUDA torch, see
#                                                                   # docker-compose.gpu.yml
#
# Volumes: /var/lib/cxr-node (spool: received images, SRs, jobs.sqlite) and /models (the
# torchxrayvision weights file, nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-
# lr001-rot45-tr15-sc15-seed0-best.pt; without it `serve` refuses to start unless
# CXR_NODE_MODEL__ALLOW_UNTRAINED=true, or downloads it when it can reach the internet).
FROM python:3.11-slim

# Where torch and torchvision come from: the CPU wheels by default. A GPU build passes an
# index with CUDA wheels (docker-compose.gpu.yml does). TORCH_SPEC pins the versions the
# project is tested with (the Makefile's TORCH_SPEC); it must exist on that index.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# Non-root user (fixed uid/gid so volume ownership is predictable).
RUN groupadd --system --gid 10001 cxr \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/cxr --create-home \
        --shell /usr/sbin/nologin cxr

# Layer 1, the largest: torch + torchvision. Rebuilt only when the index or the pins change.
RUN pip install --index-url "${TORCH_INDEX_URL}" ${TORCH_SPEC}

# Layer 2: the project's other dependencies, read from pyproject.toml alone, so editing the
# code does not reinstall them (torch/torchvision are already satisfied by layer 1).
WORKDIR /src
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# Layer 3: the node itself (console script `cxr-node`).
COPY node ./node
RUN pip install . \
 && rm -rf /src/build /src/*.egg-info \
 && cxr-node --version

# Configuration: the repo's config/node.toml; the environment overrides any key
# (CXR_NODE_<SECTION>__<KEY>), precedence command line > environment > file > defaults.
COPY config/node.toml /etc/cxr-node/node.toml

# Container defaults (docker-compose.yml sets them again, explicitly). The SCP only accepts
# associations from scp.allowed_calling_aets: the PACS (ORTHANC) and the HEALTHCHECK below.
ENV CXR_NODE_SCP__BIND_ADDRESS=0.0.0.0 \
    CXR_NODE_SCP__ALLOWED_CALLING_AETS='["ORTHANC", "HEALTHCHECK"]' \
    CXR_NODE_SPOOL__DIRECTORY=/var/lib/cxr-node/spool \
    CXR_NODE_MODEL__CACHE_DIR=/models \
    TCP_NODELAY=1

# Volume mount points, owned by the node's user: a new named volume copies this ownership
# and these modes. The spool holds patient data: its folders are 0700, and `serve` applies
# spool.umask (0077: files 0600). Nothing here sets a umask or chmods them open again.
RUN mkdir -p /var/lib/cxr-node/spool /models \
 && chown -R 10001:10001 /var/lib/cxr-node /models \
 && chmod 0700 /var/lib/cxr-node /var/lib/cxr-node/spool
VOLUME ["/var/lib/cxr-node", "/models"]

WORKDIR /var/lib/cxr-node
USER 10001:10001

# DICOM Storage SCP (scp.port).
EXPOSE 11112

# Healthy = the SCP answers a C-ECHO. start-period covers loading the model (and, on a first
# start with internet access, downloading the weights).
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["cxr-node", "echo", "--host", "127.0.0.1", "--port", "11112", "--aet", "CXR_NODE", "--calling-aet", "HEALTHCHECK", "--timeout", "5"]

# SIGTERM: stop accepting, let the worker finish its batch (worker.shutdown_timeout = 30 s),
# exit 0. Give the container more than that to stop (compose: stop_grace_period).
STOPSIGNAL SIGTERM
CMD ["cxr-node", "serve", "--config", "/etc/cxr-node/node.toml"]
