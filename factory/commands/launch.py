"""`factory launch MANIFEST --slurm|--torchrun ...`: see factory/launch.py, which implements it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

SET_HELP = "Dotted override applied before validation, e.g. training.lr=3e-4 (repeatable)."


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `factory` app."""

    @app.command()
    def launch(
        manifest: Path = typer.Argument(..., help="The domain manifest (YAML)."),
        slurm: bool = typer.Option(False, "--slurm", help="Write (and sbatch) a Slurm job."),
        torchrun: bool = typer.Option(False, "--torchrun", help="Run on this multi-GPU machine."),
        nodes: int = typer.Option(1, help="Slurm: number of nodes."),
        gpus_per_node: int = typer.Option(0, "--gpus-per-node", help="Slurm: GPUs per node."),
        nproc_per_node: int = typer.Option(0, "--nproc-per-node",
                                           help="--torchrun: processes (GPUs) on this machine."),
        container: Optional[str] = typer.Option(
            None, help="Slurm: the factory image (registry/name:tag, or a .sqsh/.sif file)."),
        runtime: str = typer.Option("pyxis", help="Slurm: container runtime: pyxis (enroot), "
                                    "apptainer, or none (the nodes' own environment)."),
        partition: Optional[str] = typer.Option(None, help="Slurm partition."),
        time: Optional[str] = typer.Option(None, help="Slurm time limit, e.g. 2-00:00:00."),
        account: Optional[str] = typer.Option(None, help="Slurm account."),
        port: int = typer.Option(29500, help="Rendezvous port on the first node."),
        mount: list[str] = typer.Option([], help="Slurm: extra host folder the container sees "
                                        "at the same path (repeatable)."),
        env: list[str] = typer.Option([], help="KEY=VALUE exported in the job (repeatable), "
                                      "e.g. NCCL_SOCKET_IFNAME=ib0."),
        tracking_uri: Optional[str] = typer.Option(
            None, help="MLflow server the job logs to (default: $MLFLOW_TRACKING_URI)."),
        scale: Optional[str] = typer.Option(None, help="A named scale of the manifest."),
        run_dir: Optional[Path] = typer.Option(
            None, help="Run directory on a filesystem every node sees (default: runs/NAME-SCALE)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the script; submit nothing."),
        set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    ) -> None:
        """Launch a manifest on GPUs: a Slurm job (torchrun per node) or torchrun on this machine.

        The layout (parallel.tensor x parallel.pipeline against the GPUs), the container image
        and the tracking server are checked before anything is submitted.
        """
        from factory import launch as lch, manifest as mf
        from factory.stage import UserError

        if slurm == torchrun:
            raise UserError("launch: give exactly one of --slurm or --torchrun")
        for kv in env:
            if "=" not in kv or not kv.split("=", 1)[0].isidentifier():
                raise UserError(f"launch --env {kv!r}: expected KEY=VALUE")
        loaded = mf.load(manifest, scale=scale, overrides=set_)
        if slurm:
            if gpus_per_node < 1:
                raise UserError("launch --slurm: give --gpus-per-node G (GPUs on each node)")
            opts = lch.SlurmOptions(
                container=container, runtime=runtime, partition=partition, time=time,
                account=account, port=port, env=tuple(env),
                mounts=tuple(str(Path(m).resolve()) for m in mount))
            lch.check_container(opts)
            job = lch.plan_job(loaded, nodes=nodes, gpus_per_node=gpus_per_node,
                               run_dir=run_dir, tracking_uri=tracking_uri)
            lch.check_tracking_uri(job.tracking_uri)
            script = lch.render_sbatch(job, opts)
            if dry_run:
                typer.echo(script, nl=False)
                return
            job_id = lch.submit(job, script)
            typer.echo(f"Submitted Slurm job {job_id}: {job.fit.describe()}; log in "
                       f"{job.run_dir}/logs/slurm-{job_id}.out, runs on {job.tracking_uri}")
            return

        if nodes != 1 or container or gpus_per_node:
            raise UserError("launch --torchrun runs on this machine: use --nproc-per-node G "
                            "(no --nodes/--gpus-per-node/--container)")
        if nproc_per_node < 1:
            raise UserError("launch --torchrun: give --nproc-per-node G (GPUs on this machine)")
        if env:
            raise UserError("launch --torchrun: --env is for Slurm jobs; export it in your shell")
        lch.check_local_gpus(nproc_per_node)
        job = lch.plan_job(loaded, nodes=1, gpus_per_node=nproc_per_node, run_dir=run_dir,
                           tracking_uri=tracking_uri)
        lch.check_tracking_uri(job.tracking_uri)
        if dry_run:
            typer.echo(lch.render_local(job, nproc_per_node), nl=False)
            return
        raise typer.Exit(lch.run_local(job, nproc_per_node))
