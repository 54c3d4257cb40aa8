"""Near-dedup recall and false removals on real text (BENCHMARKS.md).

Takes N distinct documents of a corpus, plants near-duplicate copies of P of them with a given
share of words edited (substituted, deleted or inserted at random), runs the factory's corpus
pipeline (MinHash near-dedup only) and counts: planted pairs of which a copy was removed
(recall), and other documents removed (false removals; they include near-duplicates the corpus
already had).

    python benchmarks/near_dedup.py [--docs 10000] [--planted 500] [--edit 0.02]
        [--buckets 20 --hashes 5 --ngrams 5] [--corpus ../shared/corpora/biomedical/train.jsonl.gz]
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_CORPUS = REPO.parent / "shared" / "corpora" / "biomedical" / "train.jsonl.gz"


def edit(text: str, share: float, rng: random.Random, vocab: list[str]) -> str:
    words = text.split()
    n = max(1, round(share * len(words)))
    for _ in range(n):
        i = rng.randrange(len(words))
        op = rng.random()
        if op < 0.5:
            words[i] = rng.choice(vocab)
        elif op < 0.75 and len(words) > 1:
            del words[i]
        else:
            words.insert(i, rng.choice(vocab))
    return " ".join(words)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("--docs", type=int, default=10000)
    ap.add_argument("--planted", type=int, default=500)
    ap.add_argument("--edit", type=float, default=0.02)
    ap.add_argument("--buckets", type=int, default=20)
    ap.add_argument("--hashes", type=int, default=5)
    ap.add_argument("--ngrams", type=int, default=5)
    ap.add_argument("--tasks", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    from factory.corpus.options import NearDedup
    from factory.corpus.prepare import prepare_corpus

    rng = random.Random(a.seed)
    recs, seen = [], set()
    with gzip.open(a.corpus, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r["text"] in seen or len(r["text"].split()) < 30:
                continue
            seen.add(r["text"])
            recs.append({"id": str(r["id"]), "text": r["text"]})
            if len(recs) == a.docs:
                break
    vocab = [w for r in recs[:2000] for w in r["text"].split()]
    planted = rng.sample(range(len(recs)), a.planted)
    copies = [{"id": f"copy-{i}", "text": edit(recs[i]["text"], a.edit, rng, vocab)}
              for i in planted]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = recs + copies
        rng.shuffle(data)
        halves = [data[: len(data) // 2], data[len(data) // 2:]]
        for k, part in enumerate(halves):
            with gzip.open(tmp / f"part{k}.jsonl.gz", "wt", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in part)
        nd = NearDedup(n_grams=a.ngrams, buckets=a.buckets, hashes_per_bucket=a.hashes)
        t0 = time.perf_counter()
        rep = prepare_corpus([str(tmp / "part*.jsonl.gz")], tmp / "out", near_dedup=nd,
                             exact_dedup=False, min_words=0, tasks=a.tasks)
        secs = time.perf_counter() - t0
        kept = set()
        for f in (tmp / "out").glob("*/*.jsonl.gz"):
            with gzip.open(f, "rt", encoding="utf-8") as fh:
                kept |= {json.loads(line)["id"] for line in fh}
    caught = sum(1 for i in planted if not (recs[i]["id"] in kept and f"copy-{i}" in kept))
    pair_ids = {recs[i]["id"] for i in planted}
    others = [r["id"] for r in recs if r["id"] not in pair_ids]
    false = sum(1 for i in others if i not in kept)
    print(f"| {len(recs)} docs + {a.planted} copies ({100 * a.edit:g}% words edited) | "
          f"{a.buckets} x {a.hashes}, {a.ngrams}-grams (threshold {nd.threshold:.2f}) | "
          f"recall {100 * caught / a.planted:.1f}% | distinct removed "
          f"{100 * false / len(others):.2f}% ({false}) | {secs:.0f} s |")
    print(json.dumps(rep["removed"]))


if __name__ == "__main__":
    main()
