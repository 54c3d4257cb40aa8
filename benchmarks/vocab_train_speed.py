"""Training time of `factory vocab train` vs the `tokenizers` trainer called directly on the
same input (the same pipeline: BERT normaliser and pre-tokeniser, WordPiece trainer, same
vocabulary size and alphabet limit). Both run as fresh processes, alternating, so start-up and
JSON reading are counted on both sides. Reports wall time and CPU time (user + system of the
child, all threads): on a machine shared with other jobs, wall time measures the neighbours,
CPU time our own work. Target: ratio <= 1.2.

    python benchmarks/vocab_train_speed.py [--input ../shared/corpora/biomedical/train.jsonl.gz]
        [--vocab-size 30522] [--repeats 1] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_INPUT = REPO.parent / "shared" / "corpora" / "biomedical" / "train.jsonl.gz"

# The plain `tokenizers` recipe: what a user would write without the factory.
DIRECT = r"""
import gzip, json, sys
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
path, size, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
trainer = trainers.WordPieceTrainer(vocab_size=size, min_frequency=2, limit_alphabet=1000,
    special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False)
def batches():
    batch = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            batch.append(json.loads(line)["text"])
            if len(batch) == 1000:
                yield batch
                batch = []
    if batch:
        yield batch
tok.train_from_iterator(batches(), trainer)
tok.save(out)
"""


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", default=str(DEFAULT_INPUT))
    ap.add_argument("--vocab-size", type=int, default=30522)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--keep", help="Keep the factory-trained tokenizer folder here.")
    args = ap.parse_args()
    if not Path(args.input).is_file():
        sys.exit(f"no input at {args.input} (the shared corpora are not on this machine)")
    tmp = Path(tempfile.mkdtemp(prefix="vocab-speed-"))
    ours_out = Path(args.keep) if args.keep else tmp / "factory"
    ours, direct = [], []
    for _ in range(args.repeats):
        ours.append(timed([sys.executable, "-m", "factory.cli", "vocab", "train", "--kind",
                           "wordpiece", "--vocab-size", str(args.vocab_size), "--input",
                           args.input, "--output", str(ours_out)]))
        direct.append(timed([sys.executable, "-c", DIRECT, args.input, str(args.vocab_size),
                             str(tmp / "direct.json")]))
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}; load average {os.getloadavg()[0]:.1f}; input "
          f"{args.input}; vocab {args.vocab_size}")
    print(f"| command | wall s (best of {args.repeats}) | CPU s (best of {args.repeats}) |")
    print("|---|---:|---:|")
    for name, runs in (("factory vocab train", ours), ("tokenizers directly", direct)):
        print(f"| {name} | {min(w for w, _ in runs):.1f} | {min(c for _, c in runs):.1f} |")
    for i, what in ((0, "wall"), (1, "CPU")):
        ratio = min(r[i] for r in ours) / min(r[i] for r in direct)
        print(f"{what} ratio factory / direct = {ratio:.3f} (target <= 1.2)")
    print(f"all runs (wall, CPU): ours {[(round(w, 1), round(c, 1)) for w, c in ours]}, "
          f"direct {[(round(w, 1), round(c, 1)) for w, c in direct]}")


if __name__ == "__main__":
    main()
