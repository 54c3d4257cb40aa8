"""megatron-core's tensor-parallel linears and loss as plain torch ops where they communicate
nothing.

megatron runs every ColumnParallelLinear and RowParallelLinear through
`LinearWithGradAccumulationAndAsyncCommunication`, an autograd function whose forward and
backward are Python, wraps them in `_CopyToModelParallelRegion` /
`_ReduceFromModelParallelRegion` (Python autograd functions, identities over a tensor-parallel
group of one), and computes the loss in `_VocabParallelCrossEntropy` (Python again, three
all-reduces, and two boolean-mask writes that each read the mask back: a GPU sync). Where
nothing is communicated the same results are torch's `F.linear` (the bias fused into the
GEMM, as in HF's nn.Linear), no wrapper at all, and a cross entropy without masks or
all-reduces (_CrossEntropy), so the layers' forward and backward stay in C++. BERT-base steps on
an H200 are bound by host time (BENCHMARKS.md); so is a small model on CPU, where this takes
a fifth off the step (benchmarks/host_time.py).

The plain linear is taken only when megatron's function would do nothing more than the
matmul and the bias: no input-gradient all-reduce (tensor parallel 1, or a row-parallel
layer at any size), no sequence-parallel gather, no fused gradient accumulation (apex/TE),
no deferred embedding weight gradient; the regions and the loss only over a tensor-parallel
group of one (the loss without label smoothing). Every other call goes to megatron's code.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

# (module, name) of each megatron function replaced; megatron looks each up at call time.
_LAYERS = "megatron.core.tensor_parallel.layers"
_PACKAGE = "megatron.core.tensor_parallel"
_SITES = ((_LAYERS, "linear_with_grad_accumulation_and_async_allreduce"),
          (_LAYERS, "copy_to_tensor_model_parallel_region"),
          (_LAYERS, "reduce_from_tensor_model_parallel_region"),
          (_PACKAGE, "vocab_parallel_cross_entropy"))
_megatron: dict[tuple[str, str], Callable] = {}     # megatron's own functions, once installed


def install() -> None:
    """Route megatron's linear, region and loss calls through the plain ops (idempotent)."""
    import importlib

    from megatron.core.parallel_state import get_tensor_model_parallel_world_size
    from megatron.core.utils import get_tensor_model_parallel_group_if_none

    if _megatron:
        return
    _megatron.update({(m, n): getattr(importlib.import_module(m), n) for m, n in _SITES})
    megatron_linear, copy_to, reduce_from, cross_entropy = (_megatron[s] for s in _SITES)

    def linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               gradient_accumulation_fusion: bool = False, allreduce_dgrad: bool = False,
               sequence_parallel: bool = False, grad_output_buffer=None, **rest):
        if gradient_accumulation_fusion or allreduce_dgrad or sequence_parallel or \
                grad_output_buffer is not None:
            return megatron_linear(
                input, weight, bias=bias, gradient_accumulation_fusion=gradient_accumulation_fusion,
                allreduce_dgrad=allreduce_dgrad, sequence_parallel=sequence_parallel,
                grad_output_buffer=grad_output_buffer, **rest)
        return F.linear(input, weight, bias)

    def alone(group) -> bool:
        return get_tensor_model_parallel_group_if_none(group).size() == 1

    def copy_to_region(input_: torch.Tensor, group=None) -> torch.Tensor:
        return input_ if alone(group) else copy_to(input_, group=group)

    def reduce_from_region(input_: torch.Tensor, group=None) -> torch.Tensor:
        return input_ if alone(group) else reduce_from(input_, group=group)

    def vocab_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                            label_smoothing: float = 0.0) -> torch.Tensor:
        if label_smoothing or get_tensor_model_parallel_world_size() != 1:
            return cross_entropy(logits, target, label_smoothing)
        return _CrossEntropy.apply(logits, target)

    # megatron's linear keeps a warn-once flag on whatever its module name points at.
    linear.warned = megatron_linear.warned
    _put(dict(zip(_SITES, (linear, copy_to_region, reduce_from_region, vocab_cross_entropy),
                  strict=True)))


class _CrossEntropy(torch.autograd.Function):
    """Per-token cross entropy over the whole vocabulary on this rank, in fp32, with
    megatron's memory plan (the softmax computed in place in one fp32 copy of the logits,
    which backward turns into the gradient; fp32 logits are overwritten, as megatron's
    function does) and without its tensor-parallel masks and all-reduces. F.cross_entropy
    would keep a second [tokens, vocab] tensor: 7% slower on the full head on CPU."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x = logits.float()
        x -= x.max(dim=-1, keepdim=True).values
        predicted = x.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        x.exp_()
        sum_exp = x.sum(dim=-1)
        x.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(x, target)
        ctx.dtype = logits.dtype
        return torch.log(sum_exp) - predicted

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        softmax, target = ctx.saved_tensors
        index = target.unsqueeze(-1)
        softmax.scatter_add_(-1, index, torch.full(index.shape, -1.0, dtype=softmax.dtype,
                                                   device=softmax.device))
        softmax.mul_(grad.unsqueeze(-1))
        return softmax.to(ctx.dtype), None


def takes(linear: torch.nn.Module) -> bool:
    """Whether this ColumnParallelLinear's calls go to F.linear now (the installed linear's
    test, read from the module)."""
    import megatron.core.tensor_parallel.layers as layers

    site = _SITES[0]
    installed = bool(_megatron) and getattr(layers, site[1]) is not _megatron[site]
    return installed and not (linear.gradient_accumulation_fusion or linear.allreduce_dgrad
                              or linear.sequence_parallel
                              or linear.config.defer_embedding_wgrad_compute)


@contextlib.contextmanager
def megatron_path() -> Iterator[None]:
    """megatron's own functions for the duration (A/B measurements and tests)."""
    import importlib

    install()
    plain = {(m, n): getattr(importlib.import_module(m), n) for m, n in _SITES}
    _put(_megatron)
    try:
        yield
    finally:
        _put(plain)


def _put(functions: dict[tuple[str, str], Callable]) -> None:
    import importlib

    for (module, name), fn in functions.items():
        setattr(importlib.import_module(module), name, fn)
