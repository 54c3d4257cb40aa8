"""The README's "Add your domain", followed to the letter: its shell commands and its manifest, and
nothing else, give a domain that validates and (slow) runs at the smoke scale.

The user's own text (`~/my-contracts/*.txt` in the doc) is real legal text: the licence
documents of the embedded legal sample, one file each.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO

N_TEXTS = 150


def _section() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index("\n## Add your domain\n")
    return text[start:text.index("\n## ", start + 1)]


def _blocks(lang: str) -> list[str]:
    return [b for kind, b in re.findall(r"```(\w+)\n(.*?)```", _section(), re.S) if kind == lang]


def _commands() -> list[str]:
    """Every shell line of the doc, continuation lines joined, comments dropped."""
    lines = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #", 1)[0].strip()
            if line:
                lines.append(line)
    return lines


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A checkout-like folder after steps 1-3 of the doc: commands run, manifest edited."""
    root = tmp_path_factory.mktemp("user")
    (root / "domains").mkdir()
    shutil.copy(REPO / "domains" / "legal.yaml", root / "domains" / "legal.yaml")
    home = root / "home"
    texts = home / "my-contracts"
    texts.mkdir(parents=True)
    with gzip.open(REPO / "domains/legal/licences/train.jsonl.gz", "rt", encoding="utf-8") as f:
        for i, line in zip(range(N_TEXTS), f):
            (texts / f"contract{i:03d}.txt").write_text(json.loads(line)["text"],
                                                        encoding="utf-8")
    bin_dir = root / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "factory"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m factory.cli "$@"\n')
    shim.chmod(0o755)
    env = {**os.environ, "HOME": str(home), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "FACTORY_RUNS_ROOT": str(root / "runs")}
    env.pop("MLFLOW_TRACKING_URI", None)

    def sh(line: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", line], cwd=root, env=env, capture_output=True,
                              text=True, timeout=timeout)

    setup = [c for c in _commands() if not c.startswith("factory ")]
    assert setup, "the doc shows no set-up commands"
    for line in setup:
        r = sh(line)
        assert r.returncode == 0, f"{line}: {r.stderr}"
    manifests = _blocks("yaml")
    assert len(manifests) == 1, "the doc shows one manifest"
    (root / "domains" / "contracts.yaml").write_text(manifests[0], encoding="utf-8")
    return {"root": root, "sh": sh}


def _factory_line(*starts: str) -> str:
    hits = [c for c in _commands() if c.startswith(starts)]
    assert hits, f"the doc shows no `{starts[0]}` command"
    return hits[0]


def test_doc_commands_put_the_text_where_the_manifest_reads_it(workspace):
    sample = workspace["root"] / "domains" / "contracts" / "sample"
    assert len(list(sample.glob("*.txt"))) == N_TEXTS


def test_doc_manifest_validates_with_the_doc_command(workspace):
    r = workspace["sh"](_factory_line("factory validate"))
    assert r.returncode == 0, r.stderr
    assert "valid (full, tiny, smoke)" in r.stdout


@pytest.mark.slow
def test_doc_manifest_runs_at_smoke_scale(workspace):
    root = workspace["root"]
    r = workspace["sh"](_factory_line("factory run domains/contracts.yaml --scale smoke"),
                        timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads((root / "runs" / "contracts-smoke" / "summary.json").read_text())
    assert all(s["status"] == "done" for s in summary["stages"].values())
    corpus = summary["stages"]["corpus"]["metrics"]
    assert corpus["contracts.docs_read"] == N_TEXTS
    ev = summary["stages"]["evaluate"]["metrics"]
    assert 0 < ev["heldout_loss"] < 20
