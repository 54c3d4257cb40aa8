"""The domain manifests: every one validates at every scale, its small scales run from the
repository alone, its embedded samples are what their PROVENANCE.md says, and (slow) each
domain's smoke run goes through every stage.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from factory import manifest as mf
from tests.conftest import FACTORY, REPO

DOMAINS = REPO / "domains"
MANIFESTS = sorted(DOMAINS.glob("*.yaml"))
# The manifests of issue 7 (biomedical.yaml is the lead's and has its own e2e tests).
OURS = ["legal", "stackoverflow", "finance", "code", "maltese", "maltese-continued"]
SAMPLES = {"legal": "licences", "stackoverflow": "python_docs_qa", "finance": "gnucash",
           "code": "cpython_stdlib", "maltese": "korpus_malti"}
SMALL = ("tiny", "smoke")
SAMPLE_CAP = 3_000_000   # bytes on disk per domain folder: "a few MB at most"
STAGES = ["corpus", "vocab", "pack", "pretrain", "export", "evaluate"]


def _cases():
    for path in MANIFESTS:
        for scale in [None, *mf.scales_of(path)]:
            yield pytest.param(path, scale, id=f"{path.stem}-{scale or 'full'}")


def test_every_domain_of_the_product_has_a_manifest():
    names = {p.stem for p in MANIFESTS}
    assert {"biomedical", *OURS} <= names
    for path in MANIFESTS:
        assert set(SMALL) <= set(mf.scales_of(path)), f"{path.name} lacks a tiny/smoke scale"


@pytest.mark.parametrize("path,scale", list(_cases()))
def test_manifest_validates(path, scale):
    loaded = mf.load(path, scale=scale)
    assert loaded.manifest.name == path.stem


@pytest.mark.parametrize("name", OURS)
def test_header_cites_the_paper_and_states_the_budget(name):
    text = (DOMAINS / f"{name}.yaml").read_text(encoding="utf-8")
    header = text.split("\nname:", 1)[0]
    assert "arXiv:" in header, f"{name}.yaml: cite the paper (arXiv id) in the header comment"
    assert "Paper scale" in header and ("FLOPs" in header or "$" in header), \
        f"{name}.yaml: state the paper-scale budget in the header comment"
    assert "Get " in header, f"{name}.yaml: say where the user gets the paper-scale data"


def _small_inputs(loaded: mf.Loaded) -> list[tuple[str, Path]]:
    m = loaded.manifest
    out = []
    for i, s in enumerate(m.corpus.sources):
        assert s.path is not None, f"corpus.sources[{i}]: the small scales read files"
        out.append((f"corpus.sources[{i}]", loaded.resolve(s.path)))
    if m.corpus.heldout is not None:
        out.append(("corpus.heldout", loaded.resolve(m.corpus.heldout.path)))
    for t in m.evaluation.tasks:
        out.append((f"evaluation.tasks {t.name}", loaded.resolve(t.data)))
    for s in m.evaluation.suites:
        assert s.data is not None, f"suite {s.suite}: the small scales name their data folder"
        out.append((f"evaluation.suites {s.suite}", loaded.resolve(s.data)))
    return out


@pytest.mark.parametrize("name", OURS)
@pytest.mark.parametrize("scale", SMALL)
def test_small_scales_read_only_the_repository(name, scale):
    """A fresh clone runs tiny and smoke: every input exists inside domains/."""
    loaded = mf.load(DOMAINS / f"{name}.yaml", scale=scale)
    for where, path in _small_inputs(loaded):
        assert DOMAINS.resolve() in path.parents, f"{where}: {path} is outside domains/"
        hits = sorted(path.parent.glob(path.name)) if "*" in path.name else [path]
        assert hits and all(h.exists() for h in hits), f"{where}: {path} is missing"
    base = loaded.manifest.base
    if base is not None:
        assert base.path.startswith("package:"), "small scales use an offline package: base"


def _records(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_embedded_sample_is_real_split_documented_and_small(name):
    folder = DOMAINS / name / SAMPLES[name]
    train = _records(folder / "train.jsonl.gz")
    heldout = _records(folder / "heldout.jsonl.gz")
    for recs in (train, heldout):
        assert recs and all(r["id"] and r["text"].strip() for r in recs)
    assert not {r["id"] for r in train} & {r["id"] for r in heldout}, "train/held-out overlap"
    prov = (folder / "PROVENANCE.md").read_text(encoding="utf-8")
    # The counts PROVENANCE.md states are the files' counts.
    assert f"{len(train):,} training and {len(heldout):,} held-out" in prov
    assert "Licence" in prov
    size = sum(p.stat().st_size for p in (DOMAINS / name).rglob("*") if p.is_file())
    assert size <= SAMPLE_CAP, f"domains/{name}/ holds {size:,} bytes"


@pytest.mark.parametrize("folder", sorted(p.parent for p in DOMAINS.glob("*/benchmarks/*/*")
                                          if p.name == "PROVENANCE.md"), ids=str)
def test_benchmark_slices_carry_provenance_and_a_permissive_licence(folder):
    prov = (folder / "PROVENANCE.md").read_text(encoding="utf-8")
    assert "Licence" in prov
    # Non-commercial sets (FPB, Maltese sentiment) stay outside the repository.
    assert "NC" not in prov.split("**Licence**", 1)[1].split("\n-", 1)[0]
    assert any(p.name.upper().startswith("LICENSE") for p in folder.iterdir())


def test_no_noncommercial_benchmark_is_shipped():
    shipped = {p.name.lower() for p in DOMAINS.rglob("*") if p.is_dir()}
    assert not shipped & {"financial_phrasebank", "sentiment_mt", "sentiment"}


def _env(root: Path) -> dict:
    env = {**os.environ, "FACTORY_RUNS_ROOT": str(root)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


@pytest.mark.parametrize("name,missing", [("legal", "data/caselaw"), ("code", "data/codesearchnet")])
def test_paper_scale_run_names_the_missing_data(tmp_path, name, missing):
    r = subprocess.run([*FACTORY, "run", f"domains/{name}.yaml", "--run-dir", tmp_path / "run"],
                       cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert missing in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "corpus").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", OURS)
def test_smoke_run_completes(tmp_path, name):
    run_dir = tmp_path / "run"
    start = time.perf_counter()
    r = subprocess.run([*FACTORY, "run", f"domains/{name}.yaml", "--scale", "smoke",
                        "--run-dir", run_dir], cwd=REPO, env=_env(tmp_path),
                       capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - start
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert list(summary["stages"]) == STAGES
    assert all(s["status"] == "done" for s in summary["stages"].values())
    pre = summary["stages"]["pretrain"]["metrics"]
    assert pre["final_loss"] < pre["first_loss"]
    ev = summary["stages"]["evaluate"]["metrics"]
    assert 0 < ev["heldout_loss"] < 20 and 0 < ev["heldout_unigram_loss"] < 20
    results = json.loads((run_dir / "evaluate" / "results.json").read_text())
    loaded = mf.load(DOMAINS / f"{name}.yaml", scale="smoke")
    for s in loaded.manifest.evaluation.suites:
        for task in s.tasks or []:
            value = results["suites"][s.suite]["tasks"][task]["mean"]
            assert 0 <= value <= 100
    hf = run_dir / "export" / "hf"
    assert (hf / "config.json").is_file() and (hf / "model.safetensors").is_file()
    resolved = yaml.safe_load((run_dir / "manifest.resolved.yaml").read_text())
    assert resolved["_resolved"]["scale"] == "smoke"
    print(f"{name} smoke: {seconds:.1f} s")
