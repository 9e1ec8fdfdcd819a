# syntax=docker/dockerfile:1
# The API image: FastAPI behind uvicorn, CPU-only torch (the API never runs a model on a GPU).

# ---- builder: resolve and install everything into a self-contained venv ----
FROM python:3.11-slim AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, from the CPU index, so that `pip install .` finds the pin already satisfied
# and does not pull the much larger CUDA wheels from PyPI.
RUN pip install --index-url https://download.pytorch.org/whl/cpu \
        torch==2.14.1 torchvision==0.29.1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY service/ service/
COPY worker/ worker/
RUN pip install .

# ---- runtime: the venv, the migrations, nothing else ----
FROM python:3.11-slim AS runtime

RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin antidote \
    && mkdir -p /data \
    && chown antidote:antidote /data

COPY --from=builder /opt/venv /opt/venv

WORKDIR /app
# `antidote db upgrade` finds the migration scripts in alembic/ under the working directory.
COPY --chown=antidote:antidote alembic/ alembic/

ENV PATH=/opt/venv/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ANTIDOTE_DATA_DIR=/data

USER antidote
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/livez', timeout=4)"]

CMD ["antidote", "serve", "--api-only", "--host", "0.0.0.0", "--port", "8000"]
