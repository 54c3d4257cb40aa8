#!/usr/bin/env bash
# The GPU check of the pretraining engine, at most ~8 minutes on one H100/H200, offline.
#
#   bash benchmarks/gpu_check.sh WHEELS_DIR [OUT_DIR] [SMOKE_RUN_DIR]
#
# The GPU machines have no network, their own Python 3.12 and torch (2.11, CUDA 13), and no
# Transformer Engine or apex. This script keeps that torch and installs only what the image
# lacks, from WHEELS_DIR (no index, no dependencies resolved, into a private --target folder
# put first on PYTHONPATH); the project itself runs from this checkout. SMOKE_RUN_DIR
# (optional): the vocab/ and pack/ of `factory run domains/biomedical.yaml --scale smoke
# --until pack`, for the real pretrain stage on the GPU. `bash benchmarks/gpu_prepare.sh`
# makes both on a networked machine (.whl and .gpu_inputs).
#
# What it checks and measures: benchmarks/gpu_check.py. Results: OUT_DIR/gpu_check.json,
# OUT_DIR/gpt_profile.txt and the log on stdout. Record them in BENCHMARKS.md.
#
# DRY_RUN=1 runs the same Python on CPU at toy sizes without touching the environment (to
# check the script itself on a machine without a GPU).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="${1:-${WHEELS:-}}"
OUT="${2:-${OUT:-$REPO/benchmarks/gpu_results}}"
INPUTS="${3:-}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"

if [[ "${DRY_RUN:-0}" != "1" ]]; then
  "$PY" - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device visible"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}")
PY
  if [[ -n "$WHEELS" ]]; then
    [[ -d "$WHEELS" ]] || { echo "gpu_check: wheels folder $WHEELS not found" >&2; exit 2; }
    SITE="$(mktemp -d)/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
      "$WHEELS"/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  fi
  "$PY" -c "import megatron.core, pydantic, yaml, transformers, tokenizers, safetensors" \
    || { echo "gpu_check: packages missing; pass a WHEELS_DIR holding them" >&2; exit 2; }
fi

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cd "$REPO"
timeout "${GPU_CHECK_TIMEOUT:-480}" "$PY" benchmarks/gpu_check.py "$OUT" \
  ${INPUTS:+--inputs "$INPUTS"}
