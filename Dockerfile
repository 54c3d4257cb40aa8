# The factory's GPU-cluster image: NVIDIA NGC PyTorch (torch, apex, Transformer Engine and NCCL
# built together by NVIDIA) plus the factory and its non-torch dependencies.
#
#   docker build -t factory:0.1.0 .
#   docker run --gpus all --rm factory:0.1.0 run /workspace/domains/biomedical.yaml --scale tiny
#
# torch is never reinstalled or upgraded here: pip resolves against constraints that pin the
# base image's own builds (deploy/image_requirements.py), and the build fails if one would move.
FROM nvcr.io/nvidia/pytorch:25.04-py3

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/factory

# Dependency layer: depends only on pyproject.toml, so a code change does not reinstall it.
COPY pyproject.toml deploy/image_requirements.py ./
RUN python image_requirements.py requirements pyproject.toml --extra gpu > /tmp/requirements.txt \
 && python image_requirements.py constraints > /tmp/constraints.txt \
 && pip install --no-cache-dir -c /tmp/constraints.txt -r /tmp/requirements.txt \
 && python image_requirements.py constraints | diff /tmp/constraints.txt - \
 && rm /tmp/requirements.txt

# The code: the package itself only (its dependencies are all in the layer above).
COPY README.md ./
COPY factory ./factory
COPY tokenization ./tokenization
COPY pipelines ./pipelines
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
 && rm -rf build ./*.egg-info

# Manifests and their embedded samples: `factory run /workspace/domains/<domain>.yaml`.
COPY domains /workspace/domains

# pyxis and apptainer run as the calling cluster user; docker runs as this one.
ARG UID=10001
RUN useradd --no-log-init --create-home --uid "${UID}" factory \
 && mkdir -p /workspace/runs \
 && chown -R factory /workspace
USER ${UID}
WORKDIR /workspace
ENV FACTORY_RUNS_ROOT=/workspace/runs \
    HF_HOME=/home/factory/.cache/huggingface

ENTRYPOINT ["factory"]
CMD ["--help"]
