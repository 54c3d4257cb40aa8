"""A Unigram vocabulary trained by Google's `sentencepiece` (the reference trainer of T5,
ALBERT, XLM-R and most multilingual models), saved as the same `tokenizers` pipeline as the
`unigram` kind, so everything downstream (AutoTokenizer, packing, megatron) is unchanged.

The text is normalised by our pipeline's own normaliser before sentencepiece sees it (and
sentencepiece's own normalisation is off: rule `identity`, whitespace kept), so the pieces
and scores it learns are those the Rust Unigram model then uses with the same Viterbi search:
both segment alike. Unlike the `tokenizers` trainers, sentencepiece keeps its training text in
memory (its `input_sentence_size` can sample it).
"""

from __future__ import annotations

import io
import logging
from typing import Iterable, Iterator

from tokenizers import Tokenizer, models

from factory.stage import UserError
from tokenization.train import UNK, TrainOptions, build_tokenizer, specials_of

logger = logging.getLogger(__name__)

# sentencepiece drops longer "sentences" (its default limit is 4,192 bytes): documents are
# cut to this many characters (4 bytes each at worst) and the limit raised to match.
MAX_CHARS = 1 << 15


def _normalised(tok: Tokenizer, texts: Iterable[str], stats: dict) -> Iterator[str]:
    norm = tok.normalizer
    for t in texts:
        if not t:
            continue
        stats["docs"] += 1
        # newlines stay inside (a character like any other, as in the Rust pipeline)
        yield (norm.normalize_str(t) if norm else t)[:MAX_CHARS]


def train_sentencepiece(vocab_size: int, casing: str, texts: Iterable[str],
                        options: TrainOptions | None = None,
                        character_coverage: float = 0.9995,
                        model_out: io.BytesIO | None = None) -> Tokenizer:
    """A `unigram`-kind tokenizer whose pieces and scores sentencepiece trained on `texts`.

    Specials as for every non-WordPiece kind (<|endoftext|>=0, <pad>=1, <unk>=2, extras
    next); `vocab_size` counts them. `model_out` receives sentencepiece's own model (for
    comparisons). Raises UserError on empty input or a too small size.
    """
    import sentencepiece as spm

    specials = specials_of("unigram", options)
    tok = build_tokenizer("unigram", casing, options)
    n_pieces = vocab_size - len(specials) + 1          # + sentencepiece's own <unk>, mapped to ours
    if n_pieces < 2:
        raise UserError(f"tokenizer.vocab_size {vocab_size} leaves no room beside the "
                        f"{len(specials)} special tokens")
    stats = {"docs": 0}
    model = model_out if model_out is not None else io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_normalised(tok, texts, stats), model_writer=model,
            vocab_size=n_pieces, model_type="unigram", unk_id=0, bos_id=-1, eos_id=-1,
            pad_id=-1, normalization_rule_name="identity", remove_extra_whitespaces=False,
            split_digits=bool(options and options.split_digits),
            character_coverage=character_coverage,
            max_sentence_length=4 * MAX_CHARS, num_threads=2, minloglevel=2)
    except RuntimeError as e:
        if stats["docs"] == 0:
            raise UserError("no text to train the tokenizer on (the corpus is empty)") from None
        if "Vocabulary size" in str(e) or "vocab_size" in str(e):
            raise UserError(f"tokenizer.vocab_size {vocab_size} is smaller than the alphabet "
                            f"of the corpus plus {len(specials)} special tokens (sentencepiece "
                            "refuses it); raise it") from None
        raise
    if stats["docs"] == 0:
        raise UserError("no text to train the tokenizer on (the corpus is empty)")
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())
              if not sp.is_unknown(i) and sp.id_to_piece(i) not in specials]
    vocab = [(s, 0.0) for s in specials] + pieces
    tok.model = models.Unigram(vocab, unk_id=specials.index(UNK), byte_fallback=False)
    tok.add_special_tokens(specials)     # matched whole in raw text, as the trainers do
    logger.info("sentencepiece unigram: %d entries from %d documents", len(vocab), stats["docs"])
    return tok
