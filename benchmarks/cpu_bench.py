"""What the CPU step benchmarks (cpu_step_time.py, host_time.py, host_syncs.py) share: their
common flags, the process setup, the JSON record."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parser(doc: str, *, steps: int, threads: int, compiled: bool = False
           ) -> argparse.ArgumentParser:
    """An ArgumentParser with --steps, --threads and --json (and with `compiled`, --compiled:
    throughput.bert_runners' compiled rows); the script adds its own flags."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--steps", type=int, default=steps, help="timed steps per row")
    ap.add_argument("--threads", type=int, default=threads)
    ap.add_argument("--json", type=Path, help="also write the results here")
    if compiled:
        ap.add_argument("--compiled", action="store_true",
                        help="add rows with torch.compile'd layers, HF's and ours (compiling "
                             "takes 10-30 s first)")
    return ap


def start(args: argparse.Namespace, seed: int = 1234) -> None:
    """Log to stdout, fix torch's threads, initialise the one-process megatron state."""
    import torch

    from factory.train import parallel

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    parallel.init(seed=seed)


def record(args: argparse.Namespace, **results) -> None:
    """With --json: the flags and `results` there."""
    if args.json:
        config = {k: v for k, v in vars(args).items() if k != "json"}
        args.json.write_text(json.dumps({"config": config, **results}, indent=2) + "\n")
