"""A saved tokenizer folder seen through megatron-core's tokenizer interface.

Megatron's datasets take a `MegatronTokenizerBase` in their config: GPTDataset reads
`vocab_size` and `eod`, BERTMaskedWordPieceDataset reads `inv_vocab` (a `##` prefix marks a
WordPiece continuation for whole-word masking), `cls`, `sep`, `mask` and `pad`, and every
dataset hashes `unique_identifiers` into its cache file names. This adapter answers those from
the folder's tokenizer.json with the Rust `tokenizers` library (no transformers import).

megatron.core is imported when this module is imported: keep it out of CLI start-up paths.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from megatron.core.tokenizers import MegatronTokenizerBase
from tokenizers import Tokenizer

from tokenization.train import load_backend

# Names tried, in order, when the folder's config files do not name a special token.
_FALLBACK = {
    "cls": ("[CLS]", "<s>", "<cls>"),
    "sep": ("[SEP]", "</s>", "<sep>"),
    "mask": ("[MASK]", "<mask>"),
    "pad": ("[PAD]", "<pad>"),
    "unk": ("[UNK]", "<unk>"),
    "bos": ("<|endoftext|>", "<s>", "[CLS]"),
    "eos": ("<|endoftext|>", "</s>", "[SEP]"),
}
# The end-of-document marker of a causal corpus: what GPT-2/Llama-style pretraining puts
# between documents, whatever the chat-tuned eos of the folder says.
_EOD_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")


def _named_specials(folder: Path) -> dict[str, str]:
    """Special-token strings named by the transformers config files of the folder."""
    named: dict[str, str] = {}
    for fname in ("tokenizer_config.json", "special_tokens_map.json"):
        f = folder / fname
        if not f.is_file():
            continue
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for role in ("cls", "sep", "mask", "pad", "unk", "bos", "eos"):
            v = data.get(f"{role}_token")
            if isinstance(v, dict):  # AddedToken serialised as a dict
                v = v.get("content")
            if isinstance(v, str) and role not in named:
                named[role] = v
    return named


def _word_starts(data: dict, inv: dict[int, str], specials: set[str]) -> dict[int, bool]:
    """Whether each token begins a word, from the pre-tokeniser's markers.

    WordPiece: every piece but a `##` continuation. Metaspace (bpe, unigram): pieces that
    begin with `▁`. Byte-level BPE: pieces that begin with an encoded space, newline or tab
    (Ġ Ċ ĉ) or with a non-alphanumeric character (GPT-2's pre-tokeniser splits punctuation
    off); a word at the very start of a text or line carries no marker and joins the token
    before it (masked with it), a small cost at document and line starts.
    """
    model = data["model"]
    if model["type"] == "WordPiece":
        prefix = model.get("continuing_subword_prefix") or "##"
        return {i: t in specials or not t.startswith(prefix) for i, t in inv.items()}
    pre = json.dumps(data.get("pre_tokenizer") or {})
    if "ByteLevel" in pre:
        return {i: t in specials or t[:1] in ("Ġ", "Ċ", "ĉ") or not t[:1].isalnum()
                for i, t in inv.items()}
    if "Metaspace" in pre:
        rep = "▁"
        return {i: t in specials or t.startswith(rep) for i, t in inv.items()}
    return {i: True for i in inv}     # unknown scheme: every token its own word


class MegatronTokenizer(MegatronTokenizerBase):
    """A tokenizer folder (or tokenizer.json) as megatron-core's datasets want it."""

    def __init__(self, path: str | Path, **kwargs) -> None:
        tok, folder, text = load_backend(path)
        super().__init__(str(path), {}, **kwargs)
        # Measuring and packing need every token: no truncation, no padding, no [CLS]/[SEP].
        tok.no_truncation()
        tok.no_padding()
        self._tok = tok
        self._vocab = tok.get_vocab(with_added_tokens=True)
        # In id order: megatron's BERT dataset draws its 10% random replacements by position
        # in `list(inv_vocab)`, and the Rust vocabulary is a hash map whose order changes from
        # process to process (every sample would change, breaking exact resume).
        self._inv = {i: t for t, i in sorted(self._vocab.items(), key=lambda kv: kv[1])}
        data = json.loads(text)
        self.model_type = data["model"]["type"]  # WordPiece | BPE | Unigram | ...
        specials = {a["content"] for a in data.get("added_tokens", []) if a.get("special")}
        starts = _word_starts(data, self._inv, specials)
        self.word_start = [bool(starts.get(i, True)) for i in range(max(self._inv) + 1)]
        # Megatron's whole-word masking knows one convention: a `##` prefix marks a piece
        # that continues a word. A byte-level or Metaspace vocabulary marks word STARTS
        # instead (Ġ, ▁): its continuation pieces are shown with `##` here, so masking works
        # for every kind. (The strings are for megatron's masking only; decode with
        # `detokenize`.)
        if self.model_type != "WordPiece":
            self._inv = {i: t if self.word_start[i] else "##" + t for i, t in self._inv.items()}
        named = _named_specials(folder)
        self._ids: dict[str, int | None] = {}
        for role, names in _FALLBACK.items():
            cands = ((named[role],) if role in named else ()) + names
            self._ids[role] = next((self._vocab[n] for n in cands if n in self._vocab), None)
        if self.model_type == "WordPiece":
            eod = self._ids["sep"]
        else:
            eod = next((self._vocab[n] for n in _EOD_NAMES if n in self._vocab), self._ids["eos"])
        if eod is None:
            raise ValueError(f"{path}: tokenizer has no end-of-document token "
                             f"(one of [SEP], {', '.join(_EOD_NAMES)})")
        self._ids["eod"] = eod
        self.unique_identifiers = {
            "class": type(self).__name__,
            "tokenizer_json_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        }

    # --- megatron's abstract interface ---------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def vocab(self) -> dict[str, int]:
        return self._vocab

    @property
    def vocab_size(self) -> int:
        # the unpadded size every id fits in (equal to the entry count unless ids have holes)
        return max(self._tok.get_vocab_size(with_added_tokens=True), max(self._inv) + 1)

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("chat templates are not used for pretraining")

    # --- what megatron's datasets read ---------------------------------------------------

    @property
    def inv_vocab(self) -> dict[int, str]:
        return self._inv

    @property
    def cls(self) -> int | None:
        return self._ids["cls"]

    @property
    def sep(self) -> int | None:
        return self._ids["sep"]

    @property
    def mask(self) -> int | None:
        return self._ids["mask"]

    @property
    def pad(self) -> int:
        # Missing pad raises instead of returning None: megatron's datasets catch the error
        # and pad with -1, where a None would break numpy padding later.
        if self._ids["pad"] is None:
            raise AttributeError("this tokenizer has no pad token")
        return self._ids["pad"]

    @property
    def unk(self) -> int | None:
        return self._ids["unk"]

    @property
    def bos(self) -> int | None:
        return self._ids["bos"]

    @property
    def eos(self) -> int | None:
        return self._ids["eos"]

    @property
    def eod(self) -> int:
        return self._ids["eod"]

    @property
    def backend(self) -> Tokenizer:
        """The Rust tokenizer (truncation and padding off): batch encoding for packing."""
        return self._tok
