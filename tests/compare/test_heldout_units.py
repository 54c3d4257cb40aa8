"""Held-out measures comparable across vocabularies (factory.bench.heldout_units)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from factory.bench import heldout_units as hu
from tests.bench import save_tiny_bert, save_tiny_llama
from tests.conftest import needs_minilm

TEXTS = ["Acetyltransferase deficiency was found in 12 of 40 patients with colorectal adenomas.",
         "The BRCA1 gene, a tumour suppressor, is mutated in hereditary breast cancer."]


def test_token_words_and_windows_keep_words_whole():
    text = "ab cd efgh"
    spans = hu._word_spans(text)
    offsets = [(0, 1), (1, 2), (3, 5), (6, 8), (8, 10)]
    word_of = hu._token_words(offsets, spans)
    assert word_of == [0, 0, 1, 2, 2]
    assert hu._windows(word_of, 3) == [(0, 3), (3, 5)]   # never cuts "efgh" in two
    assert hu._windows(word_of, 1) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]


def _chosen_words(texts, mask_prob=0.15, seed=hu.SEED) -> int:
    return sum(int((np.random.default_rng([seed, d]).random(len(hu._word_spans(t)))
                    < mask_prob).sum()) for d, t in enumerate(texts))


@needs_minilm
def test_bert_scores_the_same_words_whatever_the_vocabulary(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

    texts = TEXTS * 20
    expected = _chosen_words(texts)
    a = hu.heldout_per_unit(save_tiny_bert(tmp_path / "a"), texts, "bert", 32)
    # A character-level vocabulary: many more pieces per word, the same words scored.
    chars = sorted({c for t in texts for c in t if not c.isspace()})
    vocab = {s: i for i, s in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                  cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    BertForMaskedLM(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64)).save_pretrained(
        tmp_path / "b")
    tok.save_pretrained(tmp_path / "b")
    b = hu.heldout_per_unit(tmp_path / "b", texts, "bert", 32)
    assert a["units"] == b["units"] == expected > 0
    assert a["unit"] == b["unit"] == "nats/word (whole-word masked)"
    # A random model pays about log(V) per piece: the char model's words cost several pieces.
    assert b["loss"] > 2 * math.log(len(vocab))


@needs_minilm
def test_gpt_bits_per_byte_equals_the_models_own_loss(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = save_tiny_llama(tmp_path / "llama")
    text = TEXTS[0]
    r = hu.heldout_per_unit(folder, [text], "gpt", 256)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([[tok.cls_token_id, *tok(text, add_special_tokens=False)["input_ids"]]])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()   # mean over ids.shape[1] - 1
    expected = loss * (ids.shape[1] - 1) / math.log(2) / len(text.encode())
    assert r["unit"] == "bits/byte" and r["units"] == len(text.encode())
    assert r["loss"] == pytest.approx(expected, rel=1e-4)
