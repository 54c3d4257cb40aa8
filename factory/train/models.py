"""The two model families as one config and one builder.

`ModelConfig` is plain data (pretrain writes it as model.json, export and evaluate read it back);
`build_model` turns it into a megatron-core module: the Hugging Face BERT architecture
(factory/train/bert.py) or a Llama-style GPTModel (factory/train/gpt.py). megatron.core is
imported only inside the functions: importing it costs 6-11 s and the CLI imports this module.

Forward contracts (what the training loop and the converters rely on):
- bert: `model(input_ids[b,s], attention_mask[b,s] (1 = real token, 0 = pad), tokentype_ids[b,s],
  lm_labels[b,s] | None)` -> per-token loss [b,s] fp32 when lm_labels is given, else logits
  [b,s,padded_vocab_size].
- gpt: GPTModel's own `model(input_ids, position_ids, attention_mask, labels=None)` -> per-token
  loss [b,s] or logits [b,s,padded_vocab_size]; causal, attention_mask may be None.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from factory.stage import UserError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

VOCAB_MULTIPLE = 128
# BERT's MLM logit bias on padded vocabulary rows (ids >= the tokenizer's size): exp(-100) is
# ~4e-44, so padding takes no probability mass and an imported checkpoint's softmax stays its
# own; training leaves it there (its gradient is that probability). Not -1e4: an fp32 ulp
# there is 1e-3, so HF and megatron logits could no longer agree to 1e-4 column for column.
PADDED_VOCAB_BIAS = -100.0


@dataclass(frozen=True)
class ModelConfig:
    family: Literal["bert", "gpt"]
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    vocab_size: int               # the tokenizer's real size
    padded_vocab_size: int        # embedding rows: vocab_size rounded up to a multiple of 128
    max_position_embeddings: int  # bert: learned positions; gpt: RoPE max length
    num_query_groups: int | None = None   # gpt GQA; None = MHA
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    layernorm_epsilon: float = 1e-12      # bert 1e-12; gpt typically 1e-5
    rotary_base: float = 10000.0          # gpt
    tie_embeddings: bool = True           # bert always tied; gpt either
    type_vocab_size: int = 2              # bert
    init_method_std: float = 0.02

    def __post_init__(self) -> None:
        if self.family not in ("bert", "gpt"):
            raise ValueError(f"family must be bert or gpt, not {self.family!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} must divide "
                             f"hidden_size {self.hidden_size}")
        groups = self.num_query_groups or self.num_attention_heads
        if self.num_attention_heads % groups:
            raise ValueError(f"num_query_groups {groups} must divide num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.family == "bert":
            if self.num_query_groups not in (None, self.num_attention_heads):
                raise ValueError("num_query_groups is for family gpt only")
            if not self.tie_embeddings:
                raise ValueError("bert always ties its input and output embeddings")
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError(f"padded_vocab_size {self.padded_vocab_size} < vocab_size "
                             f"{self.vocab_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    def matmul_parameters(self) -> int:
        """Weights that a token multiplies (every layer's matrices and the output projection;
        not the embedding lookups): the N of the 6N training FLOPs per token."""
        h, d = self.hidden_size, self.head_dim
        attn = h * (self.num_attention_heads + 2 * self.query_groups) * d + h * h
        mlp = (3 if self.family == "gpt" else 2) * h * self.ffn_hidden_size
        head = h * h if self.family == "bert" else 0        # BERT's MLM transform
        return self.num_layers * (attn + mlp) + head + self.padded_vocab_size * h

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def load(cls, path: Path) -> ModelConfig:
        """Read a model.json; a broken or foreign file is the user's to fix (UserError)."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise UserError(f"{path}: missing (is this a pretrain output folder?)") from None
        except (ValueError, TypeError) as e:
            raise UserError(f"{path}: not a model config ({e}); rerun the pretrain stage") from None

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def pad_vocab(size: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """Embedding rows for a vocabulary of `size`: rounded up so matmuls and TP splits are even."""
    return -(-size // multiple) * multiple


def build_model(cfg: ModelConfig, recompute: str = "none", sequence_parallel: bool = False
                ) -> torch.nn.Module:
    """A fresh fp32 megatron-core model; `factory.train.parallel.init()` must have run.

    recompute and sequence_parallel change training memory, compute and communication, not
    the function: see `runtime_settings`.
    """
    import torch

    from megatron.core import parallel_state

    from factory.train.chunks import ModelChunks

    if cfg.family == "bert":
        from factory.train.bert import build_bert as build
    else:
        from factory.train.gpt import build_gpt as build
    runtime = runtime_settings(recompute, sequence_parallel)
    chunks = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    model = build(cfg, **runtime) if chunks is None else \
        ModelChunks([build(cfg, vp_stage=i, **runtime) for i in range(chunks)])
    # megatron puts its own layers on the GPU; modules of ours (BERT's token-type
    # embeddings, for one) are created on the CPU and follow here.
    return model.to(torch.cuda.current_device()) if torch.cuda.is_available() else model


def runtime_settings(recompute: str = "none", sequence_parallel: bool = False
                     ) -> dict[str, Any]:
    """TransformerConfig fields that trade memory for compute or communication.

    recompute (Megatron-LM's --recompute-granularity): `selective` recomputes core attention
    (softmax, dropout) in backward instead of storing it; `full` stores only each layer's
    input and recomputes the layer. Dropout masks are replayed from megatron's RNG tracker,
    so the losses do not move. sequence_parallel (--sequence-parallel, with tensor parallel):
    the norms, dropouts and residual adds between the tensor-parallel blocks hold 1/TP of the
    sequence each (factory/train/norms.py); their parameters' gradients are summed over the
    tensor-parallel ranks after backward.
    """
    out: dict[str, Any] = {"sequence_parallel": sequence_parallel}
    if recompute == "selective":
        out["recompute_granularity"] = "selective"
    elif recompute == "full":
        out.update(recompute_granularity="full", recompute_method="uniform",
                   recompute_num_layers=1)
    elif recompute != "none":
        raise ValueError(f"recompute must be none, selective or full, not {recompute!r}")
    return out


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def config_from_hf(hf_folder: Path, *, hidden_dropout: float | None = None,
                   attention_dropout: float | None = None) -> ModelConfig:
    """The ModelConfig of a Hugging Face BERT or Llama folder (its config.json).

    Dropouts default to the checkpoint's own; pass them to override (a continued run's manifest).
    Anything the conversion would not reproduce exactly raises UserError naming the field.
    """
    path = Path(hf_folder) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: missing (not a Hugging Face model folder)") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    model_type = raw.get("model_type")
    if model_type == "bert":
        cfg = _bert_config(raw, path)
    elif model_type == "llama":
        cfg = _llama_config(raw, path)
    else:
        raise UserError(f"{path}: model_type {model_type!r} is not supported; the factory "
                        "converts BERT (family bert) and Llama (family gpt) checkpoints")
    overrides = {}
    if hidden_dropout is not None:
        overrides["hidden_dropout"] = hidden_dropout
    if attention_dropout is not None:
        overrides["attention_dropout"] = attention_dropout
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


def _bert_config(raw: dict, path: Path) -> ModelConfig:
    from transformers import BertConfig

    c = BertConfig.from_dict(raw)
    if c.hidden_act != "gelu":
        raise UserError(f"{path}: hidden_act {c.hidden_act!r} is not supported (the factory's "
                        "BERT uses the exact erf GELU, hidden_act 'gelu')")
    pet = getattr(c, "position_embedding_type", "absolute") or "absolute"
    if pet != "absolute":
        raise UserError(f"{path}: position_embedding_type {pet!r} is not supported "
                        "(only 'absolute')")
    if c.hidden_size % c.num_attention_heads:
        raise UserError(f"{path}: num_attention_heads must divide hidden_size")
    return ModelConfig(
        family="bert", num_layers=c.num_hidden_layers, hidden_size=c.hidden_size,
        num_attention_heads=c.num_attention_heads, ffn_hidden_size=c.intermediate_size,
        vocab_size=c.vocab_size, padded_vocab_size=pad_vocab(c.vocab_size),
        max_position_embeddings=c.max_position_embeddings,
        hidden_dropout=c.hidden_dropout_prob, attention_dropout=c.attention_probs_dropout_prob,
        layernorm_epsilon=c.layer_norm_eps, tie_embeddings=True,
        type_vocab_size=c.type_vocab_size, init_method_std=c.initializer_range)


def _llama_config(raw: dict, path: Path) -> ModelConfig:
    from transformers import LlamaConfig

    c = LlamaConfig.from_dict(raw)
    if c.hidden_act != "silu":
        raise UserError(f"{path}: hidden_act {c.hidden_act!r} is not supported (SwiGLU uses silu)")
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        raise UserError(f"{path}: attention_bias/mlp_bias are not supported (Llama has no biases)")
    if c.hidden_size % c.num_attention_heads:
        raise UserError(f"{path}: num_attention_heads must divide hidden_size")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if head_dim != c.hidden_size // c.num_attention_heads:
        raise UserError(f"{path}: head_dim {head_dim} != hidden_size / num_attention_heads "
                        "is not supported")
    rope = dict(getattr(c, "rope_parameters", None) or {})
    if not rope:  # transformers < 5 spelled these as two top-level fields
        rope = dict(raw.get("rope_scaling") or {})
        rope.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise UserError(f"{path}: RoPE scaling {rope_type!r} is not supported (only plain RoPE)")
    groups = c.num_key_value_heads or c.num_attention_heads
    return ModelConfig(
        family="gpt", num_layers=c.num_hidden_layers, hidden_size=c.hidden_size,
        num_attention_heads=c.num_attention_heads, ffn_hidden_size=c.intermediate_size,
        vocab_size=c.vocab_size, padded_vocab_size=pad_vocab(c.vocab_size),
        max_position_embeddings=c.max_position_embeddings,
        num_query_groups=None if groups == c.num_attention_heads else groups,
        hidden_dropout=0.0, attention_dropout=float(getattr(c, "attention_dropout", 0.0) or 0.0),
        layernorm_epsilon=c.rms_norm_eps, rotary_base=float(rope["rope_theta"]),
        tie_embeddings=bool(c.tie_word_embeddings), init_method_std=c.initializer_range)
