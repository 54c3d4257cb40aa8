"""torch's foreach kernels behind megatron-core's multi-tensor helpers where neither apex nor
Transformer Engine is installed (the GPU image has neither).

megatron's own fallbacks (megatron.core.utils.local_multi_tensor_*) take the gradient norm one
tensor at a time and read every partial norm back to the host (`torch.tensor` of a list of
device tensors): one device synchronisation per gradient tensor, every step. The replacements
compute the same numbers in a few foreach launches without reading anything back; megatron
then reads the total once, as with apex. They are installed for the megatron engine
(engine.build) and only over megatron's fallbacks, never over apex's or TE's kernels.
"""

from __future__ import annotations

import torch


def l2_norm(chunk_size: int, noop_flag: torch.Tensor, tensor_lists: list[list[torch.Tensor]],
            per_tensor: bool, *args) -> tuple[torch.Tensor, None]:
    """amp_C.multi_tensor_l2norm: the l2 norm over all tensors of tensor_lists[0], shape [1]."""
    if per_tensor:
        raise NotImplementedError("per-tensor norms (megatron-core 0.16.1 never asks)")
    norms = torch._foreach_norm(tensor_lists[0])
    return torch.linalg.vector_norm(torch.stack(norms).float()).reshape(1), None


def scale(chunk_size: int, noop_flag: torch.Tensor, tensor_lists: list[list[torch.Tensor]],
          factor: float) -> None:
    """amp_C.multi_tensor_scale: dst = src * factor, computed in src's dtype as megatron's
    fallback does (in place when src and dst are the same tensors: gradient clipping)."""
    src, dst = tensor_lists
    if all(a is b for a, b in zip(src, dst, strict=True)):
        torch._foreach_mul_(dst, factor)
    elif factor == 1.0:
        torch._foreach_copy_(dst, src)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, factor))


def install() -> None:
    """Put l2_norm and scale where megatron chose its per-tensor fallbacks (idempotent)."""
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.optimizer.optimizer as optimizer
    from megatron.core import utils

    if clip_grads.l2_norm_impl is utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = l2_norm
    for module in (clip_grads, optimizer):
        if module.multi_tensor_scale_impl is utils.local_multi_tensor_scale:
            module.multi_tensor_scale_impl = scale
