"""Train a vocabulary with Hugging Face `tokenizers` and save it as a transformers folder.

Kinds:
- wordpiece: BERT's recipe (BertNormalizer, BertPreTokenizer, `##` continuations,
  [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4, "[CLS] $A [SEP]" post-processor).
- bpe: character BPE over Metaspace words (sentencepiece-BPE style; `▁` marks a word start).
- byte_bpe: GPT-2's byte-level BPE (256-byte alphabet, no unknown token), `<|endoftext|>`.
- unigram: sentencepiece's unigram LM over Metaspace words (NFKC like sentencepiece's default).
The non-WordPiece kinds share the specials `<|endoftext|>`=0 (end of document, also bos/eos),
`<pad>`=1, `<unk>`=2: a pad id distinct from eod keeps megatron's datasets from disabling
pad masking.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

from tokenizers import (Tokenizer, decoders, models, normalizers, pre_tokenizers, processors,
                        trainers)

from factory.stage import UserError
from tokenization.io import batched

logger = logging.getLogger(__name__)

Kind = Literal["wordpiece", "bpe", "byte_bpe", "unigram"]
KINDS: tuple[str, ...] = ("wordpiece", "bpe", "byte_bpe", "unigram")

WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
EOD, PAD, UNK = "<|endoftext|>", "<pad>", "<unk>"
GPT_SPECIALS = [EOD, PAD, UNK]

# Characters kept as single-character pieces (wordpiece, bpe): the 1,000 most frequent, as
# HF's BertWordPieceTokenizer does, so rare symbols of a large corpus do not crowd out words.
LIMIT_ALPHABET = 1000
BATCH = 1000


@dataclass(frozen=True)
class TrainOptions:
    """Pipeline choices beyond kind and casing (the manifest's tokenizer.* fields)."""

    strip_accents: bool | None = None     # None: strip when uncased WordPiece (BERT's rule)
    special_tokens: tuple[str, ...] = ()  # extra specials, ids right after the kind's own
    split_digits: bool = False            # every digit its own pre-token (LLaMA, PaLM)


def specials_of(kind: str, options: TrainOptions | None = None) -> list[str]:
    own = WORDPIECE_SPECIALS if kind == "wordpiece" else GPT_SPECIALS
    extra = [t for t in (options.special_tokens if options else ()) if t not in own]
    return own + list(dict.fromkeys(extra))


def build_tokenizer(kind: str, casing: str, options: TrainOptions | None = None) -> Tokenizer:
    """An untrained tokenizer pipeline of the given kind."""
    o = options or TrainOptions()
    uncased = casing == "uncased"
    # accents: BERT-uncased strips them; the other kinds keep them unless asked
    strip = o.strip_accents if o.strip_accents is not None else (uncased and kind == "wordpiece")
    accents = [normalizers.NFD(), normalizers.StripAccents(), normalizers.NFC()] if strip else []
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=strip, lowercase=uncased)
        pre = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
    elif kind == "byte_bpe":
        tok = Tokenizer(models.BPE())
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), *accents] + ([normalizers.Lowercase()] if uncased else []))
        pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    elif kind in ("bpe", "unigram"):
        tok = Tokenizer(models.BPE(unk_token=UNK) if kind == "bpe" else models.Unigram())
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFKC(), *accents] + ([normalizers.Lowercase()] if uncased else []))
        pre = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; one of {', '.join(KINDS)}")
    if o.split_digits:
        # after the word split, so a Metaspace `▁` stays a piece of its own before "2020"
        # (sentencepiece's split_digits does the same)
        digits = pre_tokenizers.Digits(individual_digits=True)
        pre = pre_tokenizers.Sequence([digits, pre] if kind == "byte_bpe" else [pre, digits])
    tok.pre_tokenizer = pre
    return tok


def _trainer(kind: str, vocab_size: int, min_frequency: int, specials: list[str]):
    if kind == "wordpiece":
        return trainers.WordPieceTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
            limit_alphabet=LIMIT_ALPHABET, continuing_subword_prefix="##", show_progress=False)
    if kind == "bpe":
        return trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
            limit_alphabet=LIMIT_ALPHABET, show_progress=False)
    if kind == "byte_bpe":
        return trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # Unigram prunes by likelihood, not by count: min_frequency has no equivalent here.
    return trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=specials, unk_token=UNK, show_progress=False)


def train_tokenizer(kind: str, vocab_size: int, casing: str, min_frequency: int,
                    texts: Iterable[str], options: TrainOptions | None = None) -> Tokenizer:
    """Train a `kind` vocabulary of `vocab_size` entries (specials included) on `texts`.

    `texts` is consumed once, in batches, never held in memory as a whole. Raises UserError
    when vocab_size cannot hold the specials plus the alphabet, or when there is no text.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; one of {', '.join(KINDS)}")
    if casing not in ("cased", "uncased"):
        raise ValueError(f"casing must be 'cased' or 'uncased', not {casing!r}")
    specials = specials_of(kind, options)
    if options is not None and options.split_digits and kind == "wordpiece":
        # transformers' BERT tokenizer class rebuilds BERT's own pre-tokeniser on loading,
        # so AutoTokenizer would cut digits differently from the trained pipeline
        raise UserError("tokenizer.split_digits: not supported yet for wordpiece (use it "
                        "with bpe, byte_bpe or unigram)")
    if kind == "byte_bpe" and vocab_size < 256 + len(specials):
        raise UserError(f"tokenizer.vocab_size {vocab_size} is smaller than the byte alphabet "
                        f"(256) plus {len(specials)} special tokens; use at least "
                        f"{256 + len(specials)}")
    if vocab_size <= len(specials):
        raise UserError(f"tokenizer.vocab_size {vocab_size} leaves no room beside the "
                        f"{len(specials)} special tokens")
    tok = build_tokenizer(kind, casing, options)
    stats = {"docs": 0}
    try:
        tok.train_from_iterator(batched(texts, BATCH, stats),
                                _trainer(kind, vocab_size, min_frequency, specials))
    except Exception as e:  # the Unigram trainer refuses a too small vocabulary itself
        if "not large enough" not in str(e):
            raise
        raise UserError(f"tokenizer.vocab_size {vocab_size} is smaller than the alphabet of the "
                        f"corpus plus {len(specials)} special tokens ({e}); raise it") from None
    if stats["docs"] == 0:
        raise UserError("no text to train the tokenizer on (the corpus is empty)")
    got = tok.get_vocab_size(with_added_tokens=True)
    if got > vocab_size:
        # The trainers keep every (kept) character even past vocab_size: the alphabet did not fit.
        alphabet = len({t.removeprefix("##") for t in tok.get_vocab()
                        if len(t.removeprefix("##")) == 1})
        raise UserError(f"tokenizer.vocab_size {vocab_size} is smaller than the alphabet of the "
                        f"corpus (~{alphabet} characters) plus {len(specials)} special tokens "
                        f"(trained vocabulary: {got}); raise vocab_size to at least {got}")
    canonical_ids(tok, kind, specials)
    if kind == "wordpiece":
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS]:0 $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    logger.info("trained %s tokenizer: %d entries from %d documents", kind, got, stats["docs"])
    return tok


def canonical_ids(tok: Tokenizer, kind: str, specials: list[str]) -> None:
    """Make the same corpus give a byte-identical tokenizer.

    The WordPiece trainer numbers tokens partly in hash-map order (the same tokens, permuted
    ids from run to run), and Unigram scores differ in the last bits (parallel float sums).
    WordPiece ids carry no meaning: renumber specials first, then by (length, token). Unigram:
    order by score, ties (equal up to float noise) by text; scores rounded to 1e-9, whose last
    digit may still flip between runs without changing any segmentation. BPE kinds are
    already deterministic.
    """
    if kind == "wordpiece":
        rest = sorted((t for t in tok.get_vocab() if t not in specials),
                      key=lambda t: (len(t.removeprefix("##")), t.startswith("##"), t))
        vocab = {t: i for i, t in enumerate([*specials, *rest])}
        tok.model = models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##",
                                     max_input_chars_per_word=100)
    elif kind == "unigram":
        pieces = json.loads(tok.to_str())["model"]["vocab"]
        head = [(t, sc) for t, sc in pieces if t in specials]
        rest = sorted(((t, sc) for t, sc in pieces if t not in specials), key=lambda p: -p[1])
        # The trainer appends the characters it must keep with made-up, falling scores in
        # hash order: give that tail's scores to its characters in sorted order instead.
        tail = len(rest)
        while tail > 0 and len(rest[tail - 1][0]) == 1:
            tail -= 1
        chars = sorted(t for t, _ in rest[tail:])
        rest[tail:] = [(t, sc) for t, (_, sc) in zip(chars, rest[tail:])]
        # Pieces of equal frequency have equal scores up to float noise: one score per such
        # group (rounded), members in text order.
        groups: list[list[tuple[str, float]]] = []
        for t, sc in rest:
            if groups and groups[-1][0][1] - sc <= 1e-7:
                groups[-1].append((t, sc))
            else:
                groups.append([(t, sc)])
        rest = [(t, round(g[0][1], 9)) for g in groups for t in sorted(t for t, _ in g)]
        tok.model = models.Unigram([*head, *rest], unk_id=[t for t, _ in head].index(UNK),
                                   byte_fallback=False)


def kind_of(tok: Tokenizer) -> str:
    """The kind of a trained tokenizer, read back from its pipeline."""
    data = json.loads(tok.to_str())
    model = data["model"]["type"]
    if model == "WordPiece":
        return "wordpiece"
    if model == "Unigram":
        return "unigram"
    pre = json.dumps(data.get("pre_tokenizer") or {})
    return "byte_bpe" if "ByteLevel" in pre else "bpe"


def lowercases(tok: Tokenizer) -> bool:
    """Whether the tokenizer's normalizer lowercases its input."""
    def walk(node) -> bool:
        if isinstance(node, dict):
            if node.get("type") == "Lowercase" or (
                    node.get("type") == "BertNormalizer" and node.get("lowercase")):
                return True
            return any(walk(v) for v in node.values())
        if isinstance(node, list):
            return any(walk(v) for v in node)
        return False
    return walk(json.loads(tok.to_str()).get("normalizer"))


def _bert_strip_accents(tok: Tokenizer, casing: str) -> bool:
    """What the pipeline's BertNormalizer does with accents (None there: as lowercase)."""
    norm = json.loads(tok.to_str()).get("normalizer") or {}
    if norm.get("type") == "BertNormalizer" and norm.get("strip_accents") is not None:
        return bool(norm["strip_accents"])
    return casing == "uncased"


def save_tokenizer(tok: Tokenizer, kind: str, out_dir: str | Path,
                   model_max_length: int = 512, casing: str | None = None) -> Path:
    """Write tokenizer.json plus the transformers files (AutoTokenizer loads `out_dir`).

    `model_max_length` is what transformers truncates to by default: the model's maximum
    sequence length (512 = BERT-base's positions). `casing` defaults to what the pipeline does.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if casing is None:
        casing = "uncased" if lowercases(tok) else "cased"
    from transformers import BertTokenizerFast, PreTrainedTokenizerFast

    if kind == "wordpiece":
        hf = BertTokenizerFast(
            tokenizer_object=tok, do_lower_case=casing == "uncased",
            strip_accents=_bert_strip_accents(tok, casing), model_max_length=model_max_length,
            unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]",
            mask_token="[MASK]")
    else:
        hf = PreTrainedTokenizerFast(
            tokenizer_object=tok, model_max_length=model_max_length,
            bos_token=EOD, eos_token=EOD, unk_token=UNK, pad_token=PAD)
    hf.save_pretrained(str(out))
    # The Rust tokenizer as trained is the reference: make sure the folder holds exactly it.
    tok.save(str(out / "tokenizer.json"))
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if kind != "wordpiece":
        # transformers 5 writes its internal class name; this alias loads in 4.x too.
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    # transformers 5 no longer writes these; older readers (and megatron's legacy BERT
    # tokenizer, which wants vocab.txt) still look for them.
    roles = (("unk", "sep", "pad", "cls", "mask") if kind == "wordpiece"
             else ("bos", "eos", "unk", "pad"))
    specials = {f"{r}_token": cfg[f"{r}_token"] for r in roles
                if isinstance(cfg.get(f"{r}_token"), str)}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n",
                                                encoding="utf-8")
    if kind == "wordpiece":
        vocab = sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
        (out / "vocab.txt").write_text("".join(t + "\n" for t, _ in vocab), encoding="utf-8")
    return out


def load_backend(path: str | Path) -> tuple[Tokenizer, Path, str]:
    """The Rust tokenizer of a folder (or tokenizer.json), its folder, and its JSON text.

    A folder with only vocab.txt / sentencepiece files is converted through transformers.
    Raises UserError when `path` holds no valid tokenizer.
    """
    p = Path(path)
    folder = p.parent if p.is_file() else p
    tj = p if p.is_file() else p / "tokenizer.json"
    if tj.is_file():
        try:
            text = tj.read_text(encoding="utf-8")
            tok = Tokenizer.from_str(text)
        except Exception as e:  # noqa: BLE001 - any parse failure means a bad file
            raise UserError(f"{tj}: not a valid tokenizer.json ({e.__class__.__name__}: "
                            f"{str(e)[:120]}); give a tokenizer folder or tokenizer.json "
                            "saved by `tokenizers`/`transformers`") from None
        return tok, folder, text
    if not folder.is_dir():
        raise UserError(f"{p}: no tokenizer folder or tokenizer.json there")
    if not any((folder / f).is_file() for f in ("vocab.txt", "vocab.json", "tokenizer.model",
                                                "spiece.model", "sentencepiece.bpe.model")):
        raise UserError(f"{folder}: no tokenizer files (tokenizer.json, vocab.txt, vocab.json, "
                        "tokenizer.model); give a tokenizer folder")
    from transformers import AutoTokenizer

    try:
        fast = AutoTokenizer.from_pretrained(str(folder), use_fast=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for bad folders
        raise UserError(f"{folder}: transformers cannot load a tokenizer from it "
                        f"({e.__class__.__name__}: {str(e)[:120]})") from None
    if not getattr(fast, "is_fast", False):
        raise UserError(f"{folder}: no fast (Rust) tokenizer can be built from its files")
    tok = fast.backend_tokenizer
    return tok, folder, tok.to_str()
