"""What merging a continued model back with its base buys: domain against general held-out loss.

Takes a finished continued run (its export/hf and corpus/heldout), merges the export with the
manifest's base at each weight (`factory merge`; weight = the base's share: 0 is the continued
model, 1 the base) and scores every model on the domain's held-out documents and on the
general text (`corpus.general_text`, default the shipped English sample) in the units
`factory compare` uses (bits per byte for gpt, nats per masked word for bert).

    factory run domains/finance.yaml --scale tiny --run-dir RUN [--set ...]
    python benchmarks/merge_tradeoff.py domains/finance.yaml --scale tiny --run-dir RUN \
        [--set ...] [--weights 0,0.25,0.5,0.75,1] [--method linear] [--max-docs 40]
    python benchmarks/merge_tradeoff.py domains/biomedical.yaml --scale tiny --run-dir RUN \
        --keep-a-extras       # MiniLM, the base, is a sentence encoder without an MLM head
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("manifest", type=Path)
    ap.add_argument("--scale")
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--weights", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--method", default="linear")
    ap.add_argument("--max-docs", type=int, default=40)
    ap.add_argument("--keep-a-extras", action="store_true",
                    help="the base lacks the export's head (a sentence encoder): keep it")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from factory import base_checkpoint
    from factory.bench.heldout import read_documents
    from factory.bench.heldout_units import heldout_per_unit
    from factory.manifest import load
    from factory.merge import merge
    from factory.vocab import general_text

    loaded = load(args.manifest, scale=args.scale, overrides=args.overrides)
    m = loaded.manifest
    base = base_checkpoint.resolve(m.base.path, loaded.root)
    export = args.run_dir / "export" / "hf"
    domain = read_documents(sorted((args.run_dir / "corpus" / "heldout").glob("*.jsonl.gz")),
                            args.max_docs)
    general = read_documents([Path(general_text(loaded))], args.max_docs)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for w in (float(x) for x in args.weights.split(",")):
            model = Path(tmp) / f"w{w}"
            merge(export, base, model, weight=w, method=args.method,
                  keep_a_extras=args.keep_a_extras)
            row = {"base_share": w}
            for key, texts in (("domain", domain), ("general", general)):
                r = heldout_per_unit(model, texts, m.family, m.training.seq_length)
                row[key], row["unit"] = r["loss"], r["unit"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{args.method} merge of {export} with {base}; {len(domain)} domain / "
          f"{len(general)} general documents, {rows[0]['unit']}\n")
    print("| base share | domain held-out | general held-out |\n|---:|---:|---:|")
    for r in rows:
        print(f"| {r['base_share']:.2f} | {r['domain']:.4f} | {r['general']:.4f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
