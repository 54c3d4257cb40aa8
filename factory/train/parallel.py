"""Process groups and parallel layout, applied from outside the model code.

`init(tp, pp)` works in three situations: under torchrun (reads RANK/WORLD_SIZE/MASTER_*),
in a plain single process (world size 1 over a private TCP store), and on GPU (nccl) or CPU
(gloo). Model builders read only their config; they never touch process groups.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from factory.train import cpu_patches


@dataclass(frozen=True)
class Layout:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1

    def data_parallel(self, world_size: int) -> int:
        mp = self.tensor_parallel * self.pipeline_parallel
        if world_size % mp:
            raise ValueError(f"tensor_parallel x pipeline_parallel = {mp} does not divide "
                             f"the world size {world_size}")
        return world_size // mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(layout: Layout = Layout(), seed: int = 1234) -> None:
    """Initialise torch.distributed and megatron's model-parallel state (idempotent)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    cpu_patches.apply()
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    if not parallel_state.model_parallel_is_initialized():
        layout.data_parallel(dist.get_world_size())
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tensor_parallel,
            pipeline_model_parallel_size=layout.pipeline_parallel)
    model_parallel_cuda_manual_seed(seed)


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
