"""`factory compare MANIFEST`: scratch vs continued vs extended vocabulary vs the base, at an
equal budget (factory.compare)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    """Add `compare` to the `factory` app."""

    @app.command("compare")
    def compare_cmd(
        manifest: Path = typer.Argument(..., help="The domain manifest (YAML); needs base.path."),
        scale: Optional[str] = typer.Option(None, help="A named scale of the manifest."),
        run_dir: Optional[Path] = typer.Option(None, help="Default: runs/NAME-SCALE-compare."),
        arms: str = typer.Option("scratch,continued,continued_extended,base",
                                 help="Comma-separated subset of the four arms."),
        general: Optional[Path] = typer.Option(
            None, help="General-text held-out JSON Lines for forgetting (default: the "
                       "manifest's corpus.general_text, else domains/general/heldout.jsonl.gz)."),
        set_: list[str] = typer.Option([], "--set", help="Dotted override for every arm."),
    ) -> None:
        """Does domain pretraining help here? Trains and scores the arms at an equal budget."""
        from rich.console import Console

        from factory import cli, tracking
        from factory.compare import compare

        progress = cli.console_progress()
        target = run_dir or tracking.runs_root() / f"{manifest.stem}-{scale or 'full'}-compare"
        result = compare(manifest, target, scale=scale, overrides=set_,
                         arms=tuple(a.strip() for a in arms.split(",") if a.strip()),
                         general=general, progress=progress)
        out = Console()
        for name, a in result["arms"].items():
            bench = ", ".join(f"{k}={v:.2f}" for k, v in a["benchmarks"].items())
            out.print(f"{name:>19}: domain {a['domain_heldout_loss']}, general "
                      f"{a['general_heldout_loss']} ({a['heldout_unit']}); {bench}")
        out.print(f"compare.json and report: {target}/compare.json, {target}/compare.html")
