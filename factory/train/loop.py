"""The training loop: micro-batches accumulated to the global batch, AdamW, clipping, metrics.

Single process here (world size 1). The data-parallel seams are in place: each rank reads its
slice of the global batch by sample index and the loss-token count is summed over the
data-parallel group; a multi-process run must still wrap the model for gradient all-reduce.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

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

    def checkpoint_steps_to_keep(self, step: int) -> set[int]:
        """The last `keep_checkpoints` interval checkpoints up to `step`, plus the final one."""
        last = step - step % self.checkpoint_interval
        keep = {last - i * self.checkpoint_interval for i in range(self.keep_checkpoints)}
        return {s for s in keep if s > 0} | {self.total_steps}


def build_optimizer(model: torch.nn.Module, lr: float, betas: tuple[float, float],
                    eps: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW without weight decay on biases and norm weights (every parameter under 2-D)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)


def forward_loss(model: torch.nn.Module, family: str, batch: dict[str, torch.Tensor]
                 ) -> torch.Tensor:
    """Per-token loss [b, s] from megatron's forward."""
    if family == "bert":
        return model(batch["tokens"], batch["attention_mask"], tokentype_ids=batch["types"],
                     lm_labels=batch["labels"], loss_mask=batch["loss_mask"])
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
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=device)
    for batch in micro:
        per_token = forward_loss(model, cfg.family, batch)
        summed = (per_token.float() * batch["loss_mask"]).sum()
        (summed / n_tokens).backward()
        loss_sum += summed.detach()
    if dp_group is not None:
        dist.all_reduce(loss_sum, group=dp_group)

    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    max_norm = cfg.clip_grad if cfg.clip_grad > 0 else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    optimizer.step()
    return {"loss": float(loss_sum / n_tokens), "lr": lr, "grad_norm": grad_norm}


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: TrainData,
          cfg: LoopConfig, *, start_step: int, metrics_path: Path,
          on_metrics: Callable[[int, dict[str, float]], None],
          on_checkpoint: Callable[[int], None], track: Any = None) -> None:
    """Steps start_step+1 .. total_steps; one metrics.jsonl line per step, then checkpoints."""
    tokens_per_step = cfg.global_batch_size * cfg.seq_length
    log.info("training steps %d..%d: %d micro-batches of %d per step", start_step + 1,
             cfg.total_steps, cfg.global_batch_size // cfg.micro_batch_size, cfg.micro_batch_size)
    with open(metrics_path, "a", encoding="utf-8") as f:
        for step in range(start_step + 1, cfg.total_steps + 1):
            t0 = time.perf_counter()
            m = train_step(model, optimizer, data, cfg, step)
            dt = time.perf_counter() - t0
            if not math.isfinite(m["loss"]):
                raise FloatingPointError(f"step {step}: loss is {m['loss']}; lower training.lr "
                                         "or raise schedule warmup")
            m.update(tokens_per_s=tokens_per_step / dt, tokens=float(step * tokens_per_step))
            f.write(json.dumps({"step": step, **m}) + "\n")
            f.flush()
            on_metrics(step, m)
            if track is not None:
                track.advance(1, loss=m["loss"], lr=m["lr"])
            if step % cfg.checkpoint_interval == 0 or step == cfg.total_steps:
                on_checkpoint(step)


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
