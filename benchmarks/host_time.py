"""Host time per training step: BERT-base's depth (12 layers) at a width where the arithmetic
is negligible, so the step time is what Python and the dispatcher cost, the part that bounds
BERT-base on an H200 (BENCHMARKS.md). Ours against HF BertForMaskedLM, and ours on
megatron-core's own tensor-parallel autograd functions (the A side of factory/train/plain_tp.py).

    python benchmarks/host_time.py                   # 12 x 64, batch 2 x 16, 1 thread
    python benchmarks/host_time.py --layers 24 --json out.json
    python benchmarks/host_time.py --compiled        # + both with torch.compile'd layers

Rows: `hf`, `megatron` (our training path with the SDPA core attention, the GPU path),
`megatron-its-tp-ops` (the same model built alike, stepped on megatron's own linear, region
and loss autograd functions); with --compiled `hf-compiled` and `megatron-compiled` (every
transformer layer under torch.compile, training.compile; on CPU inductor's C++ kernels).
"""

from __future__ import annotations

import logging

import cpu_bench  # beside this script; puts the repository on sys.path

log = logging.getLogger("host_time")


def main() -> None:
    ap = cpu_bench.parser(__doc__, steps=40, threads=1, compiled=True)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=16)
    args = ap.parse_args()
    cpu_bench.start(args)

    from factory.train import throughput
    from factory.train.models import ModelConfig

    cfg = ModelConfig(family="bert", vocab_size=1024, padded_vocab_size=1024,
                      max_position_embeddings=512, num_layers=args.layers,
                      hidden_size=args.hidden, num_attention_heads=2,
                      ffn_hidden_size=4 * args.hidden)
    runners = throughput.bert_runners(cfg, args.batch, args.seq, "fp32", backends=("sdpa",),
                                      extra={"its-tp-ops": lambda model: None},
                                      compiled=args.compiled)
    runners["megatron-its-tp-ops"] = throughput.on_megatron_tp_ops(
        runners["megatron-its-tp-ops"])
    medians = throughput.time_interleaved(runners, args.steps, warmup=5)
    hf = medians["hf"]
    for name, m in medians.items():
        log.info("%-22s %7.2f ms/step  (%.3fx HF)", name, m * 1e3, m / hf)
    cpu_bench.record(args, median_step_s=medians)

if __name__ == "__main__":
    main()
