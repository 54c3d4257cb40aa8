"""Shared model folders for the bench and evaluate-stage tests (built into tmp, never mocked)."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import MINILM  # noqa: E402
REPO = Path(__file__).resolve().parents[2]
NCBI_SLICE = REPO / "domains/biomedical/ncbi_disease"
HELDOUT = REPO / "domains/biomedical/pubmed/heldout.jsonl.gz"
TRAIN = REPO / "domains/biomedical/pubmed/train.jsonl.gz"


def save_minilm_mlm(dest: Path) -> Path:
    """MiniLM as a BertForMaskedLM folder, as the export stage writes one.

    MiniLM ships as a BertModel, so the MLM head's transform is freshly initialised (seeded);
    the decoder is tied to the real word embeddings.
    """
    import torch
    from transformers import AutoTokenizer, BertForMaskedLM

    torch.manual_seed(0)
    BertForMaskedLM.from_pretrained(MINILM).save_pretrained(dest)
    AutoTokenizer.from_pretrained(MINILM).save_pretrained(dest)
    return dest


def save_padded(src: Path, dest: Path, vocab_size: int) -> Path:
    """The MLM folder `src` with its vocabulary grown past the tokenizer's, as Megatron pads
    it; the padded rows are given a large bias so they would win any softmax they enter."""
    import torch
    from transformers import AutoTokenizer, BertForMaskedLM

    model = BertForMaskedLM.from_pretrained(src)
    old = model.config.vocab_size
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    with torch.no_grad():
        model.get_output_embeddings().bias[old:] = 20.0
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(src).save_pretrained(dest)
    return dest


def save_tiny_bert(dest: Path, hidden: int = 64, layers: int = 2, heads: int = 2,
                   ffn: int = 128) -> Path:
    """A randomly initialised BertForMaskedLM with MiniLM's tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(MINILM)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=ffn)
    BertForMaskedLM(cfg).save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


def save_tiny_llama(dest: Path) -> Path:
    """A randomly initialised LlamaForCausalLM with MiniLM's tokenizer (the gpt family)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(MINILM)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
    LlamaForCausalLM(cfg).save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest
