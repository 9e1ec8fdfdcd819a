# syntax=docker/dockerfile:1
# The GPU worker image: Celery consuming the `gpu` queue, CUDA torch.
#
# One worker per GPU: each container runs a single prefork child (-c 1) and sees one device.
# To scale out on a multi-GPU host, run one container per GPU and set CUDA_VISIBLE_DEVICES
# (or the compose device reservation's device_ids) per container.

# ---- python: CUDA runtime plus CPython 3.11 from deadsnakes (Ubuntu 22.04 ships 3.10) ----
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04 AS python

ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && apt-get purge -y --auto-remove software-properties-common gpg-agent \
    && rm -rf /var/lib/apt/lists/*

# ---- builder: resolve and install everything into a self-contained venv ----
FROM python AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first: PyPI's Linux wheels are the CUDA builds, with their CUDA libraries as wheels.
RUN pip install torch==2.14.1 torchvision==0.29.1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY service/ service/
COPY worker/ worker/
RUN pip install .

# ---- runtime: CUDA runtime, python3.11, the venv ----
# The venv's interpreter links to /usr/bin/python3.11, which the `python` stage provides.
FROM python AS runtime

RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin antidote \
    && mkdir -p /data \
    && chown antidote:antidote /data

COPY --from=builder /opt/venv /opt/venv

WORKDIR /app

ENV PATH=/opt/venv/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ANTIDOTE_DATA_DIR=/data \
    ANTIDOTE_WORKER_QUEUE=gpu

USER antidote
VOLUME ["/data"]

# One task per child process (--max-tasks-per-child=1) so that GPU memory is returned to the
# driver after every purification; the node name carries the queue for `inspect ping`.
CMD ["celery", "-A", "worker.celery_app", "worker", "-Q", "gpu", "-P", "prefork", "-c", "1", \
     "--max-tasks-per-child=1", "-n", "gpu@%h", "--loglevel=INFO"]
