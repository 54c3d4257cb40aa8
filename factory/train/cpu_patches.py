"""The runtime patches megatron-core 0.16.1 needs on a machine without CUDA.

They live here and nowhere else, and apply only when CUDA is absent, so the GPU path runs
megatron unmodified. Facts behind each line: ../shared/MEGATRON_CPU.md ("Patches"); those for
the megatron engine (its optimizer, DDP buffers, `Tensor.type`) were found one failure at a
time by tests/train/test_engine.py, which fails without any of them.
"""

from __future__ import annotations

import logging

import torch

_applied = False


def apply() -> bool:
    """Patch once if there is no CUDA; returns True when the patches are in effect."""
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    import megatron.core.tensor_parallel.random as mrandom

    # megatron asks for the current CUDA device to place tensors and RNG states.
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda *a, **k: None
    # The model-parallel RNG tracker forks CUDA generator states; on CPU it forks the CPU one.
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda s, *a, **k: torch.set_rng_state(s)
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    # Not torch.manual_seed inside the lambda: it calls torch.cuda.manual_seed and recurses.
    torch.cuda.manual_seed = lambda s: torch.default_generator.manual_seed(int(s))
    # Tied embeddings across pipeline stages: megatron moves the last stage's copy with
    # `weight.data.cuda()` before all-reducing it (language_module.py).
    torch.Tensor.cuda = lambda self, *a, **k: self
    # Modules that allocate with device="cuda" (0.16.1): the pipeline schedules' token
    # counter; megatron's optimizer (found-inf and overflow buffers), its grad-norm helpers
    # and the DDP grad buffers (engine megatron). Everything else goes through
    # torch.cuda.current_device().
    import megatron.core.distributed.param_and_grad_buffer as grad_buffer
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.optimizer.distrib_optimizer as distrib_optimizer
    import megatron.core.optimizer.optimizer as optimizer
    import megatron.core.pipeline_parallel.schedules as schedules
    import megatron.core.utils as utils

    for module in (schedules, optimizer, distrib_optimizer, clip_grads, grad_buffer, utils):
        module.torch = _TorchOnCpu()
    # megatron's optimizers accept only parameters and gradients whose `type()` reads
    # torch.cuda.FloatTensor / BFloat16Tensor; nothing else in this process asks.
    torch.Tensor.type = _cuda_type_name
    # The tracker's "CUDA" state is now the CPU generator, so every dropout fork trips
    # megatron's "CPU RNG state changed" warning by design: noise, twice a step.
    logging.getLogger("megatron.core.tensor_parallel.random").setLevel(logging.ERROR)
    _applied = True
    return True


_tensor_type = torch.Tensor.type


def _cuda_type_name(self, *args, **kwargs):
    name = _tensor_type(self, *args, **kwargs)
    if args or kwargs or self.is_cuda:     # a conversion, or a real CUDA tensor
        return name
    return name.replace("torch.", "torch.cuda.", 1)


class _TorchOnCpu:
    """`torch` for a megatron module, with device="cuda" read as the CPU."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, device=None, **kwargs):
        return torch.zeros(*args, device=_cpu(device), **kwargs)

    @staticmethod
    def empty(*args, device=None, **kwargs):
        return torch.empty(*args, device=_cpu(device), **kwargs)

    @staticmethod
    def tensor(*args, device=None, **kwargs):
        return torch.tensor(*args, device=_cpu(device), **kwargs)


def _cpu(device):
    return "cpu" if device == "cuda" else device
