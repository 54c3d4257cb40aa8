"""The training engine: who reduces gradients over data-parallel ranks and who updates weights.

`parallel.engine: auto` (the default) picks one per run (resolve).

torch: fp32 weights, torch AdamW (fused on GPU), bf16 as torch autocast, gradients
all-reduced in one coalesced call after the last micro-batch (loop.all_reduce_grads), the
clipping norm computed by the loop. Measured on an H200 (BENCHMARKS.md).

megatron: Megatron-LM's own recipe. megatron-core's DistributedDataParallel accumulates the
gradients in contiguous fp32 buckets and starts each bucket's all-reduce (reduce-scatter with
the distributed optimizer) while backward still runs; megatron's optimizer keeps fp32 main
weights beside bf16 parameters (Float16Module, Megatron-LM's `--bf16`) and, with the
distributed optimizer, shards main weights and Adam moments over the data-parallel ranks
(ZeRO-1). Its state goes to dist_checkpointing, so a resumed run may change its layout.

Both engines give the same step: the loss is the mean over the global batch's loss tokens,
AdamW without weight decay on biases and norms, the clipping rule of
torch.nn.utils.clip_grad_norm_.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch


@dataclass(frozen=True)
class EngineConfig:
    name: Literal["torch", "megatron"] = "torch"
    precision: Literal["fp32", "bf16"] = "fp32"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    distributed_optimizer: bool = True
    overlap_grad_reduce: bool = True
    bucket_size: int | None = None


def resolve(name: str, *, cuda: bool, data_parallel: int, precision: str,
            saved: str | None = None) -> Literal["torch", "megatron"]:
    """The engine `parallel.engine` names; `auto` (the default) picks one per run.

    auto: a resumed run keeps the engine its checkpoint was written by (their optimizer
    states differ), so moving a run to fewer GPUs never strands it. Otherwise megatron on
    GPUs with data parallel > 1, where its bucketed reduce overlapped with backward and its
    sharded optimizer state pay; megatron for bf16 without CUDA, which only it can run; torch
    elsewhere (one GPU: the engine measured on the H200, BENCHMARKS.md).
    """
    if name != "auto":
        return name
    if saved is not None:
        return saved
    if cuda and data_parallel > 1:
        return "megatron"
    if precision == "bf16" and not cuda:
        return "megatron"
    return "torch"


def build(model: torch.nn.Module, cfg: EngineConfig, *, loaded_weights: bool = False
          ) -> tuple[torch.nn.Module, Any]:
    """(model to train, optimizer) for a bare megatron model whose weights are loaded.

    loaded_weights: the weights came from a checkpoint (a continued run). Under the megatron
    engine's bf16 the fp32 main weights then start from those exact values, where megatron
    would start them from the bf16 parameters, rounded to bf16's 8 significant bits.
    """
    if cfg.name == "torch":
        return model, build_optimizer(model, cfg.lr, cfg.betas, cfg.eps, cfg.weight_decay)
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    from factory.train import multi_tensor
    from factory.train.chunks import ModelChunks, chunks_of

    multi_tensor.install()
    bf16 = cfg.precision == "bf16"
    # On the host: a full copy per rank, as the checkpoint load itself held a moment ago.
    exact = {p: p.detach().to("cpu", copy=True) for p in model.parameters()
             if p.dtype == torch.float32} if bf16 and loaded_weights else {}
    wrapped = []
    for chunk in chunks_of(model):
        config = chunk.config
        if bf16:
            config.bf16 = True
            config.params_dtype = torch.bfloat16
            chunk = Float16Module(config, chunk)
        wrapped.append(DistributedDataParallel(config, DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=cfg.overlap_grad_reduce,
            use_distributed_optimizer=cfg.distributed_optimizer,
            bucket_size=cfg.bucket_size), chunk,
            # Only the first chunk's buckets may start reducing during backward (Megatron-LM).
            disable_bucketing=len(wrapped) > 0))
    for ddp in wrapped:
        # The pipeline schedule syncs through these (micro-batches under no_sync, then the
        # data-parallel reduce and the tied-embedding sum on the main gradients).
        ddp.config.no_sync_func = wrapped[0].no_sync if len(wrapped) == 1 else \
            [w.no_sync for w in wrapped]
        ddp.config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=cfg.lr, weight_decay=cfg.weight_decay, adam_beta1=cfg.betas[0],
        adam_beta2=cfg.betas[1], adam_eps=cfg.eps, clip_grad=cfg.clip_grad, bf16=bf16,
        use_distributed_optimizer=cfg.distributed_optimizer), wrapped)
    for group in optimizer.param_groups:
        # megatron's scheduler sets each group's decay from its multiplier every step; the
        # loop sets only the learning rate, so the multiplier is applied once here.
        group["weight_decay"] = cfg.weight_decay * group.get("wd_mult", 1.0)
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        # Without apex/TE megatron steps a plain torch AdamW over the fp32 main weights;
        # torch's fused kernel is the same update in one pass, as in the torch engine.
        if type(chained.optimizer) in (torch.optim.Adam, torch.optim.AdamW):
            for group in chained.optimizer.param_groups:
                group.update(fused=True, foreach=False)
    if exact:
        _set_main_weights(optimizer, exact)
    return (wrapped[0] if len(wrapped) == 1 else ModelChunks(wrapped)), optimizer


def _set_main_weights(optimizer: Any, values: dict[torch.nn.Parameter, torch.Tensor]) -> None:
    """megatron's fp32 main weights (each rank's shard under the distributed optimizer) set
    from full-precision `values` of the parameters they stand for. megatron-core's own
    `reload_model_params(state_dict)` does this only for the distributed optimizer, matching
    names by substring."""
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        distributed = hasattr(chained, "shard_fp32_from_float16_groups")
        if distributed:
            pairs = zip(chained.model_float16_groups, chained.shard_fp32_from_float16_groups)
        else:
            pairs = zip(chained.float16_groups, chained.fp32_from_float16_groups)
        for params, mains in pairs:
            for param, main in zip(params, mains, strict=True):
                full = values[param].view(-1)
                if distributed:
                    span = chained._get_model_param_range_map(param)["param"]
                    full = full[span.start:span.end]
                main.data.copy_(full.view_as(main))


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
    # One fused kernel for the whole update, on GPU and CPU alike (on 2 CPU cores it takes
    # 6 ms where the default per-tensor loop takes 39, for the tiny BERT's 11M parameters).
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=True)


def prepare_to_load(optimizer: Any) -> None:
    """Give a fresh megatron optimizer the Adam state a checkpoint load fills in place.

    Without apex/TE, megatron's distributed optimizer reads Adam's step from the torch
    optimizer's state, which is empty until the first step; a zero-lr step on zero gradients
    creates it without moving a weight (the load then overwrites it).
    """
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = chained.optimizer
        if inner is None or inner.state:
            continue
        lrs = [g["lr"] for g in inner.param_groups]
        for g in inner.param_groups:
            g["lr"] = 0.0
            for p in g["params"]:
                p.grad = torch.zeros_like(p)
        inner.step()
        inner.zero_grad(set_to_none=True)
        for g, lr in zip(inner.param_groups, lrs, strict=True):
            g["lr"] = lr


def load_state(optimizer: Any, state: dict) -> None:
    """megatron's optimizer.load_state_dict, then Adam's step count put right.

    Without apex/TE, megatron's distributed optimizer keeps the step in its param groups and
    hands the same `step` tensor to every parameter's state, which torch's foreach AdamW then
    increments once per parameter; the per-parameter copy it loads is the fresh optimizer's
    (prepare_to_load). Each parameter gets its own tensor holding the group's step, placed
    as torch's own load would place it: fused and capturable AdamW read the step on the
    parameter's device (a CPU step beside CUDA parameters fails in the fused kernel).
    """
    optimizer.load_state_dict(state)
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = chained.optimizer
        for group in inner.param_groups:
            if "step" not in group:
                continue
            on_device = group.get("fused") or group.get("capturable")
            for p in group["params"]:
                if p in inner.state:
                    inner.state[p]["step"] = torch.tensor(
                        float(group["step"]), dtype=torch.float32,
                        device=p.device if on_device else "cpu")


def is_megatron(optimizer: Any) -> bool:
    return not isinstance(optimizer, torch.optim.Optimizer)


def bare(model: torch.nn.Module) -> torch.nn.Module:
    """The megatron model inside the engine's wrappers (its checkpoint keys are the bare
    model's, so checkpoints, export and evaluation never see an engine)."""
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.transformer.module import Float16Module

    from factory.train.chunks import ModelChunks

    if isinstance(model, ModelChunks):
        return ModelChunks([bare(chunk) for chunk in model])
    while isinstance(model, (DistributedDataParallel, Float16Module)):
        model = model.module
    return model


def config_of(name: str, precision: str, training: Any, parallel: Any) -> EngineConfig:
    """The EngineConfig of a manifest's `training` and `parallel` sections."""
    given = {k: v for k, v in (("distributed_optimizer", parallel.distributed_optimizer),
                               ("overlap_grad_reduce", parallel.overlap_grad_reduce),
                               ("bucket_size", parallel.ddp_bucket_size)) if v is not None}
    return dataclasses.replace(
        EngineConfig(name=name, precision=precision, lr=training.lr,
                     betas=tuple(training.optimizer.betas), eps=training.optimizer.eps,
                     weight_decay=training.optimizer.weight_decay,
                     clip_grad=training.clip_grad), **given)
