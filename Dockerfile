# syntax=docker/dockerfile:1.7
#
# rnnd images. One Dockerfile, three images:
#
#   docker build -t rnnd .                          runtime (the default): `rnnd serve` on CPU
#   docker build --target gpu -t rnnd:gpu .         `rnnd serve` on NVIDIA GPUs (onnxruntime-gpu)
#   docker build --target export -t rnnd-export .   `rnnd export` / `rnnd train` (with torch, CPU build)
#
# Bake a bundle into a serving image (otherwise mount one at /models/model.onnx):
#   docker build --build-arg MODEL=models/sensors.onnx -t rnnd-sensors .
#
# The serving images hold the daemon and ONNX Runtime only: no torch, no compilers, a non-root
# user, and the same pinned requirement set (requirements/runtime.txt) that tests/test_deploy.py
# installs into a plain venv and serves a real model from. Base images are pinned to exact tags.

ARG PYTHON_IMAGE=python:3.11.10-slim-bookworm
# onnxruntime-gpu 1.31 is built against CUDA 13 and cuDNN 9 (it links libcudart.so.13): the
# base must match it. Hosts whose driver predates CUDA 13 can build with a CUDA 12 base and an
# onnxruntime-gpu release built for CUDA 12:
#   --build-arg CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu22.04 --build-arg ORT_GPU_VERSION=1.20.1
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu22.04


# ---- build: the serving venv, from the one requirement set ------------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/rnnd
WORKDIR /src
COPY requirements/runtime.txt requirements/runtime.txt
RUN /opt/rnnd/bin/pip install -r requirements/runtime.txt
COPY pyproject.toml README.md LICENSE ./
COPY cli cli
COPY daemon daemon
COPY export export
RUN /opt/rnnd/bin/pip install --no-deps . \
 && /opt/rnnd/bin/python -c "import rnnd.daemon.service, rnnd.tools" \
 && ! /opt/rnnd/bin/python -c "import torch" 2>/dev/null


# ---- model: the bundle baked in by --build-arg MODEL=path/in/context (empty: mount one) --------
FROM ${PYTHON_IMAGE} AS model
ARG MODEL=
RUN --mount=type=bind,target=/context \
    mkdir -p /models \
 && if [ -n "$MODEL" ]; then \
      cp "/context/$MODEL" /models/model.onnx \
      || { echo "MODEL=$MODEL: no such file in the build context (or excluded by .dockerignore)" >&2; exit 1; }; \
    fi


# ---- export: rnnd export / rnnd train, with torch (CPU build) ----------------------------------
FROM ${PYTHON_IMAGE} AS export
# PyPI's torch for Linux is the CUDA build (GBs); the CPU build comes from PyTorch's index.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/rnnd/bin:$PATH PYTHONUNBUFFERED=1
RUN python -m venv /opt/rnnd
WORKDIR /src
COPY requirements/dev.txt requirements/dev.txt
COPY pyproject.toml README.md LICENSE ./
COPY cli cli
COPY daemon daemon
COPY export export
# The development lock as constraints: torch and everything else at the versions the tests ran
# (the CPU index's 2.13.0+cpu satisfies the lock's torch==2.13.0).
RUN pip install --extra-index-url "$TORCH_INDEX_URL" -c requirements/dev.txt '.[export]'
# /models and /data owned by the user: an empty named volume mounted there takes this ownership,
# so `rnnd train --out /models` can write into it.
RUN groupadd --system --gid 10001 rnnd \
 && useradd --system --uid 10001 --gid rnnd --create-home --home-dir /home/rnnd --shell /usr/sbin/nologin rnnd \
 && mkdir -p /models /data && chown rnnd:rnnd /models /data
USER 10001:10001
WORKDIR /home/rnnd
ENTRYPOINT ["rnnd"]
CMD ["--help"]


# ---- gpu: rnnd serve on a CUDA + cuDNN runtime base ---------------------------------------------
FROM ${CUDA_IMAGE} AS gpu-base
ENV DEBIAN_FRONTEND=noninteractive
# Python 3.11 (Ubuntu 22.04's own python3 is 3.10; rnnd and onnxruntime-gpu need 3.11+). No compilers.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

FROM gpu-base AS gpu-build
# Empty: the same onnxruntime version as the CPU image, as onnxruntime-gpu.
ARG ORT_GPU_VERSION=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3.11 -m venv /opt/rnnd
WORKDIR /src
COPY requirements/runtime.txt requirements/runtime.txt
RUN if [ -n "$ORT_GPU_VERSION" ]; then \
      sed "s/^onnxruntime==.*/onnxruntime-gpu==$ORT_GPU_VERSION/" requirements/runtime.txt > /tmp/runtime-gpu.txt; \
    else \
      sed "s/^onnxruntime==/onnxruntime-gpu==/" requirements/runtime.txt > /tmp/runtime-gpu.txt; \
    fi \
 && grep -q "^onnxruntime-gpu==" /tmp/runtime-gpu.txt \
 && /opt/rnnd/bin/pip install -r /tmp/runtime-gpu.txt
COPY pyproject.toml README.md LICENSE ./
COPY cli cli
COPY daemon daemon
COPY export export
RUN /opt/rnnd/bin/pip install --no-deps . \
 && /opt/rnnd/bin/python -c "import rnnd.daemon.service, rnnd.tools" \
 && ! /opt/rnnd/bin/python -c "import torch" 2>/dev/null

FROM gpu-base AS gpu
ENV PATH=/opt/rnnd/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    RNND_MODEL=/models/model.onnx RNND_HTTP_HOST=0.0.0.0 RNND_HTTP_PORT=9100 RNND_PROVIDER=cuda
RUN groupadd --system --gid 10001 rnnd \
 && useradd --system --uid 10001 --gid rnnd --create-home --home-dir /home/rnnd --shell /usr/sbin/nologin rnnd
COPY --from=gpu-build /opt/rnnd /opt/rnnd
COPY --from=model --chown=10001:10001 /models /models
USER 10001:10001
WORKDIR /home/rnnd
EXPOSE 9100
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('RNND_HTTP_PORT', '9100') + '/healthz', timeout=4)"]
ENTRYPOINT ["rnnd", "serve"]


# ---- runtime (default): rnnd serve on CPU -------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
# Every setting is an RNND_* variable (docs/configuration.md); these are the image's defaults.
# The health check reads RNND_HTTP_PORT, so change the port with it rather than with a flag.
ENV PATH=/opt/rnnd/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    RNND_MODEL=/models/model.onnx RNND_HTTP_HOST=0.0.0.0 RNND_HTTP_PORT=9100
RUN groupadd --system --gid 10001 rnnd \
 && useradd --system --uid 10001 --gid rnnd --create-home --home-dir /home/rnnd --shell /usr/sbin/nologin rnnd
COPY --from=build /opt/rnnd /opt/rnnd
COPY --from=model --chown=10001:10001 /models /models
# Numeric, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
WORKDIR /home/rnnd
EXPOSE 9100
# /healthz answers while the process serves HTTP (Kafka down is /readyz's business, not a restart's).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('RNND_HTTP_PORT', '9100') + '/healthz', timeout=4)"]
ENTRYPOINT ["rnnd", "serve"]
