"""HF BERT (BertForMaskedLM / BertModel / BertForPreTraining) <-> factory/train/bert.py.

The key map is explicit; the fused QKV holds per head [q_h, k_h, v_h] (d rows each), heads in
order, the same for its bias. The HF pooler and NSP head have no twin (no binary head here):
importing drops them, logged. A checkpoint without an MLM head (BertModel) leaves our freshly
initialised head in place, logged.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from factory.stage import UserError
from factory.train.convert import fuse_qkv, pad_rows, split_qkv
from factory.train.models import PADDED_VOCAB_BIAS, ModelConfig

if TYPE_CHECKING:
    from torch import Tensor

log = logging.getLogger(__name__)

# megatron key -> HF key (HF's encoder keys lack the "bert." prefix here).
EMBEDDINGS = {
    "embedding.word_embeddings.weight": "embeddings.word_embeddings.weight",
    "embedding.position_embeddings.weight": "embeddings.position_embeddings.weight",
    "embedding.tokentype_embeddings.weight": "embeddings.token_type_embeddings.weight",
    "embedding.layernorm.weight": "embeddings.LayerNorm.weight",
    "embedding.layernorm.bias": "embeddings.LayerNorm.bias",
}
# Per layer: megatron "encoder.layers.{i}." + key -> HF "encoder.layer.{i}." + value.
# input_layernorm / pre_mlp_layernorm are the post-LNs of bert.PostLNTransformerLayer.
LAYER = {
    "self_attention.linear_proj.weight": "attention.output.dense.weight",
    "self_attention.linear_proj.bias": "attention.output.dense.bias",
    "input_layernorm.weight": "attention.output.LayerNorm.weight",
    "input_layernorm.bias": "attention.output.LayerNorm.bias",
    "mlp.linear_fc1.weight": "intermediate.dense.weight",
    "mlp.linear_fc1.bias": "intermediate.dense.bias",
    "mlp.linear_fc2.weight": "output.dense.weight",
    "mlp.linear_fc2.bias": "output.dense.bias",
    "pre_mlp_layernorm.weight": "output.LayerNorm.weight",
    "pre_mlp_layernorm.bias": "output.LayerNorm.bias",
}
QKV = ("self_attention.linear_qkv", "attention.self")  # + .weight / .bias; query/key/value
# The MLM head (HF keys are absolute). The decoder weight is tied to the word embeddings.
HEAD = {
    "lm_head.dense.weight": "cls.predictions.transform.dense.weight",
    "lm_head.dense.bias": "cls.predictions.transform.dense.bias",
    "lm_head.layer_norm.weight": "cls.predictions.transform.LayerNorm.weight",
    "lm_head.layer_norm.bias": "cls.predictions.transform.LayerNorm.bias",
    "output_layer.bias": "cls.predictions.bias",
}
# HF keys with no twin here: dropped on import.
IGNORED = ("embeddings.position_ids", "pooler.", "cls.seq_relationship.",
           "cls.predictions.decoder.")  # decoder.weight is tied; decoder.bias = predictions.bias
FRESH_HEAD = ("lm_head.", "output_layer.")


def _normalise(hf: dict[str, Tensor]) -> tuple[dict[str, Tensor], str]:
    """HF keys without the "bert." prefix of task models, TF-era gamma/beta renamed; the prefix."""
    prefix = "bert." if "bert.embeddings.word_embeddings.weight" in hf else ""
    if prefix + "embeddings.word_embeddings.weight" not in hf:
        raise UserError("not a BERT checkpoint: no embeddings.word_embeddings.weight")
    out = {}
    for key, value in hf.items():
        if prefix and key.startswith(prefix):
            key = key[len(prefix):]
        if "LayerNorm." in key:
            key = key.replace("LayerNorm.gamma", "LayerNorm.weight")
            key = key.replace("LayerNorm.beta", "LayerNorm.bias")
        out[key] = value
    return out, prefix


def hf_to_megatron(hf: dict[str, Tensor], cfg: ModelConfig,
                   source: Path | str = "checkpoint") -> tuple[dict[str, Tensor], tuple]:
    """megatron tensors of a HF BERT state dict, and the key prefixes left fresh (if any)."""
    hf, _ = _normalise(hf)
    used: set[str] = set()

    def take(key: str) -> Tensor:
        if key not in hf:
            raise UserError(f"{source}: missing tensor {key!r} (a BERT with "
                            f"{cfg.num_layers} layers?)")
        used.add(key)
        return hf[key].float()

    out: dict[str, Tensor] = {}
    for mkey, hkey in EMBEDDINGS.items():
        out[mkey] = take(hkey)
    out["embedding.word_embeddings.weight"] = pad_rows(
        out["embedding.word_embeddings.weight"], cfg.padded_vocab_size,
        what=f"{source} embeddings.word_embeddings.weight")
    heads = cfg.num_attention_heads
    for i in range(cfg.num_layers):
        m, h = f"encoder.layers.{i}.", f"encoder.layer.{i}."
        for mkey, hkey in LAYER.items():
            out[m + mkey] = take(h + hkey)
        for part in ("weight", "bias"):
            q, k, v = (take(f"{h}{QKV[1]}.{n}.{part}") for n in ("query", "key", "value"))
            out[f"{m}{QKV[0]}.{part}"] = fuse_qkv(q, k, v, heads, heads)
    if f"encoder.layer.{cfg.num_layers}.attention.self.query.weight" in hf:
        raise UserError(f"{source}: has more than {cfg.num_layers} layers")

    fresh: tuple = ()
    if all(hkey in hf for hkey in HEAD.values()):
        for mkey, hkey in HEAD.items():
            out[mkey] = take(hkey)
        out["output_layer.bias"] = pad_rows(out["output_layer.bias"], cfg.padded_vocab_size,
                                            fill=PADDED_VOCAB_BIAS,
                                            what=f"{source} cls.predictions.bias")
    else:
        log.warning("%s has no MLM head (a BertModel): the head is freshly initialised", source)
        fresh = FRESH_HEAD
    dropped = sorted(k for k in hf if k not in used and k.startswith(IGNORED))
    unknown = sorted(k for k in hf if k not in used and not k.startswith(IGNORED))
    if unknown:
        raise UserError(f"{source}: tensors the factory's BERT cannot represent: "
                        f"{', '.join(unknown[:4])}{' ...' if len(unknown) > 4 else ''}")
    if dropped:
        log.info("%s: dropped %d tensors with no twin (%s)", source, len(dropped),
                 ", ".join(sorted({k.split('.')[0] + '.' + k.split('.')[1] for k in dropped})))
    return out, fresh


def megatron_to_hf(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """BertForMaskedLM tensors (tied decoder omitted, as save_pretrained does)."""
    out: dict[str, Tensor] = {}
    for mkey, hkey in EMBEDDINGS.items():
        out["bert." + hkey] = state[mkey]
    heads = cfg.num_attention_heads
    for i in range(cfg.num_layers):
        m, h = f"encoder.layers.{i}.", f"bert.encoder.layer.{i}."
        for mkey, hkey in LAYER.items():
            out[h + hkey] = state[m + mkey]
        for part in ("weight", "bias"):
            q, k, v = split_qkv(state[f"{m}{QKV[0]}.{part}"], heads, heads, cfg.head_dim)
            for name, t in zip(("query", "key", "value"), (q, k, v), strict=True):
                out[f"{h}{QKV[1]}.{name}.{part}"] = t
    for mkey, hkey in HEAD.items():
        out[hkey] = state[mkey]
    return out


def hf_config(cfg: ModelConfig, token_ids: dict[str, int]):
    """The BertConfig of an export; vocab_size is the padded size (padded rows are kept)."""
    from transformers import BertConfig

    return BertConfig(
        architectures=["BertForMaskedLM"], vocab_size=cfg.padded_vocab_size,
        hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads, intermediate_size=cfg.ffn_hidden_size,
        hidden_act="gelu", hidden_dropout_prob=cfg.hidden_dropout,
        attention_probs_dropout_prob=cfg.attention_dropout,
        max_position_embeddings=cfg.max_position_embeddings,
        type_vocab_size=cfg.type_vocab_size, initializer_range=cfg.init_method_std,
        layer_norm_eps=cfg.layernorm_epsilon, pad_token_id=token_ids.get("pad", 0),
        tie_word_embeddings=True, dtype="float32")
