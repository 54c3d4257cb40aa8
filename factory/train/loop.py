"""The training loop: micro-batches accumulated to the global batch, AdamW, clipping, metrics.

Runs alone or on every rank of a torchrun job. Data parallel: each rank reads its slice of
the global batch by sample index, the loss is a mean over the loss tokens of the whole global
batch (their count is summed over the data-parallel group first), so each rank's gradients are
partial sums and one coalesced SUM all-reduce makes them the single-process gradients. Tensor
parallel: megatron's layers communicate inside forward/backward; the grad norm counts every
parameter once (a TP-duplicated norm weight once, a sharded matrix's shards summed over the
model-parallel group), so clipping matches TP=1. Only global rank 0 writes metrics.jsonl.

Engines (factory/train/engine.py): with `torch` this module reduces, clips and steps; with
`megatron` the gradients sit in megatron DDP's buffers (reduced during the last micro-batch's
backward) and megatron's optimizer clips and steps.

bf16, torch engine: torch autocast over fp32 master weights. GPU only: megatron's linear
layers restore the autocast state in backward through torch.amp.custom_bwd(device_type="cuda"),
so on CPU their backward meets a bf16 gradient and an fp32 weight and fails. bf16, megatron
engine: the parameters themselves are bf16 (no autocast), which runs on CPU as well.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from factory.train.data import TrainData
from factory.train.schedule import LRSchedule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopConfig:
    family: str
    total_steps: int
    global_batch_size: int
    micro_batch_size: int
    seq_length: int
    schedule: LRSchedule
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    checkpoint_interval: int = 100
    keep_checkpoints: int = 2
    precision: Literal["fp32", "bf16"] = "fp32"
    engine: Literal["torch", "megatron"] = "torch"     # factory/train/engine.py
    flops_per_token: float | None = None    # training FLOPs per token, for MFU (GPU only)
    eval_interval: int | None = None        # steps between held-out evaluations; None: none
    eval_samples: int = 0                   # a multiple of global_batch_size

    def checkpoint_steps_to_keep(self, step: int) -> set[int]:
        """The last `keep_checkpoints` interval checkpoints up to `step`, plus the final one."""
        last = step - step % self.checkpoint_interval
        keep = {last - i * self.checkpoint_interval for i in range(self.keep_checkpoints)}
        return {s for s in keep if s > 0} | {self.total_steps}


def forward_loss(model: torch.nn.Module, family: str, batch: dict[str, torch.Tensor]
                 ) -> torch.Tensor:
    """Per-token loss [b, s] from megatron's forward."""
    if family == "bert":
        return model(batch["tokens"], batch["attention_mask"], tokentype_ids=batch["types"],
                     lm_labels=batch["labels"], loss_mask=batch["loss_mask"],
                     masked_positions=batch.get("masked_positions"))
    # Causal attention builds its own mask when none is given.
    return model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])


def _dp() -> tuple[int, int, Any]:
    """(data-parallel rank, size, group): (0, 1, None) outside a multi-process run."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return 0, 1, None
    from megatron.core import parallel_state

    return (parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size(),
            parallel_state.get_data_parallel_group())


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: TrainData,
               cfg: LoopConfig, step: int) -> dict[str, float]:
    """One optimizer step (1-based); returns loss (token-weighted mean), lr, grad_norm."""
    import torch.distributed as dist

    dp_rank, dp_size, dp_group = _dp()
    per_rank = cfg.global_batch_size // dp_size
    first = (step - 1) * cfg.global_batch_size + dp_rank * per_rank
    device = _device()
    micro = [{k: v.to(device, non_blocking=True)
              for k, v in data.batch(first + i, cfg.micro_batch_size).items()}
             for i in range(0, per_rank, cfg.micro_batch_size)]

    # The loss is a mean over every loss token of the global batch, so each micro-batch's sum
    # is divided by the global count, known before the first backward.
    n_tokens = torch.stack([b["loss_mask"].sum() for b in micro]).sum()
    if dp_group is not None:
        dist.all_reduce(n_tokens, group=dp_group)
    n_tokens = n_tokens.clamp_min(1.0)

    lr = cfg.schedule(step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    model.train()
    megatron = cfg.engine == "megatron"
    if megatron:
        model.zero_grad_buffer()
    optimizer.zero_grad(set_to_none=True)
    # megatron's DDP divides every gradient by the data-parallel size before summing; the
    # loss is already a global mean, so each rank's share is scaled back up.
    scale = dp_size if megatron else 1
    if _pipeline_size() > 1:
        loss_sum = _pipeline_forward_backward(model, micro, cfg, n_tokens / scale, device)
    else:
        loss_sum = torch.zeros((), device=device)
        for i, batch in enumerate(micro):
            # megatron's buckets reduce during the last micro-batch's backward only.
            sync = contextlib.nullcontext() if not megatron or i == len(micro) - 1 else \
                model.no_sync()
            with sync:
                with autocast(cfg.precision if not megatron else "fp32", device):
                    per_token = forward_loss(model, cfg.family, batch)
                summed = (per_token.float() * batch["loss_mask"]).sum()
                (summed * scale / n_tokens).backward()
            loss_sum += summed.detach()
        if megatron:
            # The data-parallel reduce and what else megatron sums after backward
            # (Megatron-LM's step calls it too; the pipeline schedule calls it itself).
            from megatron.core.distributed.finalize_model_grads import finalize_model_grads

            finalize_model_grads([model])
    if dp_group is not None:
        dist.all_reduce(loss_sum, group=dp_group)
    if megatron:
        # Clipping, the norm (each parameter once across model-parallel ranks) and the
        # update of the fp32 main weights happen inside megatron's optimizer.
        _, grad_norm, _ = optimizer.step()
        return {"loss": float(loss_sum / n_tokens), "lr": lr, "grad_norm": float(grad_norm)}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    _sum_sequence_parallel_grads(params)
    if dp_group is not None:
        all_reduce_grads(params, dp_group)
    grad_norm = clip_grad_norm(params, cfg.clip_grad)
    optimizer.step()
    return {"loss": float(loss_sum / n_tokens), "lr": lr, "grad_norm": float(grad_norm)}


def evaluate(model: torch.nn.Module, data: TrainData, cfg: LoopConfig, name: str = "val"
             ) -> dict[str, float]:
    """NAME_loss (token-weighted mean, as the training loss) and NAME_ppl over samples
    [0, cfg.eval_samples) of `data`, dropout off, no gradients, split over the data-parallel
    ranks like a training step. Reads no random state, so training continues as if it had
    not run (resume stays exact)."""
    import torch.distributed as dist

    dp_rank, dp_size, dp_group = _dp()
    per_rank = cfg.eval_samples // dp_size
    device = _device()
    micro = [{k: v.to(device, non_blocking=True)
              for k, v in data.batch(dp_rank * per_rank + i, cfg.micro_batch_size).items()}
             for i in range(0, per_rank, cfg.micro_batch_size)]
    model.eval()
    try:
        with torch.no_grad():
            if _pipeline_size() > 1:
                loss_sum = _pipeline_forward_backward(model, micro, cfg, None, device)
            else:
                loss_sum = torch.zeros((), device=device)
                for batch in micro:
                    with autocast(cfg.precision if cfg.engine == "torch" else "fp32", device):
                        per_token = forward_loss(model, cfg.family, batch)
                    loss_sum += (per_token.float() * batch["loss_mask"]).sum()
    finally:
        model.train()
    totals = torch.stack([loss_sum.float(), sum(b["loss_mask"].sum() for b in micro)])
    if dp_group is not None:
        dist.all_reduce(totals, group=dp_group)
    loss = float(totals[0] / totals[1].clamp_min(1.0))
    return {f"{name}_loss": loss, f"{name}_ppl": math.exp(min(loss, 50.0))}


def _pipeline_size() -> int:
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_pipeline_model_parallel_world_size()


def _pipeline_forward_backward(model: torch.nn.Module, micro: list[dict[str, torch.Tensor]],
                               cfg: LoopConfig, n_tokens: torch.Tensor | None,
                               device: torch.device) -> torch.Tensor:
    """Forward and backward of every micro-batch through megatron's 1F1B pipeline schedule
    (interleaved over the model chunks when there are several); the step's summed loss on
    every pipeline rank (only the last stage computes it). n_tokens None: forward only
    (evaluation).

    Every rank holds the same micro-batches: the first stage reads the tokens, the last the
    labels and loss mask, the stages between receive activations from the previous one.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(batches, stage_model):
        batch = next(batches)
        with autocast(cfg.precision if cfg.engine == "torch" else "fp32", device):
            out = forward_loss(stage_model, cfg.family, batch)  # hidden states before the last

        def loss(per_token):
            summed = (per_token.float() * batch["loss_mask"]).sum()
            if n_tokens is None:    # the schedule divides what it gets in place: a copy
                return summed.clone(), {"loss_sum": summed.detach()}
            # The schedule divides by the micro-batch count; the loss is the global mean.
            return summed * len(micro) / n_tokens, {"loss_sum": summed.detach()}

        return out, loss

    from factory.train.chunks import chunks_of

    chunks = chunks_of(model)      # interleaved: each chunk reads the micro-batches in order
    stored = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=[iter(micro) for _ in chunks],
        model=chunks, num_microbatches=len(micro), seq_length=cfg.seq_length,
        micro_batch_size=cfg.micro_batch_size, forward_only=n_tokens is None)
    loss_sum = torch.stack([s["loss_sum"] for s in stored]).sum() if stored else \
        torch.zeros((), device=device)
    dist.all_reduce(loss_sum, group=parallel_state.get_pipeline_model_parallel_group())
    if cfg.engine == "torch" and n_tokens is not None:
        _sync_shared_embeddings(model)  # megatron's finalize_model_grads did it on its buffers
    return loss_sum


def _sync_shared_embeddings(model: torch.nn.Module) -> None:
    """Tied embeddings across pipeline stages: the first stage's input embedding and the last
    stage's output layer are one weight held twice; sum their gradients (megatron's
    `_allreduce_word_embedding_grads`, without its DDP buffers)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    shared = [p for p in model.parameters() if getattr(p, "shared_embedding", False)]
    if not shared or not parallel_state.is_rank_in_embedding_group():
        return
    group = parallel_state.get_embedding_group()
    for p in shared:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, group=group)


def _sum_sequence_parallel_grads(params: list[torch.nn.Parameter]) -> None:
    """Sequence parallel: a norm (or row-parallel bias) sees 1/TP of the sequence on each
    tensor-parallel rank, so its gradient there is a part; sum the parts (megatron's
    `_allreduce_non_tensor_model_parallel_grads` does this for the megatron engine)."""
    from megatron.core import parallel_state

    marked = [p for p in params if getattr(p, "sequence_parallel", False)]
    if not marked or parallel_state.get_tensor_model_parallel_world_size() == 1:
        return
    all_reduce_grads(marked, parallel_state.get_tensor_model_parallel_group())


def autocast(precision: str, device: torch.device):
    """bf16: torch autocast (matmuls in bf16, fp32 weights and reductions); fp32: nothing."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def all_reduce_grads(params: list[torch.nn.Parameter], group: Any) -> None:
    """SUM-all-reduce every gradient over `group`, coalesced into one buffer per dtype."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    for p in params:
        if p.grad is None:      # every rank must send the same layout
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=group)
        for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
            g.copy_(synced)


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """The global L2 grad norm (every parameter counted once across model-parallel ranks),
    and the gradients scaled down to `max_norm` when above it (0 = no clipping). The norm
    stays on the device: read before the optimizer step, it would stall a GPU's queue there."""
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    own = [p.grad for p in params if p.grad is not None and _counts_here(p)]
    device = grads[0].device
    sq = (torch.stack(torch._foreach_norm([g.float() for g in own])).pow(2).sum()
          if own else torch.zeros((), device=device))
    mp_group = _model_parallel_group()
    if mp_group is not None:
        dist.all_reduce(sq, group=mp_group)
    norm = sq.sqrt()
    if max_norm > 0:
        # torch.nn.utils.clip_grad_norm_'s rule: scale by max_norm / (norm + 1e-6), capped at 1.
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coef.to(grads[0].dtype))
    return norm


def _counts_here(p: torch.nn.Parameter) -> bool:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    if not parallel_state.model_parallel_is_initialized():
        return True
    # The last pipeline stage's copy of a tied embedding (`shared`) is counted on the first.
    return param_is_not_tensor_parallel_duplicate(p) and not getattr(p, "shared", False)


def _model_parallel_group():
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not dist.is_initialized() or not parallel_state.model_parallel_is_initialized():
        return None
    if parallel_state.get_tensor_model_parallel_world_size() * \
            parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return None
    return parallel_state.get_model_parallel_group()


def is_writer() -> bool:
    """True on the one process that writes run files (global rank 0, or a lone process)."""
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: TrainData,
          cfg: LoopConfig, *, start_step: int, metrics_path: Path,
          on_metrics: Callable[[int, dict[str, float]], None],
          on_checkpoint: Callable[[int], None], track: Any = None,
          eval_data: dict[str, TrainData] | None = None) -> None:
    """Steps start_step+1 .. total_steps; one metrics.jsonl line per step (on evaluation
    steps with NAME_loss and NAME_ppl per `eval_data` entry NAME: data), then checkpoints."""
    tokens_per_step = cfg.global_batch_size * cfg.seq_length
    _, dp_size, _ = _dp()
    log.info("training steps %d..%d: %d micro-batches of %d per step on each of %d "
             "data-parallel ranks", start_step + 1, cfg.total_steps,
             cfg.global_batch_size // (cfg.micro_batch_size * dp_size), cfg.micro_batch_size,
             dp_size)
    peak = peak_flops_per_s() if cfg.flops_per_token else None
    writer = is_writer()
    with (open(metrics_path, "a", encoding="utf-8") if writer
          else contextlib.nullcontext()) as f:
        for step in range(start_step + 1, cfg.total_steps + 1):
            t0 = time.perf_counter()
            m = train_step(model, optimizer, data, cfg, step)
            dt = time.perf_counter() - t0
            if not math.isfinite(m["loss"]):
                raise FloatingPointError(f"step {step}: loss is {m['loss']}; lower training.lr "
                                         "or raise schedule warmup")
            m.update(tokens_per_s=tokens_per_step / dt, tokens=float(step * tokens_per_step))
            if peak:
                m["mfu"] = m["tokens_per_s"] * cfg.flops_per_token / (peak * _world())
            if eval_data and cfg.eval_interval and \
                    (step % cfg.eval_interval == 0 or step == cfg.total_steps):
                for name, held in eval_data.items():
                    m.update(evaluate(model, held, cfg, name))
            if writer:
                f.write(json.dumps({"step": step, **m}) + "\n")
                f.flush()
                on_metrics(step, m)
                if track is not None:
                    track.advance(1, loss=m["loss"], lr=m["lr"])
            if step % cfg.checkpoint_interval == 0 or step == cfg.total_steps:
                on_checkpoint(step)


def flops_per_token(num_layers: int, hidden_size: int, seq_length: int,
                    dense_parameters: int) -> float:
    """Training FLOPs per token: 6 per weight (forward + backward) plus attention's
    12 * layers * hidden * seq (Chowdhery et al. 2022, PaLM, appendix B)."""
    return 6.0 * dense_parameters + 12.0 * num_layers * hidden_size * seq_length


# Dense bf16 tensor-core peaks (vendor datasheets), FLOP/s per GPU.
_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops_per_s() -> float | None:
    """This GPU's bf16 peak (FACTORY_PEAK_TFLOPS overrides); None on CPU or an unknown card."""
    import os

    if os.environ.get("FACTORY_PEAK_TFLOPS"):
        return float(os.environ["FACTORY_PEAK_TFLOPS"]) * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in _PEAKS.items() if k in name), None)


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def read_metrics(metrics_path: Path, up_to: int | None = None) -> list[dict[str, float]]:
    """The per-step lines of metrics.jsonl with step <= up_to (all when None)."""
    if not metrics_path.is_file():
        return []
    rows = []
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:      # a line cut short by a kill
            continue
        if up_to is None or row["step"] <= up_to:
            rows.append(row)
    return rows


def truncate_metrics(metrics_path: Path, up_to: int) -> list[dict[str, float]]:
    """Keep only steps <= up_to (the resumed checkpoint); returns those rows."""
    rows = read_metrics(metrics_path, up_to)
    tmp = metrics_path.with_name(metrics_path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(metrics_path)
    return rows
