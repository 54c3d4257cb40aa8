"""The CPU install path pins torch: README's two commands and CI install the `cpu` extra,
which pins the CPU wheel exactly (an unpinned torch pulls a multi-GB CUDA build), while the
core dependencies leave torch to the GPU image; CI runs exactly the README's test command."""

from __future__ import annotations

import re
import tomllib

from tests.conftest import REPO


def _readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)\n```", (REPO / "README.md").read_text(), re.S)
    return [b.strip() for b in blocks[:2]]


def test_cpu_install_path_pins_torch():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert meta["optional-dependencies"]["cpu"] == ["torch==2.13.0"]
    assert [d for d in meta["dependencies"] if d.startswith("torch")] == ["torch>=2.4"]

    demo, tests = _readme_commands()
    assert "factory run" in demo and "pytest" in tests
    for command in (demo, tests):
        extras = re.search(r"pip install -q -e '\.\[([a-z,]+)\]'", command)
        assert extras and "cpu" in extras.group(1).split(","), command
    ci = (REPO / ".ci" / "run").read_text()
    assert tests in ci, "CI must run the README's test command, nothing else"
