"""Process groups and parallel layout, applied from outside the model code.

`init(tp, pp)` works in three situations: under torchrun (reads RANK/WORLD_SIZE/MASTER_*),
in a plain single process (world size 1 over an in-memory store), and on GPU (nccl) or CPU
(gloo). Model builders read only their config; they never touch process groups.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from factory.train import cpu_patches, plain_tp


@dataclass(frozen=True)
class Layout:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline: int = 1       # model chunks per pipeline rank (interleaved schedule)
    sequence_parallel: bool = False     # a model setting, checked with the layout

    def data_parallel(self, world_size: int) -> int:
        mp = self.tensor_parallel * self.pipeline_parallel
        if world_size % mp:
            raise ValueError(f"tensor_parallel x pipeline_parallel = {mp} does not divide "
                             f"the world size {world_size}")
        return world_size // mp


def layout_problems(layout: Layout, family: str, num_attention_heads: int,
                    num_query_groups: int | None = None, num_layers: int | None = None,
                    seq_length: int | None = None) -> list[str]:
    """What is wrong with `layout` for a model, as manifest-field lines (empty when fine).

    Checked before any weight is loaded: megatron would otherwise fail deep inside a layer
    constructor with a bare assertion.
    """
    problems = []
    tp, pp = layout.tensor_parallel, layout.pipeline_parallel
    if num_attention_heads % tp:
        problems.append(f"parallel.tensor {tp} must divide the {num_attention_heads} attention "
                        "heads")
    groups = num_query_groups or num_attention_heads
    if groups % tp:
        problems.append(f"parallel.tensor {tp} must divide the {groups} query groups "
                        "(model.num_query_groups)")
    if layout.sequence_parallel and tp == 1:
        problems.append("parallel.sequence_parallel needs parallel.tensor > 1 (it splits the "
                        "sequence over the tensor-parallel ranks)")
    elif layout.sequence_parallel and seq_length is not None and seq_length % tp:
        problems.append(f"parallel.sequence_parallel: training.seq_length {seq_length} must "
                        f"divide by parallel.tensor {tp}")
    vpp = layout.virtual_pipeline
    if vpp > 1 and pp == 1:
        problems.append(f"parallel.virtual_pipeline {vpp} needs parallel.pipeline > 1")
    elif pp > 1 and num_layers is not None and num_layers % (pp * vpp):
        what = f"parallel.pipeline {pp}" if vpp == 1 else \
            f"parallel.pipeline x virtual_pipeline = {pp} x {vpp} = {pp * vpp}"
        problems.append(f"{what} must divide the {num_layers} layers (model.num_layers)")
    return problems


def world_size() -> int:
    """The torchrun world size (1 for a lone process), before or after init."""
    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(layout: Layout = Layout(), seed: int = 1234, solo: bool = False) -> None:
    """Initialise torch.distributed and megatron's model-parallel state (idempotent).

    solo=True makes a world of one even under torchrun (RANK set): for single-process work
    such as export on rank 0 after the multi-rank pretrain has called `shutdown()`.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    cpu_patches.apply()
    plain_tp.install()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if "RANK" in os.environ and not solo:
            dist.init_process_group(backend)
        else:
            # A lone process needs no rendezvous: an in-memory store cannot collide on a port
            # (a TCP store did, with checkpoint-saver children still holding an old socket).
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    vpp = layout.virtual_pipeline if layout.virtual_pipeline > 1 else None
    if parallel_state.model_parallel_is_initialized() and (
            parallel_state.get_tensor_model_parallel_world_size() != layout.tensor_parallel or
            parallel_state.get_pipeline_model_parallel_world_size() != layout.pipeline_parallel
            or parallel_state.get_virtual_pipeline_model_parallel_world_size() != vpp):
        # Another layout in the same process (tests, a library user): rebuild the groups.
        parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        layout.data_parallel(dist.get_world_size())
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tensor_parallel,
            pipeline_model_parallel_size=layout.pipeline_parallel,
            virtual_pipeline_model_parallel_size=vpp)
    model_parallel_cuda_manual_seed(seed)


def barrier() -> None:
    """Wait for every rank (a no-op alone)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
