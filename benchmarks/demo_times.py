"""Wall time and per-stage times of `factory run` (the README demo by default), and of a
second, fully cached run. Prints a markdown table for BENCHMARKS.md.

    python benchmarks/demo_times.py [--manifest domains/biomedical.yaml] [--scale tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(manifest: str, scale: str, run_dir: Path, env: dict) -> tuple[float, dict]:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "factory.cli", "run", manifest, "--scale", scale,
                    "--run-dir", str(run_dir)], cwd=REPO, env=env, check=True)
    return time.perf_counter() - t0, json.loads((run_dir / "summary.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--manifest", default="domains/biomedical.yaml")
    ap.add_argument("--scale", default="tiny")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="factory-bench-"))
    env = {**os.environ, "FACTORY_RUNS_ROOT": str(root)}
    env.pop("MLFLOW_TRACKING_URI", None)
    run_dir = root / f"{Path(args.manifest).stem}-{args.scale}"
    first, s1 = run(args.manifest, args.scale, run_dir, env)
    second, s2 = run(args.manifest, args.scale, run_dir, env)
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}")
    print(f"command: factory run {args.manifest} --scale {args.scale}\n")
    print("| stage | seconds | key metrics |\n|---|---|---|")
    for name, st in s1["stages"].items():
        m = ", ".join(f"{k}={v:.4g}" for k, v in st["metrics"].items())
        print(f"| {name} | {st['seconds']:.1f} | {m} |")
    print(f"| **wall (whole command)** | **{first:.1f}** | |")
    cached = all(st["status"] == "cached" for st in s2["stages"].values())
    print(f"\nsecond run: {second:.1f} s wall, every stage cached: {cached}")


if __name__ == "__main__":
    main()
