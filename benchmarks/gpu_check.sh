#!/usr/bin/env bash
# The GPU check of the pretraining engine, at most ~8 minutes on one H100/H200, offline.
#
#   bash benchmarks/gpu_check.sh WHEELS_DIR [OUT_DIR]
#
# The GPU machines have no network, their own Python 3.12 and torch (2.11, CUDA 13), and no
# Transformer Engine or apex. This script keeps that torch (a venv with system site
# packages), installs what is missing from WHEELS_DIR only (pip --no-index; prepare it on a
# networked machine with `pip download --only-binary=:all: --python-version 3.12
# --platform manylinux2014_x86_64 --no-deps megatron-core==0.16.1 psutil pydantic
# pydantic-core annotated-types typing-inspection transformers tokenizers safetensors
# huggingface-hub hf-xet regex pyyaml tqdm packaging filelock fsspec numpy -d WHEELS_DIR`),
# installs this project with --no-deps, and downloads nothing. Then it checks, on the GPU:
#   0. GPU vs CPU: the tiny BERT and GPT (SDPA attention on GPU, fp32, TF32 off) against
#      their exported Hugging Face twins on CPU: logits within 1e-3; bf16 autocast within 1.0
#      (a smoke bound: bf16's spacing at BERT's -100 padded-vocabulary bias is 0.5).
#   a. a ~1B Llama-style GPT (Llama-3.2-1B shape, vocab 32,768), sequence 2048, bf16:
#      tokens/s and MFU of the training loop's step.
#   b. BERT-base masked LM (vocab 30,522, sequence 128): tokens/s of our step vs HF
#      BertForMaskedLM (SDPA attention) with the same dimensions, batch, sequence, bf16 and
#      AdamW on the same GPU.
# Results: OUT_DIR/gpu_check.json (and the log on stdout). Record them in BENCHMARKS.md.
#
# DRY_RUN=1 runs the same Python on CPU at toy sizes without touching the environment (to
# check the script itself on a machine without a GPU).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="${1:-${WHEELS:-}}"
OUT="${2:-${OUT:-$REPO/benchmarks/gpu_results}}"
mkdir -p "$OUT"

if [[ "${DRY_RUN:-0}" != "1" ]]; then
  PY="${PYTHON:-python3}"
  VENV="$(mktemp -d)/venv"
  "$PY" -m venv --system-site-packages "$VENV"
  # shellcheck disable=SC1091
  source "$VENV/bin/activate"
  python - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device visible"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}")
PY
  missing=()
  for pair in megatron.core:megatron-core psutil:psutil pydantic:pydantic yaml:pyyaml \
              transformers:transformers tokenizers:tokenizers safetensors:safetensors \
              numpy:numpy; do
    python -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair##*:}")
  done
  if ((${#missing[@]})); then
    [[ -n "$WHEELS" && -d "$WHEELS" ]] || { echo "missing ${missing[*]} and no WHEELS_DIR" >&2; exit 2; }
    # Their dependencies come from the same folder, never from the network.
    pip install --no-index --find-links "$WHEELS" "${missing[@]}"
  fi
  pip install --no-index --no-deps --no-build-isolation -e "$REPO" >/dev/null 2>&1 \
    || export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi

cd "$REPO"
timeout "${GPU_CHECK_TIMEOUT:-480}" python - "$OUT" <<'PY'
import json, logging, os, sys, tempfile, time
from pathlib import Path

import torch

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
log = logging.getLogger("gpu_check")
out_dir = Path(sys.argv[1])
dry = os.environ.get("DRY_RUN") == "1"
torch.backends.cuda.matmul.allow_tf32 = False   # the exactness check compares fp32 to fp32
torch.backends.cudnn.allow_tf32 = False

from factory.train import attention, loop, parallel, throughput
from factory.train.convert import save_hf
from factory.train.export import max_logit_difference
from factory.train.models import ModelConfig, build_model, pad_vocab
from factory.train.sizes import BERT_SIZES, GPT_SIZES

parallel.init()
dev = throughput.device()
# On CPU megatron's linear layers have no bf16 backward (see factory/train/loop.py).
precision = "fp32" if dry else "bf16"
results = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "torch": torch.__version__, "attention_backend": attention.backend(),
           "peak_flops_per_s": loop.peak_flops_per_s()}
log.info("%s", results)


def save():
    (out_dir / "gpu_check.json").write_text(json.dumps(results, indent=2) + "\n")


# 0. GPU (SDPA) vs the HF twin on CPU.
for fam, dims in (("bert", BERT_SIZES["smoke"]), ("gpt", GPT_SIZES["smoke"])):
    cfg = ModelConfig(family=fam, vocab_size=1000, padded_vocab_size=pad_vocab(1000),
                      max_position_embeddings=128, hidden_dropout=0.0, attention_dropout=0.0,
                      **({"layernorm_epsilon": 1e-5} if fam == "gpt" else {}), **dims)
    torch.manual_seed(0)
    model = build_model(cfg).to(dev).eval()
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(model, cfg, None, Path(tmp))
        with torch.no_grad():
            fp32 = max_logit_difference(model, cfg, Path(tmp))
            with loop.autocast("bf16", dev):
                bf16 = max_logit_difference(model, cfg, Path(tmp))
    results[f"check_{fam}"] = {"max_abs_logit_diff_fp32": fp32, "max_abs_logit_diff_bf16": bf16,
                               "ok": fp32 < 1e-3 and bf16 < 1.0}
    log.info("check %s: fp32 %.2e, bf16 %.2e", fam, fp32, bf16)
save()

# a. ~1B GPT, sequence 2048, bf16.
seq, micro, steps = (64, 2, 3) if dry else (2048, int(os.environ.get("GPT_MICRO", 4)), 10)
dims = GPT_SIZES["smoke" if dry else "1b"]
vocab = 1000 if dry else 32768
cfg = ModelConfig(family="gpt", vocab_size=vocab, padded_vocab_size=pad_vocab(vocab),
                  max_position_embeddings=seq, hidden_dropout=0.0, attention_dropout=0.0,
                  layernorm_epsilon=1e-5, tie_embeddings=False, **dims)
try:
    runner = throughput.gpt_runner(cfg, micro, seq, precision)
    t = throughput.time_interleaved({"gpt": runner}, steps, warmup=3)["gpt"]
    tps = micro * seq / t
    flops = loop.flops_per_token(cfg.num_layers, cfg.hidden_size, seq, cfg.matmul_parameters())
    peak = loop.peak_flops_per_s()
    results["gpt_1b"] = {"params": cfg.matmul_parameters() + cfg.padded_vocab_size * cfg.hidden_size,
                         "seq": seq, "micro_batch": micro, "step_s": t, "tokens_per_s": tps,
                         "mfu": tps * flops / peak if peak else None,
                         "max_memory_gib": (torch.cuda.max_memory_allocated() / 2**30
                                            if torch.cuda.is_available() else None)}
    log.info("gpt 1b: %s", results["gpt_1b"])
    del runner
except torch.OutOfMemoryError as e:
    results["gpt_1b"] = {"error": f"out of memory at micro batch {micro}: {e}"[:300]}
if torch.cuda.is_available():
    torch.cuda.empty_cache()
save()

# b. BERT-base MLM vs HF BertForMaskedLM (SDPA), same everything.
seq, batch, steps = (32, 4, 3) if dry else (128, int(os.environ.get("BERT_BATCH", 128)), 20)
cfg = ModelConfig(family="bert", vocab_size=30522, padded_vocab_size=pad_vocab(30522),
                  max_position_embeddings=512, **BERT_SIZES["smoke" if dry else "base"])
backends = ("sdpa", "local") if not dry else ("sdpa",)
runners = throughput.bert_runners(cfg, batch, seq, precision, backends=backends,
                                  full_head=True)
med = throughput.time_interleaved(runners, steps, warmup=3)
results["bert_base"] = {"seq": seq, "batch": batch,
                        "tokens_per_s": {k: batch * seq / v for k, v in med.items()},
                        "speedup_vs_hf": {k: med["hf"] / v for k, v in med.items()}}
log.info("bert base: %s", results["bert_base"])
save()
print(json.dumps(results, indent=2))
PY
