"""The Hugging Face BERT architecture, exactly, in megatron-core 0.16.1.

megatron-core's own BertModel is pre-LayerNorm and has no Hugging Face twin. HF BERT is
post-LayerNorm: LayerNorm after the embeddings, LayerNorm after each residual add, no final
LayerNorm. Three small subclasses get there without patching megatron (recipe and measured
facts: ../shared/MEGATRON_CPU.md, "Hugging Face conversion"):

- `PostLNTransformerLayer`: attention -> residual add -> `input_layernorm`; MLP -> residual
  add -> `pre_mlp_layernorm`. The stock norm modules serve as the two post-LNs, so parameter
  names stay stock and the TP/sharding logic of every submodule is megatron's own.
- `HFBertEmbedding`: word + token type + position, then LayerNorm, then dropout (HF's order).
- `HFBertModel`: a layer-norm-free block spec, a key-only padding mask, and a forward that
  returns one tensor (per-token loss or logits) instead of (x, binary_logits). Under pipeline
  parallel each stage holds its share of the layers, the first the embeddings, the last the
  MLM head with its copy of the tied word embeddings (megatron's LanguageModule keeps the two
  equal).

Everything here imports megatron.core at module level: import this module lazily.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.bert.bert_layer_specs import bert_layer_local_spec
from megatron.core.models.bert.bert_model import BertModel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.tensor_parallel import ColumnParallelLinear, get_cuda_rng_tracker
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.utils import make_viewless_tensor

from factory.train import plain_tp
from factory.train.models import PADDED_VOCAB_BIAS, ModelConfig
from factory.train.norms import Norm

log = logging.getLogger(__name__)


class PostLNTransformerLayer(TransformerLayer):
    """HF BERT's post-LN layer. `input_layernorm` is the LN after attention (HF
    attention.output.LayerNorm), `pre_mlp_layernorm` the LN after the MLP (HF output.LayerNorm)."""

    def forward(self, hidden_states, attention_mask=None, context=None, context_mask=None,
                rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None,
                rotary_pos_cos_sin=None, attention_bias=None, inference_context=None,
                packed_seq_params=None, sequence_len_offset=None, padding_mask=None, **kwargs):
        # hidden_states: [s, b, h]
        residual = hidden_states
        attention_output_with_bias = self.self_attention(
            hidden_states, attention_mask=attention_mask, inference_context=inference_context,
            rotary_pos_emb=rotary_pos_emb, attention_bias=attention_bias,
            packed_seq_params=packed_seq_params, sequence_len_offset=sequence_len_offset)
        with self.bias_dropout_add_exec_handler():
            hidden_states = self.self_attn_bda(self.training, self.config.bias_dropout_fusion)(
                attention_output_with_bias, residual, self.hidden_dropout)
        hidden_states = self.input_layernorm(hidden_states)

        residual = hidden_states
        mlp_output_with_bias = self.mlp(hidden_states)
        with self.bias_dropout_add_exec_handler():
            hidden_states = self.mlp_bda(self.training, self.config.bias_dropout_fusion)(
                mlp_output_with_bias, residual, self.hidden_dropout)
        hidden_states = self.pre_mlp_layernorm(hidden_states)
        # The bias-dropout-add may return a view; megatron's checkpointing rejects views.
        output = make_viewless_tensor(hidden_states, requires_grad=hidden_states.requires_grad,
                                      keep_graph=True)
        return output, context


class ComputeDtypeBiasLinear(ColumnParallelLinear):
    """ColumnParallelLinear that, under autocast, adds its bias in the matmul's output dtype.

    megatron adds the bias inside its linear autograd function (`output + bias`); under bf16
    autocast that is a bf16 product plus an fp32 parameter, which type promotion turns into an
    fp32 [s, b, 3h] (QKV) or [s, b, 4h] (fc1) tensor that the next op casts back: extra memory
    passes that made BERT-base steps slower than HF's on an H200 (BENCHMARKS.md). HF's
    nn.Linear (addmm) stays in bf16, and so does this. Without autocast (fp32, every CPU run),
    or where the layer runs as F.linear with its bias (factory/train/plain_tp.py: autocast
    then fuses a bf16 bias into the GEMM), it is the forward it inherits; parameter names and
    sharding are megatron's.
    """

    def forward(self, input_, weight=None, runtime_gather_output=None):
        if self.bias is None or not torch.is_autocast_enabled(input_.device.type) or \
                (plain_tp.takes(self) and not self.skip_bias_add):
            return super().forward(input_, weight, runtime_gather_output)
        skip = self.skip_bias_add
        self.skip_bias_add = True
        try:
            out, bias = super().forward(input_, weight, runtime_gather_output)
        finally:
            self.skip_bias_add = skip
        bias = bias.to(out.dtype)
        return (out, bias) if skip else (out + bias, None)


@contextlib.contextmanager
def _lm_head_norm(norm):
    """BertModel builds its MLM head's norm from bert_lm_head's module-level `LNImpl`, with no
    spec to choose it; for the duration of one model's construction that name is the
    factory's `Norm` (the same torch module, but it also runs under sequence parallel)."""
    import megatron.core.models.bert.bert_lm_head as lm_head

    saved = lm_head.LNImpl
    lm_head.LNImpl = norm
    try:
        yield
    finally:
        lm_head.LNImpl = saved


def post_ln_layer_spec() -> ModuleSpec:
    """bert_layer_local_spec's submodules in a PostLNTransformerLayer.

    The stock spec maps `input_layernorm.` to `self_attention.linear_qkv.layer_norm_` in
    checkpoints (the pre-LN TE layout). Here that norm is a post-LN, so the map is dropped:
    a checkpoint of this model must not load silently into a pre-LN BERT. Core attention is
    the process's backend (factory/train/attention.py: SDPA on a GPU without TE).
    """
    from factory.train.attention import with_core_attention

    sub = with_core_attention(bert_layer_local_spec).submodules
    sub.self_attention.submodules.linear_qkv = ComputeDtypeBiasLinear
    sub.mlp.submodules.linear_fc1 = ComputeDtypeBiasLinear
    return ModuleSpec(module=PostLNTransformerLayer, submodules=TransformerLayerSubmodules(
        input_layernorm=Norm, self_attention=sub.self_attention,
        self_attn_bda=sub.self_attn_bda, pre_mlp_layernorm=Norm,
        mlp=sub.mlp, mlp_bda=sub.mlp_bda))


class HFBertEmbedding(LanguageModelEmbedding):
    """Embeddings in HF BERT's order: (word + token type + position) -> LayerNorm -> dropout."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.layernorm = Norm(config=self.config, hidden_size=self.config.hidden_size,
                              eps=self.config.layernorm_epsilon)

    def forward(self, input_ids, position_ids, tokentype_ids=None):
        embeddings = self.word_embeddings(input_ids)  # [b, s, h]
        if self.tokentype_embeddings is not None:
            if tokentype_ids is None:
                tokentype_ids = torch.zeros_like(input_ids)
            embeddings = embeddings + self.tokentype_embeddings(tokentype_ids)
        embeddings = embeddings + self.position_embeddings(position_ids)
        embeddings = embeddings.transpose(0, 1).contiguous()  # [s, b, h]
        embeddings = self.layernorm(embeddings)
        if self.config.sequence_parallel:
            from megatron.core import tensor_parallel

            embeddings = tensor_parallel.scatter_to_sequence_parallel_region(
                embeddings, group=self.tp_group).clone()
            with get_cuda_rng_tracker().fork():
                return self.embedding_dropout(embeddings)
        return self.embedding_dropout(embeddings)


class HFBertModel(BertModel):
    """BertModel with HF BERT's layer, embeddings and block (no final LayerNorm)."""

    def __init__(self, config: TransformerConfig, vocab_size: int, max_sequence_length: int,
                 num_tokentypes: int = 2, pre_process: bool = True, post_process: bool = True,
                 vp_stage: int | None = None):
        # This pipeline stage's (or model chunk's) layers, all of them without pipeline
        # parallel; megatron numbers them globally from the stage's offset.
        block = TransformerBlockSubmodules(
            layer_specs=[post_ln_layer_spec()] * get_num_layers_to_build(config, vp_stage),
            layer_norm=None)
        with _lm_head_norm(Norm):
            super().__init__(config=config, num_tokentypes=num_tokentypes,
                             transformer_layer_spec=block, vocab_size=vocab_size,
                             max_sequence_length=max_sequence_length,
                             pre_process=pre_process, post_process=post_process,
                             vp_stage=vp_stage,
                             # parallel_output=False breaks the training loss (an in-place op
                             # on a gathered view); TP=1 logits are whole either way.
                             parallel_output=True, share_embeddings_and_output_weights=True,
                             position_embedding_type="learned_absolute",
                             add_binary_head=False)
        if self.pre_process:
            self.embedding = HFBertEmbedding(config=config, vocab_size=vocab_size,
                                             max_sequence_length=max_sequence_length,
                                             num_tokentypes=num_tokentypes)
        # Re-tie the output layer to the new word embeddings: on every stage, because under
        # pipeline parallel the last stage's copy is set by an all-reduce with the first.
        self.setup_embeddings_and_output_layer()

    def _sanity_check_attention_and_get_attn_mask_dimension(self) -> str:
        # Key-only mask [b,1,1,s]: pad query rows then attend like HF's (a [b,1,s,s] product
        # mask would blank them); broadcasting does the rest in the unfused softmax.
        return "b11s"

    def forward(self, input_ids, attention_mask=None, tokentype_ids=None, lm_labels=None,
                inference_context=None, loss_mask=None, masked_positions=None, **kwargs):
        """Per-token loss [b,s] (fp32) when lm_labels is given, else logits [b,s,vocab].

        With `loss_mask` [b,s] as well, only the masked positions go through the MLM head and
        the other positions' loss is 0: the same loss and gradients as the full head under that
        mask, for about 15% of the vocabulary projection (the largest matmul of a small BERT).
        `masked_positions`: where the mask's ones are, as indices into its [s,b] transpose
        flattened (TrainData.batch computes them on the host); without them they are found on
        the device, which on a GPU waits for it (one sync per micro-batch).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if tokentype_ids is None and self.pre_process and \
                self.embedding.tokentype_embeddings is not None:
            tokentype_ids = torch.zeros_like(input_ids)
        # Under sequence parallel each rank holds a slice of the sequence and megatron's
        # output layer gathers it: the head then runs over every position (the same loss).
        if lm_labels is not None and loss_mask is not None and self.post_process and \
                not self.config.sequence_parallel:
            return self._masked_lm_loss(input_ids, attention_mask, tokentype_ids, lm_labels,
                                        loss_mask, masked_positions)
        out = super().forward(input_ids, attention_mask, tokentype_ids=tokentype_ids,
                              lm_labels=lm_labels, inference_context=inference_context)
        # Before the last pipeline stage: the hidden states [s, b, h] for the next stage.
        return out[0] if self.post_process else out

    def _masked_lm_loss(self, input_ids, attention_mask, tokentype_ids, lm_labels, loss_mask,
                        where=None):
        h = _encode(self, input_ids, attention_mask, tokentype_ids)       # [s, b, h]
        s, b = h.shape[:2]
        # Integer indices gather and scatter without reading anything back; boolean-mask
        # indexing would read the mask back in each of forward, put-back and their backwards.
        if where is None:
            where = masked_positions(loss_mask)                             # [n] of s*b
        picked = h.reshape(s * b, -1).index_select(0, where).unsqueeze(1)    # [n, 1, h]
        logits, _ = self.output_layer(self.lm_head(hidden_states=picked),
                                      weight=self.shared_embedding_or_output_weight())
        labels = lm_labels.transpose(0, 1).reshape(-1).index_select(0, where).unsqueeze(1)
        per_pos = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels)
        loss = torch.zeros(s * b, dtype=per_pos.dtype, device=per_pos.device).index_copy(
            0, where, per_pos[:, 0])
        return loss.view(s, b).transpose(0, 1).contiguous()                 # [b, s]


def masked_positions(loss_mask: torch.Tensor) -> torch.Tensor:
    """Indices of the ones of a [b,s] mask in its [s,b] transpose, flattened: the order of
    megatron's [s,b,h] hidden states. Used on the host it reads nothing back from a device."""
    return loss_mask.transpose(0, 1).reshape(-1).nonzero().squeeze(1)


def transformer_config(cfg: ModelConfig, **runtime) -> TransformerConfig:
    """The architecture of `cfg`; `runtime`: models.runtime_settings (recompute, sequence
    parallel), which change memory, compute and communication, not the function."""
    on_cpu = not torch.cuda.is_available()
    return TransformerConfig(
        **runtime,
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads, ffn_hidden_size=cfg.ffn_hidden_size,
        kv_channels=cfg.head_dim,
        hidden_dropout=cfg.hidden_dropout, attention_dropout=cfg.attention_dropout,
        layernorm_epsilon=cfg.layernorm_epsilon, init_method_std=cfg.init_method_std,
        # HF BERT: exact erf GELU, biases everywhere, LayerNorm.
        activation_func=F.gelu, add_bias_linear=True, add_qkv_bias=True,
        normalization="LayerNorm", gated_linear_unit=False,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        virtual_pipeline_model_parallel_size=(
            parallel_state.get_virtual_pipeline_model_parallel_world_size()),
        # Bias-GELU stays unfused on GPU too: megatron's fused one is the tanh approximation,
        # not HF's erf GELU. Bias-dropout-add is the same math fused (torch.compile, GPU only);
        # the softmax, norm and gradient fusions need apex/TE.
        bias_activation_fusion=False, bias_dropout_fusion=not on_cpu,
        masked_softmax_fusion=False,
        persist_layer_norm=False, gradient_accumulation_fusion=False, apply_rope_fusion=False,
        use_cpu_initialization=on_cpu, params_dtype=torch.float32,
        # Activations cross pipeline stages in fp32, as in factory/train/gpt.py.
        pipeline_dtype=torch.float32)


def build_bert(cfg: ModelConfig, vp_stage: int | None = None, **runtime) -> HFBertModel:
    """A fresh HF-architecture BERT; padded vocabulary rows get PADDED_VOCAB_BIAS."""
    if cfg.family != "bert":
        raise ValueError(f"build_bert needs family bert, got {cfg.family!r}")
    model = HFBertModel(transformer_config(cfg, **runtime), vocab_size=cfg.padded_vocab_size,
                        max_sequence_length=cfg.max_position_embeddings,
                        num_tokentypes=cfg.type_vocab_size,
                        pre_process=parallel_state.is_pipeline_first_stage(
                            ignore_virtual=False, vp_stage=vp_stage),
                        post_process=parallel_state.is_pipeline_last_stage(
                            ignore_virtual=False, vp_stage=vp_stage),
                        vp_stage=vp_stage)
    _mask_padded_vocab(model, cfg)
    return model


def _mask_padded_vocab(model: HFBertModel, cfg: ModelConfig) -> None:
    if not model.post_process or cfg.padded_vocab_size == cfg.vocab_size:
        return
    bias = model.output_layer.bias  # this rank's vocabulary shard
    rows = bias.shape[0]
    start = parallel_state.get_tensor_model_parallel_rank() * rows
    first_padded = max(cfg.vocab_size - start, 0)
    if first_padded < rows:
        with torch.no_grad():
            bias[first_padded:].fill_(PADDED_VOCAB_BIAS)
    log.debug("padded vocabulary rows %d..%d get logit bias %g", cfg.vocab_size,
              cfg.padded_vocab_size - 1, PADDED_VOCAB_BIAS)


def _encode(model: HFBertModel, input_ids, attention_mask, tokentype_ids):
    """Embeddings + encoder: last hidden states [s,b,h]. After the first pipeline stage the
    encoder starts from the hidden states the schedule handed it (`set_input_tensor`)."""
    emb = None
    if model.pre_process:
        emb = model.embedding(input_ids=input_ids,
                              position_ids=model.bert_position_ids(input_ids),
                              tokentype_ids=tokentype_ids)
    return model.encoder(hidden_states=emb,
                         attention_mask=model.bert_extended_attention_mask(attention_mask))


def hidden_states(model: HFBertModel, input_ids, attention_mask, tokentype_ids=None):
    """The encoder's last hidden states [b,s,h] (HF's `last_hidden_state`), for tests/probes."""
    if tokentype_ids is None:
        tokentype_ids = torch.zeros_like(input_ids)
    return _encode(model, input_ids, attention_mask, tokentype_ids).transpose(0, 1)


__all__ = ["HFBertModel", "PostLNTransformerLayer", "HFBertEmbedding", "build_bert",
           "transformer_config", "hidden_states", "PADDED_VOCAB_BIAS"]
