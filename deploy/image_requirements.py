"""What pip installs on top of the NGC PyTorch base image, and what it must leave alone.

    python image_requirements.py requirements pyproject.toml --extra gpu  > requirements.txt
    python image_requirements.py constraints                              > constraints.txt

`requirements`: the project's dependencies plus the named extras, without the packages the base
image builds together (torch, Transformer Engine, apex, ...): reinstalling any of them from PyPI
would replace NVIDIA's build. `constraints`: those packages pinned at the versions installed
here, plus the image's own constraint file (NGC sets PIP_CONSTRAINT), so pip fails instead of
upgrading one of them for a dependency. Standard library only: it runs before the project is
installed, in the Dockerfile's dependency layer.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

# The base image's own builds: never from PyPI.
PROTECTED = ("torch", "torchvision", "torchaudio", "triton", "transformer-engine",
             "transformer-engine-torch", "transformer-engine-cu12", "apex", "flash-attn",
             "nvidia-dali-cuda120", "pytorch-triton")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(req: str) -> str:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    if m is None:
        raise ValueError(f"not a requirement: {req!r}")
    return normalize(m.group(1))


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    """Project dependencies + extras, protected packages removed, in the file's order."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(f"{pyproject}: no optional-dependencies {unknown}")
    reqs = list(project.get("dependencies", []))
    for e in extras:
        reqs += optional[e]
    protected = {normalize(p) for p in PROTECTED}
    return [r for r in reqs if requirement_name(r) not in protected]


def constraints() -> list[str]:
    """Protected packages at their installed versions, plus $PIP_CONSTRAINT's lines."""
    out = []
    for name in PROTECTED:
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    for path in os.environ.get("PIP_CONSTRAINT", "").split():
        p = Path(path)
        if p.is_file():
            out += [ln.strip() for ln in p.read_text().splitlines()
                    if ln.strip() and not ln.lstrip().startswith("#")]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("requirements")
    r.add_argument("pyproject", type=Path)
    r.add_argument("--extra", action="append", default=[])
    sub.add_parser("constraints")
    args = ap.parse_args(argv)
    lines = requirements(args.pyproject, args.extra) if args.cmd == "requirements" \
        else constraints()
    sys.stdout.write("".join(f"{ln}\n" for ln in lines))


if __name__ == "__main__":
    main()
