"""Host time per training step: BERT-base's depth (12 layers) at a width where the arithmetic
is negligible, so the step time is what Python and the dispatcher cost, the part that bounds
BERT-base on an H200 (BENCHMARKS.md). Ours against HF BertForMaskedLM, and ours on
megatron-core's own tensor-parallel autograd functions (the A side of factory/train/plain_tp.py).

    python benchmarks/host_time.py                   # 12 x 64, batch 2 x 16, 1 thread
    python benchmarks/host_time.py --layers 24 --json out.json

Rows: `hf`, `megatron` (our training path with the SDPA core attention, the GPU path),
`megatron-its-tp-ops` (the same model built alike, stepped on megatron's own linear, region
and loss autograd functions).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("host_time")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--steps", type=int, default=40, help="timed steps per row")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import torch

    from factory.train import parallel, throughput
    from factory.train.models import ModelConfig

    torch.set_num_threads(args.threads)
    parallel.init()
    cfg = ModelConfig(family="bert", vocab_size=1024, padded_vocab_size=1024,
                      max_position_embeddings=512, num_layers=args.layers,
                      hidden_size=args.hidden, num_attention_heads=2,
                      ffn_hidden_size=4 * args.hidden)
    runners = throughput.bert_runners(cfg, args.batch, args.seq, "fp32", backends=("sdpa",),
                                      extra={"its-tp-ops": lambda model: None})
    runners["megatron-its-tp-ops"] = throughput.on_megatron_tp_ops(
        runners["megatron-its-tp-ops"])
    medians = throughput.time_interleaved(runners, args.steps, warmup=5)
    hf = medians["hf"]
    for name, m in medians.items():
        log.info("%-22s %7.2f ms/step  (%.3fx HF)", name, m * 1e3, m / hf)
    if args.json:
        args.json.write_text(json.dumps({
            "config": {k: v for k, v in vars(args).items() if k != "json"},
            "median_step_s": medians}, indent=2) + "\n")


if __name__ == "__main__":
    main()
