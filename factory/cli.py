"""The `factory` command: parse, call, print. No logic of its own."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer

try:  # typer >= 0.20 vendors its own copy of click
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import exceptions as click_exc

from factory.manifest import ManifestError
from factory.stage import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  pretty_exceptions_enable=False,
                  help="Domain-adaptive language-model factory: one manifest, every stage.")

SET_HELP = "Dotted override applied before validation, e.g. training.lr=3e-4 (repeatable)."


def _setup_logging(console) -> None:
    from rich.logging import RichHandler

    handler = RichHandler(console=console, show_path=False, show_time=False, markup=False)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s",
                        force=True)
    for name in ("factory", "tokenization"):
        logging.getLogger(name).setLevel(logging.INFO)
    # Our progress bars and logs replace theirs; a fresh fine-tuning head is expected, not news.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # Expected on CPU; megatron repeats it at every import of its optimizer modules.
    for expected in (".*Transformer Engine and Apex are not installed.*",
                     ".*Apex is not installed.*", ".*full scope is deprecated.*",
                     ".*Please use DTensor instead.*"):
        warnings.filterwarnings("ignore", message=expected)


def console_progress():
    """Logging through rich on stderr, and the factory of the run's progress display."""
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    console = Console(stderr=True)
    _setup_logging(console)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
    return lambda: Progress(*columns, console=console, transient=True)


@app.command()
def validate(
    manifest: Path = typer.Argument(..., help="The domain manifest (YAML)."),
    scale: Optional[str] = typer.Option(None, help="Validate this scale only (default: all)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Check a manifest's schema; one line per problem as FILE:LINE FIELD: message."""
    from factory import manifest as mf

    scales = [scale] if scale is not None else [None, *mf.scales_of(manifest)]
    problems: list[str] = []
    for s in scales:
        try:
            mf.load(manifest, scale=s, overrides=set_)
        except ManifestError as e:
            problems += [p for p in e.problems if p not in problems]
    if problems:
        raise ManifestError(problems)
    typer.echo(f"{manifest}: valid ({', '.join(s or 'full' for s in scales)})")


@app.command()
def run(
    manifest: Path = typer.Argument(..., help="The domain manifest (YAML)."),
    scale: Optional[str] = typer.Option(None, help="A named scale of the manifest (tiny, smoke...)."),
    run_dir: Optional[Path] = typer.Option(None, help="Run directory (default: runs/NAME-SCALE)."),
    force: bool = typer.Option(False, help="Re-run every stage even when cached."),
    only: Optional[str] = typer.Option(None, help="Run only this stage (its inputs must exist)."),
    until: Optional[str] = typer.Option(None, help="Run the stages up to and including this one."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Run the manifest's stages: corpus, vocab, pack, pretrain, export, evaluate.

    Under torchrun (several ranks) it runs the pretrain stage on every rank; the other stages
    run in one process before (--until pack) and after (a plain rerun finds pretrain cached).
    """
    from factory import manifest as mf, runner, tracking

    loaded = mf.load(manifest, scale=scale, overrides=set_)
    progress = console_progress()
    target = run_dir or runner.default_run_dir(loaded, tracking.runs_root())
    summary = runner.run(loaded, target, force=force, only=only, until=until, progress=progress)
    if runner.world()[0] == 0:
        _print_summary(summary)


@app.command()
def ui(
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(5000, help="Port."),
) -> None:
    """Start the MLflow UI over the factory's tracking store."""
    from factory import tracking

    if os.environ.get("MLFLOW_TRACKING_URI", "").startswith("http"):
        typer.echo(f"Runs are on the tracking server {os.environ['MLFLOW_TRACKING_URI']}; "
                   "open it in a browser.")
        return
    cmd = tracking.ui_command(host, port)
    cmd[0] = str(Path(sys.executable).with_name("mlflow"))
    typer.echo(f"MLflow UI on http://{host}:{port}  (store: {tracking.tracking_uri()})")
    raise typer.Exit(subprocess.call(cmd))


def _print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Console()
    table = Table(title="factory run", show_lines=False)
    for col in ("stage", "status", "seconds", "metrics"):
        table.add_column(col)
    for name, s in summary["stages"].items():
        shown = ", ".join(f"{k}={v:.4g}" for k, v in list(s["metrics"].items())[:6])
        table.add_row(name, s["status"], f"{s['seconds']:.1f}", shown)
    out.print(table)
    ml = summary["mlflow"]
    out.print(f"Run directory: {summary['run_dir']}  (report: {summary['run_dir']}/report.html)")
    out.print(f"MLflow run {ml['run_id']} in experiment {ml['experiment']!r} ({ml['tracking_uri']})")
    out.print("See it: `factory ui`, then open http://127.0.0.1:5000 "
              f"(experiment {ml['experiment']!r}, run {ml['run_id']}).")


from factory import commands  # noqa: E402  (after app: the groups attach to it)

for _group in commands.ALL:
    _group.register(app)


def main() -> None:
    try:
        rv = app(prog_name="factory", standalone_mode=False)
    except click_exc.NoArgsIsHelpError as e:  # `factory` alone: show the help
        print(e.ctx.get_help() if e.ctx is not None else "", file=sys.stderr)
        sys.exit(0)
    except click_exc.UsageError as e:
        cmd = e.ctx.command_path if e.ctx is not None else "factory"
        print(f"{cmd}: error: {e.format_message()} (see {cmd} --help)", file=sys.stderr)
        sys.exit(2)
    except ManifestError as e:
        print("\n".join(e.problems), file=sys.stderr)
        sys.exit(2)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, typer.Abort):
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
