"""HF LlamaForCausalLM <-> megatron GPTModel (local spec, RMSNorm, SwiGLU, RoPE, GQA).

The key map is explicit. megatron's fused QKV holds, per query group, [q heads of the group...,
k, v] (d rows each); linear_fc1 is [gate_proj; up_proj]. HF's rotate_half RoPE is megatron's
non-interleaved RoPE, so q and k need no permutation.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from factory.stage import UserError
from factory.train.convert import fuse_qkv, pad_rows, split_qkv
from factory.train.models import ModelConfig

if TYPE_CHECKING:
    from torch import Tensor

log = logging.getLogger(__name__)

# Per layer: megatron "decoder.layers.{i}." + key -> HF "model.layers.{i}." + value.
LAYER = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
QKV = ("self_attention.linear_qkv.weight",
       ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"))
FC1 = ("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"))
GLOBAL = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
}
OUTPUT = ("output_layer.weight", "lm_head.weight")  # absent when tied
IGNORED = ("rotary_emb.inv_freq",)  # a buffer older checkpoints saved


def hf_to_megatron(hf: dict[str, Tensor], cfg: ModelConfig,
                   source: Path | str = "checkpoint") -> tuple[dict[str, Tensor], tuple]:
    """megatron tensors of a HF Llama state dict (nothing is left fresh)."""
    used: set[str] = set()

    def take(key: str) -> Tensor:
        if key not in hf:
            raise UserError(f"{source}: missing tensor {key!r} (a Llama with "
                            f"{cfg.num_layers} layers?)")
        used.add(key)
        return hf[key].float()

    out: dict[str, Tensor] = {mkey: take(hkey) for mkey, hkey in GLOBAL.items()}
    out["embedding.word_embeddings.weight"] = pad_rows(
        out["embedding.word_embeddings.weight"], cfg.padded_vocab_size,
        what=f"{source} model.embed_tokens.weight")
    for i in range(cfg.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        for mkey, hkey in LAYER.items():
            out[m + mkey] = take(h + hkey)
        q, k, v = (take(h + key) for key in QKV[1])
        out[m + QKV[0]] = fuse_qkv(q, k, v, cfg.num_attention_heads, cfg.query_groups)
        out[m + FC1[0]] = torch.cat([take(h + key) for key in FC1[1]], dim=0)
    if f"model.layers.{cfg.num_layers}.input_layernorm.weight" in hf:
        raise UserError(f"{source}: has more than {cfg.num_layers} layers")
    if cfg.tie_embeddings:
        if OUTPUT[1] in hf:  # some tied checkpoints store the copy anyway
            used.add(OUTPUT[1])
    else:
        out[OUTPUT[0]] = pad_rows(take(OUTPUT[1]), cfg.padded_vocab_size,
                                  what=f"{source} {OUTPUT[1]}")
    unknown = sorted(k for k in hf if k not in used and not k.endswith(IGNORED))
    if unknown:
        raise UserError(f"{source}: tensors the factory's Llama cannot represent: "
                        f"{', '.join(unknown[:4])}{' ...' if len(unknown) > 4 else ''}")
    if cfg.padded_vocab_size != hf[GLOBAL["embedding.word_embeddings.weight"]].shape[0]:
        log.info("%s: vocabulary padded to %d rows (zero rows: logit 0 until trained)",
                 source, cfg.padded_vocab_size)
    return out, ()


def megatron_to_hf(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """LlamaForCausalLM tensors (lm_head omitted when tied, as save_pretrained does)."""
    out = {hkey: state[mkey] for mkey, hkey in GLOBAL.items()}
    for i in range(cfg.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        for mkey, hkey in LAYER.items():
            out[h + hkey] = state[m + mkey]
        qkv = split_qkv(state[m + QKV[0]], cfg.num_attention_heads, cfg.query_groups,
                        cfg.head_dim)
        for key, t in zip(QKV[1], qkv, strict=True):
            out[h + key] = t
        gate, up = state[m + FC1[0]].chunk(2, dim=0)
        out[h + FC1[1][0]], out[h + FC1[1][1]] = gate, up
    if not cfg.tie_embeddings:
        out[OUTPUT[1]] = state[OUTPUT[0]]
    return out


def hf_config(cfg: ModelConfig, token_ids: dict[str, int]):
    """The LlamaConfig of an export; vocab_size is the padded size (padded rows are kept)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        architectures=["LlamaForCausalLM"], vocab_size=cfg.padded_vocab_size,
        hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.query_groups, head_dim=cfg.head_dim, hidden_act="silu",
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.layernorm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rotary_base},
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False,
        attention_dropout=cfg.attention_dropout, initializer_range=cfg.init_method_std,
        bos_token_id=token_ids.get("bos"), eos_token_id=token_ids.get("eos"),
        pad_token_id=token_ids.get("pad"), dtype="float32")
