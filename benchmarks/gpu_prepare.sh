#!/usr/bin/env bash
# Prepare what benchmarks/gpu_check.sh takes, on this (networked, CPU) machine, so that the GPU
# machine, which has no network, needs nothing else:
#
#   bash benchmarks/gpu_prepare.sh [WHEELS_DIR] [INPUTS_DIR]      # default .whl .gpu_inputs
#
# WHEELS_DIR: the wheels the GPU image lacks, for its Python 3.12 (downloaded from PyPI, no
# dependencies resolved: the image's own torch and transformers stay). INPUTS_DIR: the vocab/
# and pack/ of `factory run domains/biomedical.yaml --scale smoke --until pack`, for the real
# pretrain stage on the GPU. Both are a few MB and git-ignored: copy them beside the checkout
# on the GPU machine, then `bash benchmarks/gpu_check.sh .whl OUT .gpu_inputs` there.
# PYTHON: the interpreter with the project installed (default python3); SKIP_WHEELS=1: the
# inputs only.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="${1:-$REPO/.whl}"
INPUTS="${2:-$REPO/.gpu_inputs}"
PY="${PYTHON:-python3}"

if [[ "${SKIP_WHEELS:-0}" != "1" ]]; then
  mkdir -p "$WHEELS"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    -d "$WHEELS" megatron-core==0.16.1 pydantic==2.14.4 pydantic-core==2.50.5 \
    annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
fi

# A throwaway run root: the preparation leaves no run or MLflow record behind.
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
(cd "$REPO" && env -u MLFLOW_TRACKING_URI FACTORY_RUNS_ROOT="$WORK" "$PY" -m factory.cli run \
  domains/biomedical.yaml --scale smoke --until pack --run-dir "$WORK/run")
rm -rf "$INPUTS"
mkdir -p "$INPUTS"
cp -r "$WORK/run/vocab" "$WORK/run/pack" "$INPUTS/"
[[ "${SKIP_WHEELS:-0}" == "1" ]] || echo "gpu_prepare: wheels in $WHEELS"
echo "gpu_prepare: the smoke run's vocab/ and pack/ in $INPUTS"
