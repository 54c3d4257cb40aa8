"""Continued pretraining with an extended vocabulary: when vocab/extension.json exists the
pretrain stage resizes the base (tokenization.embeddings.extend_hf_model) before importing it."""

from __future__ import annotations

import json

import torch

from tests.train.conftest import needs_pubmed, pubmed_texts, train_tokenizer


@needs_pubmed
def test_extended_vocabulary_base_is_built_and_loaded(tmp_path):
    from tokenizers import Tokenizer
    from transformers import BertConfig, BertForMaskedLM

    from factory.stage import MemoryLog, StageContext
    from factory.train import parallel
    from factory.train.convert import load_hf_into_megatron
    from factory.train.models import build_model
    from factory.train.stage import EXTENDED_BASE, PretrainConfig, PretrainStage
    from tests.train.conftest import pretrain_stage

    base = tmp_path / "base"
    train_tokenizer("wordpiece", pubmed_texts(60), 300, base)
    n_base = Tokenizer.from_file(str(base / "tokenizer.json")).get_vocab_size()
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=n_base, hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64,
                               max_position_embeddings=128)).save_pretrained(base)

    vocab = tmp_path / "vocab"
    import shutil

    shutil.copytree(base, vocab / "tokenizer", ignore=shutil.ignore_patterns(
        "model.safetensors", "config.json", "generation_config.json"))
    tok = Tokenizer.from_file(str(vocab / "tokenizer" / "tokenizer.json"))
    tok.add_tokens(["acetyltransferase", "phosphorylation"])
    tok.save(str(vocab / "tokenizer" / "tokenizer.json"))
    (vocab / "extension.json").write_text(json.dumps({"added": 2}))

    c = pretrain_stage("bert").config
    stage = PretrainStage(PretrainConfig(**{**c.model_dump(), "strategy": "continued",
                                            "model_dims": None, "base": str(base)}))
    out = tmp_path / "out"
    out.mkdir()
    ctx = StageContext(out=out, inputs={"vocab": vocab, "pack": tmp_path}, log=MemoryLog())
    folder = stage._base_folder(ctx, writer=True)
    assert folder == out / EXTENDED_BASE
    cfg = stage._model_config(n_base + 2, folder)
    # the tokenizer's size is the real vocabulary; the extended base's padded rows stay
    assert cfg.vocab_size == n_base + 2 and cfg.padded_vocab_size == 384

    parallel.init()
    model = build_model(cfg)
    load_hf_into_megatron(model, folder, cfg)
    emb = model.embedding.word_embeddings.weight
    original = BertForMaskedLM.from_pretrained(base).bert.embeddings.word_embeddings.weight
    assert torch.equal(emb[:n_base], original)            # base rows untouched
    assert emb[n_base:n_base + 2].abs().sum() > 0          # new rows initialised
    # Without extension.json the base is used as is.
    (vocab / "extension.json").unlink()
    assert stage._base_folder(ctx, writer=True) == base
