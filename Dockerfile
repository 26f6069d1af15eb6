# syntax=docker/dockerfile:1
# mljob-operator image: one image for the operator, the collector and `mljob worker`
# (`mljob` is the entrypoint: `operator`, `collector`, `worker --pipeline ... --handler ...`).
# Runs as uid 10001 with a read-only root filesystem (the chart mounts an emptyDir at /tmp);
# /tmp is the one directory it may write, also with a writable root (/var/tmp leads there).

ARG PYTHON_IMAGE=python:3.11.9-slim-bookworm

# ---- build: the wheel of this project and of every dependency (compilers stay here)
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
RUN pip wheel --wheel-dir /wheels ".[operator]"

# ---- final: a venv installed from the wheels only, no compilers, no build tree
FROM ${PYTHON_IMAGE}
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/mljob \
    PATH=/opt/mljob/bin:$PATH \
    HOME=/tmp \
    TMPDIR=/tmp
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m venv "$VIRTUAL_ENV" \
    && wheel="$(ls /wheels/mljob_operator-*.whl)" \
    && pip install --no-index --find-links=/wheels "${wheel}[operator]" \
    && pip uninstall -y pip setuptools wheel \
    && groupadd --gid 10001 mljob \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin mljob \
    && chmod 0755 /run/lock && rm -rf /var/tmp && ln -s /tmp /var/tmp
USER 10001:10001
WORKDIR /tmp
ENTRYPOINT ["mljob"]
CMD ["operator"]
