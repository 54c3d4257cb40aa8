"""factory/train/multi_tensor.py computes what megatron-core's apex-less fallbacks compute,
without reading device values back to the host."""

from __future__ import annotations

import pytest


def _tensors(dtype=None):
    import torch

    g = torch.Generator().manual_seed(0)
    shapes = [(64, 32), (32,), (7, 3, 5), (1,), (1000,)]
    return [torch.randn(s, generator=g, dtype=dtype or torch.float32) for s in shapes]


def test_l2_norm_equals_megatrons_fallback_and_reads_nothing_back():
    import torch
    from megatron.core.utils import local_multi_tensor_l2_norm

    from factory.train import cpu_patches, multi_tensor
    from factory.train.throughput import host_reads

    cpu_patches.apply()            # megatron's fallback puts its result on device "cuda"
    tensors = _tensors()
    flag = torch.zeros(1, dtype=torch.int)
    ours, _ = multi_tensor.l2_norm(2048, flag, [tensors], False)
    theirs, _ = local_multi_tensor_l2_norm(2048, flag, [tensors], False)
    assert ours.shape == (1,) and ours.dtype == torch.float32
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    assert ours.item() == pytest.approx(torch.cat([t.flatten() for t in tensors]).norm().item(),
                                        rel=1e-6)
    assert host_reads(lambda: multi_tensor.l2_norm(2048, flag, [tensors], False)) == 0
    assert host_reads(lambda: local_multi_tensor_l2_norm(2048, flag, [tensors], False)) == \
        len(tensors) + 1


@pytest.mark.parametrize("factor", [1.0, 0.37])
def test_scale_equals_megatrons_fallback(factor):
    import torch
    from megatron.core.utils import local_multi_tensor_scale

    from factory.train import multi_tensor

    flag = torch.zeros(1, dtype=torch.int)
    src = _tensors(torch.bfloat16)                    # bf16 parameters -> fp32 main weights
    ours = [torch.empty(t.shape) for t in src]
    theirs = [torch.empty(t.shape) for t in src]
    multi_tensor.scale(2048, flag, [src, ours], factor)
    local_multi_tensor_scale(2048, flag, [src, theirs], factor)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))

    grads = _tensors()                                # clipping scales gradients in place
    expected = [g * factor for g in grads]
    multi_tensor.scale(2048, flag, [grads, grads], factor)
    assert all(torch.equal(a, b) for a, b in zip(grads, expected, strict=True))
