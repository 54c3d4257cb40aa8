"""Host synchronisations per training step, per engine: how often the step reads a device
value back to Python (`aten::_local_scalar_dense`, the op behind `.item()`, `float(t)` and
`torch.tensor([t, ...])`). On a GPU each one waits for every kernel queued before it, so a
launch-bound step (BERT-base on an H100/H200, BENCHMARKS.md) pays for each; counted on CPU,
the count is the same as on a GPU.

    python benchmarks/host_syncs.py                  # tiny BERT, 4 micro-batches of 8 x 128
    python benchmarks/host_syncs.py --size base --steps 3

Rows: `torch` (parallel.engine torch), `megatron` (the megatron engine as the factory runs
it: megatron's optimizer with factory/train/multi_tensor.py's foreach norm and scale), and
`megatron, its fallbacks` (megatron-core's own apex-less per-tensor helpers, what the engine
ran before). Each row: syncs in one `loop.train_step`, gradient tensors, median step time.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time

import cpu_bench  # beside this script; puts the repository on sys.path

log = logging.getLogger("host_syncs")


class SyntheticMaskedLM:
    """A masked-LM dataset of fixed random samples, 15% of positions masked, for the real
    batching (data.TrainData) of loop.train_step."""

    def __init__(self, vocab: int, seq: int, seed: int = 0):
        self.vocab, self.seq, self.seed = vocab, seq, seed

    def __len__(self) -> int:
        return 10**9

    def __getitem__(self, index: int) -> dict:
        import numpy as np

        rng = np.random.default_rng(self.seed + index)
        tokens = rng.integers(5, self.vocab, self.seq)
        return {"text": tokens, "labels": tokens, "loss_mask": rng.random(self.seq) < 0.15,
                "padding_mask": np.ones(self.seq, dtype=np.int64),
                "types": np.zeros(self.seq, dtype=np.int64)}


@contextlib.contextmanager
def megatron_fallbacks():
    """megatron-core's own per-tensor helpers in place of the foreach ones, for the duration."""
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.optimizer.optimizer as optimizer
    from megatron.core import utils

    saved = (clip_grads.l2_norm_impl, clip_grads.multi_tensor_scale_impl,
             optimizer.multi_tensor_scale_impl)
    clip_grads.l2_norm_impl = utils.local_multi_tensor_l2_norm
    clip_grads.multi_tensor_scale_impl = optimizer.multi_tensor_scale_impl = \
        utils.local_multi_tensor_scale
    try:
        yield
    finally:
        (clip_grads.l2_norm_impl, clip_grads.multi_tensor_scale_impl,
         optimizer.multi_tensor_scale_impl) = saved


def main() -> None:
    ap = cpu_bench.parser(__doc__, steps=7, threads=2)
    ap.add_argument("--size", default="tiny", help="BERT preset of factory/train/sizes.py")
    ap.add_argument("--vocab", type=int, default=30522)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--accumulate", type=int, default=4, help="micro-batches per step")
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args()
    cpu_bench.start(args, seed=0)

    import torch

    from factory.train import engine, loop, throughput
    from factory.train.data import TrainData
    from factory.train.models import ModelConfig, build_model, pad_vocab
    from factory.train.schedule import LRSchedule
    from factory.train.sizes import BERT_SIZES

    cfg = ModelConfig(family="bert", vocab_size=args.vocab,
                      padded_vocab_size=pad_vocab(args.vocab), max_position_embeddings=512,
                      **BERT_SIZES[args.size])
    data = TrainData("bert", SyntheticMaskedLM(args.vocab, args.seq), args.seq)
    rows = {}
    for row, name, fallbacks in (("torch", "torch", False), ("megatron", "megatron", False),
                                 ("megatron, its fallbacks", "megatron", True)):
        torch.manual_seed(0)
        model, optimizer = engine.build(build_model(cfg), engine.EngineConfig(name=name))
        loop_cfg = loop.LoopConfig(
            family="bert", total_steps=10**6, micro_batch_size=args.micro,
            global_batch_size=args.micro * args.accumulate, seq_length=args.seq,
            schedule=LRSchedule(lr=1e-4, total_steps=10**6, warmup_steps=0), engine=name)
        steps = iter(range(1, 10**6))
        with megatron_fallbacks() if fallbacks else contextlib.nullcontext():
            loop.train_step(model, optimizer, data, loop_cfg, step=next(steps))   # warm-up
            syncs = throughput.host_reads(lambda: loop.train_step(model, optimizer, data, loop_cfg,
                                                        step=next(steps)))
            times = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                loop.train_step(model, optimizer, data, loop_cfg, step=next(steps))
                times.append(time.perf_counter() - t0)
        tensors = sum(1 for p in engine.bare(model).parameters() if p.requires_grad)
        rows[row] = {"syncs_per_step": syncs, "grad_tensors": tensors,
                     "median_step_s": statistics.median(times)}
        log.info("%-24s %4d syncs/step  (%d gradient tensors)  %8.1f ms/step", row, syncs,
                 tensors, rows[row]["median_step_s"] * 1e3)
    cpu_bench.record(args, rows=rows)

if __name__ == "__main__":
    main()
