"""CPU training-step time: the factory's megatron-core BERT vs Hugging Face BertForMaskedLM.

Same dimensions, batch, sequence length, masking and optimizer (AdamW, clipping); one step =
forward, backward, optimizer step. The implementations take turns step by step (load from
other processes hits them alike); the report is the median over the timed steps
(factory/train/throughput.py).

    python benchmarks/cpu_step_time.py                      # tiny BERT, vocab 30,522
    python benchmarks/cpu_step_time.py --size smoke --vocab 2048 --steps 40
    python benchmarks/cpu_step_time.py --compiled

Rows: `hf` (BertForMaskedLM, its default SDPA attention, MLM head over every position),
`megatron` (our training path: local attention, MLM head over the masked positions only),
`megatron-sdpa` (the same with the SDPA core attention, the GPU path), `megatron-fullhead`
(the head over every position, as HF does), `megatron-engine` (the training path under
`parallel.engine: megatron`: DDP grad buffers and megatron's optimizer, fp32); with
--compiled `hf-compiled` and `megatron-compiled` (torch.compile'd layers, training.compile).
"""

from __future__ import annotations

import logging

import cpu_bench  # beside this script; puts the repository on sys.path

log = logging.getLogger("cpu_step_time")


def main() -> None:
    ap = cpu_bench.parser(__doc__, steps=15, threads=2, compiled=True)
    ap.add_argument("--size", default="tiny", help="BERT preset of factory/train/sizes.py")
    ap.add_argument("--vocab", type=int, default=30522)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    cpu_bench.start(args)

    from factory.train import throughput
    from factory.train.models import ModelConfig, pad_vocab
    from factory.train.sizes import BERT_SIZES

    cfg = ModelConfig(family="bert", vocab_size=args.vocab,
                      padded_vocab_size=pad_vocab(args.vocab), max_position_embeddings=512,
                      **BERT_SIZES[args.size])
    runners = throughput.bert_runners(cfg, args.batch, args.seq, "fp32",
                                      backends=("local", "sdpa"), full_head=True,
                                      megatron_engine="fp32", compiled=args.compiled)
    medians = throughput.time_interleaved(runners, args.steps, args.warmup)
    hf = medians["hf"]
    for name, m in medians.items():
        log.info("%-18s %8.1f ms/step  (%.3fx HF)", name, m * 1e3, m / hf)
    cpu_bench.record(args, median_step_s=medians,
                     ratio_to_hf={name: m / hf for name, m in medians.items()})

if __name__ == "__main__":
    main()
