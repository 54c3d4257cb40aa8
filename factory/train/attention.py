"""Core attention: which implementation the layer specs get, and the SDPA one.

megatron-core's local `DotProductAttention` materialises the [b, heads, s, s] score matrix
(baddbmm -> softmax -> bmm). On a GPU without Transformer Engine, `SDPAttention` hands the same
computation to PyTorch's `scaled_dot_product_attention`, which picks flash or memory-efficient
kernels. It subclasses DotProductAttention, so construction, TP head splitting and
`sharded_state_dict` stay megatron's and checkpoints do not care which one ran.

`core_attention_class()` chooses once per process: Transformer Engine's attention when it is
installed with CUDA, else SDPA on CUDA, else the local one (fastest on CPU at small sizes, and
the one every CPU test measures). FACTORY_ATTENTION=local|sdpa|te forces a choice (benchmarks,
tests); all three compute the same function, so the choice is not part of any cache key.

Everything here imports megatron.core at module level: import this module lazily.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec

log = logging.getLogger(__name__)

BACKENDS = ("local", "sdpa", "te")


class SDPAttention(DotProductAttention):
    """DotProductAttention computed by torch's scaled_dot_product_attention.

    Inputs as megatron's: query [sq, b, np, hn], key/value [sk, b, ng, hn]; attention_mask
    True = masked (a [b,1,1,sk] key mask, a [b|1,1,sq,sk] full mask) or None with a causal
    attn_mask_type. Output [sq, b, np * hn].
    """

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention: packed sequences and attention bias are "
                                      "not supported")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, n, s, hn]
        is_causal = attention_mask is None and mask_type == AttnMaskType.causal
        # SDPA's boolean mask is True = attend, megatron's True = masked.
        mask = None if attention_mask is None else ~attention_mask.bool()
        p = self.attention_dropout.p if self.training else 0.0
        gqa = q.shape[1] != k.shape[1]
        # Under tensor parallel, dropout draws from the model-parallel tracker, as the local
        # attention does, so ranks drop different heads' probabilities deterministically. At
        # TP=1 there is nothing to tell apart, and the fork (two generator-state copies and a
        # compare, per layer) is host time a launch-bound GPU step waits for.
        ctx = tensor_parallel.get_cuda_rng_tracker().fork() if p > 0 and \
            self.config.tensor_model_parallel_size > 1 and not self.config.sequence_parallel \
            else contextlib.nullcontext()
        with ctx:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                                 is_causal=is_causal, scale=self.softmax_scale,
                                                 enable_gqa=gqa)
        # [b, np, sq, hn] -> [sq, b, np * hn]
        out = out.permute(2, 0, 1, 3).contiguous()
        return out.view(*out.shape[:2], self.hidden_size_per_partition)


def _te_attention():
    try:
        # megatron's TE extension module imports without TE too, handing out mocks.
        import transformer_engine  # noqa: F401
        from megatron.core.extensions.transformer_engine import TEDotProductAttention
    except ImportError:
        return None
    return TEDotProductAttention


def backend() -> str:
    """The core-attention backend of this process: local, sdpa or te."""
    forced = os.environ.get("FACTORY_ATTENTION")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"FACTORY_ATTENTION={forced!r}: one of {', '.join(BACKENDS)}")
        return forced
    if not torch.cuda.is_available():
        return "local"
    return "te" if _te_attention() is not None else "sdpa"


def core_attention_class():
    name = backend()
    if name == "te":
        cls = _te_attention()
        if cls is None:
            raise RuntimeError("FACTORY_ATTENTION=te but Transformer Engine is not installed")
        return cls
    return SDPAttention if name == "sdpa" else DotProductAttention


def with_core_attention(layer_spec: ModuleSpec, cls=None) -> ModuleSpec:
    """A copy of a transformer-layer spec whose self-attention uses `cls` (default: the
    process's backend). Parameter names are unchanged: core attention holds no weights."""
    cls = cls or core_attention_class()
    spec = copy.deepcopy(layer_spec)
    spec.submodules.self_attention.submodules.core_attention = cls
    return spec
