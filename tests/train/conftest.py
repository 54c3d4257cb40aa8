"""Fixtures for the pretrain tests: real PubMed text -> a tokenizer folder and a pack/ folder.

They follow the vocab/ and pack/ folder contracts byte for byte (tokenizer/ loadable with
AutoTokenizer, <source>_train.bin/.idx, heldout.bin/.idx, unigram_counts.npy, pack.json), but
are built here with `tokenizers` and megatron's IndexedDatasetBuilder directly, so these tests
do not depend on the corpus/vocab/pack stages.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
PUBMED = REPO / "domains" / "biomedical" / "pubmed" / "train.jsonl.gz"

# Split after sentence-final punctuation when a capital or digit follows (pack/ contract, bert).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9])")


def pubmed_texts(n: int, skip: int = 0) -> list[str]:
    out = []
    with gzip.open(PUBMED, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i < skip:
                continue
            if len(out) == n:
                break
            out.append(json.loads(line)["text"])
    return out


def train_tokenizer(kind: str, texts: list[str], vocab_size: int, out_dir: Path) -> Path:
    """A WordPiece (BERT layout: [PAD]=0 [UNK] [CLS] [SEP] [MASK]) or byte-level BPE folder."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    from tokenization.train import canonical_ids

    out_dir.mkdir(parents=True, exist_ok=True)
    if kind == "wordpiece":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials,
                                            min_frequency=2)
        config = {"tokenizer_class": "BertTokenizerFast", "do_lower_case": True,
                  "model_max_length": 512}
        special_map = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]",
                       "sep_token": "[SEP]", "mask_token": "[MASK]"}
    else:
        specials = ["<|endoftext|>"]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                      min_frequency=2,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 2048,
                  "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                  "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
        special_map = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    tok.train_from_iterator(texts, trainer=trainer)
    # The vocab stage's renumbering: the WordPiece trainer's ids vary from process to
    # process, and with them every test's data and losses.
    canonical_ids(tok, kind, specials)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
    return out_dir


def write_pack(family: str, tokenizer_dir: Path, sources: dict[str, tuple[list[str], float]],
               heldout: list[str], out_dir: Path) -> Path:
    """A pack/ folder: bert documents as sentence lists, gpt documents + end-of-document id."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    vocab_size = tok.get_vocab_size()
    eod = tok.token_to_id("[SEP]" if family == "bert" else "<|endoftext|>")
    dtype = np.uint16 if vocab_size < 65500 else np.int32
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = np.zeros(vocab_size, dtype=np.int64)

    def build(prefix: str, texts: list[str], count: bool) -> tuple[int, int]:
        builder = IndexedDatasetBuilder(str(out_dir / f"{prefix}.bin"), dtype=dtype)
        n_tokens = 0
        for text in texts:
            if family == "bert":
                pieces = [s for s in _SENTENCE_END.split(text) if s.strip()]
                seqs = [e.ids for e in tok.encode_batch(pieces, add_special_tokens=False)]
                seqs = [s for s in seqs if s]
            else:
                seqs = [tok.encode(text, add_special_tokens=False).ids + [eod]]
            flat = [t for s in seqs for t in s]
            if not flat:
                continue
            builder.add_document(flat, [len(s) for s in seqs])
            n_tokens += len(flat)
            if count:
                np.add.at(counts, np.asarray(flat), 1)
        builder.finalize(str(out_dir / f"{prefix}.idx"))
        return len(texts), n_tokens

    meta = {"family": family, "vocab_size": vocab_size, "dtype": np.dtype(dtype).name,
            "eod_id": eod, "sources": {}}
    for name, (texts, weight) in sources.items():
        docs, tokens = build(f"{name}_train", texts, count=True)
        meta["sources"][name] = {"prefix": f"{name}_train", "weight": weight, "docs": docs,
                                 "tokens": tokens}
    docs, tokens = build("heldout", heldout, count=False)
    meta["heldout"] = {"prefix": "heldout", "docs": docs, "tokens": tokens}
    np.save(out_dir / "unigram_counts.npy", counts)
    (out_dir / "pack.json").write_text(json.dumps(meta, indent=2))
    return out_dir


def _make_inputs(root: Path, family: str, vocab_size: int,
                 sources: dict[str, tuple[int, int, float]]) -> dict[str, Path]:
    """vocab/ and pack/ folders under root; sources: name -> (first doc, n docs, weight)."""
    texts = {name: pubmed_texts(n, skip=first) for name, (first, n, _) in sources.items()}
    vocab = root / "vocab"
    train_tokenizer("wordpiece" if family == "bert" else "bpe",
                    [t for ts in texts.values() for t in ts], vocab_size, vocab / "tokenizer")
    write_pack(family, vocab / "tokenizer",
               {name: (texts[name], w) for name, (_, _, w) in sources.items()},
               pubmed_texts(20, skip=4900), root / "pack")
    return {"vocab": vocab, "pack": root / "pack"}


needs_pubmed = pytest.mark.skipif(not PUBMED.exists(), reason=f"no embedded sample at {PUBMED}")


@pytest.fixture(scope="session")
def bert_inputs(tmp_path_factory) -> dict[str, Path]:
    """One source of 400 PubMed abstracts, WordPiece 2,048."""
    if not PUBMED.exists():
        pytest.skip(f"no embedded sample at {PUBMED}")
    return _make_inputs(tmp_path_factory.mktemp("bert_inputs"), "bert", 2048,
                        {"pubmed": (0, 400, 1.0)})


@pytest.fixture(scope="session")
def gpt_inputs(tmp_path_factory) -> dict[str, Path]:
    """One source of 400 PubMed abstracts, byte-level BPE 2,048."""
    if not PUBMED.exists():
        pytest.skip(f"no embedded sample at {PUBMED}")
    return _make_inputs(tmp_path_factory.mktemp("gpt_inputs"), "gpt", 2048,
                        {"pubmed": (0, 400, 1.0)})


@pytest.fixture(scope="session")
def blend_inputs(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Two sources (300 and 100 abstracts) weighted 0.3 / 0.7, for both families."""
    if not PUBMED.exists():
        pytest.skip(f"no embedded sample at {PUBMED}")
    root = tmp_path_factory.mktemp("blend_inputs")
    spec = {"big": (0, 300, 0.3), "small": (300, 100, 0.7)}
    return {family: _make_inputs(root / family, family, 2048, spec) for family in ("bert", "gpt")}


def pretrain_stage(family: str, *overrides: str):
    """The pretrain stage of the biomedical manifest at smoke scale, switched to `family`."""
    from factory import manifest
    from factory.train.stage import PretrainStage

    extra = [] if family == "bert" else ["family=gpt", "tokenizer.kind=bpe",
                                         "training.mask_prob=null"]
    loaded = manifest.load(REPO / "domains" / "biomedical.yaml", scale="smoke",
                           overrides=[*extra, *overrides])
    return PretrainStage.from_manifest(loaded)
