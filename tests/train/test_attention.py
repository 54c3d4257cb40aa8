"""The SDPA core attention computes megatron's local attention (the GPU path, checked on CPU),
and the loop's bf16 autocast and TP-aware clipping behave."""

from __future__ import annotations

import pytest
import torch

from tests.train.test_models import BERT, GPT, _batch, _logits


@pytest.fixture(scope="module")
def megatron():
    from factory.train import parallel

    parallel.init()


def _pair(cfg, monkeypatch):
    """The same weights built once with local attention, once with SDPA."""
    from factory.train.models import build_model

    monkeypatch.setenv("FACTORY_ATTENTION", "local")
    torch.manual_seed(0)
    local = build_model(cfg)
    monkeypatch.setenv("FACTORY_ATTENTION", "sdpa")
    sdpa = build_model(cfg)
    sdpa.load_state_dict(local.state_dict())
    return local, sdpa


def _core(model):
    return type(model.decoder.layers[0].self_attention.core_attention
                if hasattr(model, "decoder") else
                model.encoder.layers[0].self_attention.core_attention).__name__


@pytest.mark.parametrize("cfg", [BERT, GPT], ids=["bert_padding", "gpt_gqa_causal"])
def test_sdpa_attention_equals_local_attention(megatron, monkeypatch, cfg):
    local, sdpa = _pair(cfg, monkeypatch)
    assert (_core(local), _core(sdpa)) == ("DotProductAttention", "SDPAttention")
    local.eval(), sdpa.eval()
    ids, mask = _batch()
    a, b = _logits(local, cfg, ids, mask), _logits(sdpa, cfg, ids, mask)
    keep = mask.bool() if cfg.family == "bert" else torch.ones_like(mask, dtype=torch.bool)
    torch.testing.assert_close(b[keep], a[keep], atol=1e-5, rtol=1e-5)

    # The gradients too (what training sees).
    grads = []
    for model in (local, sdpa):
        model.zero_grad()
        if cfg.family == "bert":
            loss = model(ids, mask, lm_labels=ids)[keep].mean()
        else:
            pos = torch.arange(ids.shape[1]).expand_as(ids)
            loss = model(ids, pos, None, labels=ids).mean()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_sdpa_gpt_without_a_mask_is_causal(megatron, monkeypatch):
    """On GPU the GPT forward passes no mask (is_causal=True, the flash path); it must equal
    the explicit causal mask the CPU path builds."""
    from factory.train.attention import SDPAttention

    _, sdpa = _pair(GPT, monkeypatch)
    attn = sdpa.decoder.layers[0].self_attention.core_attention
    assert isinstance(attn, SDPAttention)
    attn.eval()
    q = torch.randn(10, 2, 4, 16)
    kv = torch.randn(10, 2, 2, 16), torch.randn(10, 2, 2, 16)
    causal = torch.ones(10, 10, dtype=torch.bool).triu(1)[None, None]
    torch.testing.assert_close(attn(q, *kv, None), attn(q, *kv, causal))


def test_sdpa_dropout_forks_the_tracker_only_under_tensor_parallel(megatron, monkeypatch):
    """Attention dropout draws from megatron's model-parallel tracker under tensor parallel
    (ranks drop differently); at TP=1 from the default generator, without the per-layer fork
    (host time on a launch-bound GPU step)."""
    from megatron.core import tensor_parallel

    _, sdpa = _pair(BERT, monkeypatch)       # attention dropout 0.1 (the default)
    attn = sdpa.encoder.layers[0].self_attention.core_attention
    attn.train()
    q, k, v = (torch.randn(8, 2, 4, 16) for _ in range(3))
    tracker = tensor_parallel.get_cuda_rng_tracker()

    def tracker_moved() -> bool:
        before = {n: t.clone() for n, t in tracker.get_states().items()}
        attn(q, k, v, None)
        return any(not torch.equal(before[n], t) for n, t in tracker.get_states().items())

    assert not tracker_moved()
    monkeypatch.setattr(attn.config, "tensor_model_parallel_size", 2)
    assert tracker_moved()


def test_backend_choice(monkeypatch):
    from factory.train import attention

    monkeypatch.delenv("FACTORY_ATTENTION", raising=False)
    expected = "local" if not torch.cuda.is_available() else ("te" if attention._te_attention()
                                                               else "sdpa")
    assert attention.backend() == expected
    monkeypatch.setenv("FACTORY_ATTENTION", "flash")
    with pytest.raises(ValueError, match="FACTORY_ATTENTION"):
        attention.backend()


def test_bf16_autocast_forward_is_close_to_fp32_and_keeps_fp32_weights(megatron):
    from factory.train.loop import autocast
    from factory.train.models import build_model

    torch.manual_seed(0)
    model = build_model(BERT).eval()
    ids, mask = _batch()
    keep = mask.bool()
    seen, qkv = [], []
    layer = model.encoder.layers[0]
    layer.mlp.linear_fc1.register_forward_hook(
        lambda mod, args, out: seen.append((out[0].dtype, out[1].dtype)))
    layer.self_attention.linear_qkv.register_forward_hook(
        lambda mod, args, out: qkv.append(out[0].dtype))
    with torch.no_grad():
        fp32 = model(ids, mask, lm_labels=ids)[keep].mean()
        with autocast("bf16", torch.device("cpu")):
            bf16 = model(ids, mask, lm_labels=ids)[keep].mean()
    # The matmuls ran in bf16, and the biases joined them in bf16: megatron's own linear
    # would have promoted QKV + bias (and fc1's bias add) to fp32 (ComputeDtypeBiasLinear).
    assert seen == [(torch.float32,) * 2, (torch.bfloat16,) * 2]
    assert qkv == [torch.float32, torch.bfloat16]
    assert bf16.item() != fp32.item()
    assert bf16.item() == pytest.approx(fp32.item(), rel=2e-2)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_clip_grad_norm_matches_torch_at_tp1(megatron):
    from factory.train.loop import clip_grad_norm
    from factory.train.models import build_model

    torch.manual_seed(0)
    model = build_model(BERT)
    ids, mask = _batch()
    model(ids, mask, lm_labels=ids)[mask.bool()].mean().backward()
    params = [p for p in model.parameters() if p.grad is not None]
    reference = [p.grad.clone() for p in params]
    expected = torch.linalg.vector_norm(torch.stack([g.norm() for g in reference]))
    norm = float(clip_grad_norm(params, 0.1))
    assert norm == pytest.approx(expected.item(), rel=1e-6)
    scale = 0.1 / (norm + 1e-6)
    for p, g in zip(params, reference):
        torch.testing.assert_close(p.grad, g * scale)
    assert float(clip_grad_norm(params, 0.0)) == pytest.approx(0.1, rel=1e-4)   # no clipping
