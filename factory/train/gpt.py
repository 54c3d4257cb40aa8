"""A Llama-style decoder in megatron-core's own GPTModel: RMSNorm, SwiGLU, RoPE, optional GQA,
no biases, tied or untied embeddings; numerically HF's LlamaForCausalLM (fp32).

Everything here imports megatron.core at module level: import this module lazily.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from factory.train.attention import with_core_attention
from factory.train.models import ModelConfig
from factory.train.norms import Norm


def transformer_config(cfg: ModelConfig, **runtime) -> TransformerConfig:
    """The architecture of `cfg`; `runtime`: models.runtime_settings (recompute, sequence
    parallel), which change memory, compute and communication, not the function."""
    on_cpu = not torch.cuda.is_available()
    return TransformerConfig(
        **runtime,
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads, num_query_groups=cfg.query_groups,
        ffn_hidden_size=cfg.ffn_hidden_size, kv_channels=cfg.head_dim,
        hidden_dropout=cfg.hidden_dropout, attention_dropout=cfg.attention_dropout,
        layernorm_epsilon=cfg.layernorm_epsilon, init_method_std=cfg.init_method_std,
        # Llama: RMSNorm, SwiGLU (fc1 = [gate; up], silu(gate) * up), no biases.
        normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, add_qkv_bias=False,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        virtual_pipeline_model_parallel_size=(
            parallel_state.get_virtual_pipeline_model_parallel_world_size()),
        # On GPU megatron's torch.compile'd SwiGLU and bias-dropout-add (same math, fewer
        # memory passes); the softmax, norm and gradient fusions need apex/TE.
        bias_activation_fusion=not on_cpu, bias_dropout_fusion=not on_cpu,
        masked_softmax_fusion=False,
        persist_layer_norm=False, gradient_accumulation_fusion=False, apply_rope_fusion=False,
        use_cpu_initialization=on_cpu, params_dtype=torch.float32,
        # Activations cross pipeline stages in fp32: the weights are fp32 (autocast computes
        # the matmuls in bf16) and the residual stream stays fp32.
        pipeline_dtype=torch.float32)


class LlamaGPTModel(GPTModel):
    """GPTModel that also accepts attention_mask=None without CUDA.

    megatron builds the default causal mask with device="cuda" (transformer/utils.py
    get_default_causal_mask); on CPU this builds the same mask (True = masked) on the input's
    device instead. On GPU it passes None through, as megatron expects.
    """

    def forward(self, input_ids, position_ids, attention_mask=None, *args, **kwargs):
        if attention_mask is None and not torch.cuda.is_available() and input_ids is not None:
            s = input_ids.shape[1]
            attention_mask = _causal_mask(s, input_ids.device)
        return super().forward(input_ids, position_ids, attention_mask, *args, **kwargs)


def _causal_mask(s: int, device) -> torch.Tensor:
    # [1, 1, s, s], True above the diagonal = a future key, masked.
    return torch.ones(s, s, dtype=torch.bool, device=device).triu(1)[None, None]


def build_gpt(cfg: ModelConfig, vp_stage: int | None = None, **runtime) -> LlamaGPTModel:
    """A fresh Llama-style GPTModel; forward(input_ids, position_ids, attention_mask, labels).
    vp_stage: which of this pipeline rank's model chunks (interleaved schedule)."""
    if cfg.family != "gpt":
        raise ValueError(f"build_gpt needs family gpt, got {cfg.family!r}")
    config = transformer_config(cfg, **runtime)
    layer = with_core_attention(get_gpt_layer_local_spec(normalization="RMSNorm"))
    layer.submodules.input_layernorm = layer.submodules.pre_mlp_layernorm = Norm
    return LlamaGPTModel(
        config=config,
        # This stage's (or chunk's) layers and the final norm, all with the factory's norm.
        transformer_layer_spec=TransformerBlockSubmodules(
            layer_specs=[layer] * get_num_layers_to_build(config, vp_stage), layer_norm=Norm),
        vocab_size=cfg.padded_vocab_size, max_sequence_length=cfg.max_position_embeddings,
        # HF's rotate_half RoPE is megatron's non-interleaved one (rotary_interleaved=False).
        position_embedding_type="rope", rotary_base=cfg.rotary_base, rotary_percent=1.0,
        share_embeddings_and_output_weights=cfg.tie_embeddings, parallel_output=True,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False,
                                                            vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False,
                                                           vp_stage=vp_stage),
        vp_stage=vp_stage)
