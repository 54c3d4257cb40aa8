"""The norm layer of both families: torch's LayerNorm / RMSNorm, also under sequence parallel.

Without apex, megatron-core 0.16.1 builds its norms with `WrappedTorchNorm`, which refuses
sequence parallel: a norm is per token, so it works on a slice of the sequence unchanged, but
its parameters' gradients are then partial sums that must be added over the tensor-parallel
ranks, which megatron finds by a `sequence_parallel` attribute that WrappedTorchNorm never
sets. `Norm` is the same torch module with that attribute set (same parameter names, same
function). With apex installed megatron's FusedLayerNorm does all of this itself and is used
for LayerNorm (it has no RMSNorm).
"""

from __future__ import annotations

import torch
from megatron.core.fusions.fused_layer_norm import HAVE_FUSED_LAYER_NORM, FusedLayerNorm
from megatron.core.transformer.transformer_config import TransformerConfig


class Norm:
    """A norm for `config.normalization`, built from a layer spec like megatron's own."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5,
                **_unused) -> torch.nn.Module:
        if HAVE_FUSED_LAYER_NORM and config.normalization == "LayerNorm":
            return FusedLayerNorm(config=config, hidden_size=hidden_size, eps=eps)
        kind = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
        if config.normalization not in kind:
            raise ValueError(f"normalization {config.normalization!r}: LayerNorm or RMSNorm")
        norm = kind[config.normalization](hidden_size, eps=eps)
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm
