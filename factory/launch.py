"""Launching a manifest on GPUs: one multi-GPU machine (torchrun) or a Slurm cluster (sbatch).

A launched job runs the data stages (corpus, vocab, pack) once as a single process, then the
pretrain stage on every GPU of every node (one torchrun agent per node, c10d rendezvous on the
first node), then export and evaluate once. Everything that can be wrong before the job starts
(the parallel layout against the GPUs, the container image, the tracking server) is checked
here, before anything is submitted, and raises `UserError`.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from factory.runner import CONTINUE_ENV
from factory.stage import UserError

if TYPE_CHECKING:
    from factory.manifest import Loaded

log = logging.getLogger(__name__)

DISTRIBUTED_STAGE = "pretrain"
DEFAULT_PORT = 29500
Runtime = Literal["pyxis", "apptainer", "none"]
RUNTIMES: tuple[str, ...] = ("pyxis", "apptainer", "none")

# What every GPU job exports. CUDA_DEVICE_MAX_CONNECTIONS=1 lets megatron overlap tensor-parallel
# communication with compute in issue order; TORCH_NCCL_ASYNC_ERROR_HANDLING turns a dead peer
# into an error (and a Slurm job failure) instead of a hang until the wall-clock limit.
GPU_ENV: dict[str, str] = {
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "NCCL_DEBUG": "WARN",
}


# --- the parallel layout ---------------------------------------------------------------


@dataclass(frozen=True)
class Fit:
    """How a manifest's layout lands on the GPUs: tp x pp x dp = nodes x gpus_per_node."""

    nodes: int
    gpus_per_node: int
    tensor_parallel: int
    pipeline_parallel: int

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def data_parallel(self) -> int:
        return self.world_size // (self.tensor_parallel * self.pipeline_parallel)

    def describe(self) -> str:
        return (f"{self.nodes} node(s) x {self.gpus_per_node} GPU(s) = TP {self.tensor_parallel}"
                f" x PP {self.pipeline_parallel} x DP {self.data_parallel}")


def parallel_layout(loaded: "Loaded") -> tuple[int, int]:
    """(tensor, pipeline) parallel sizes of the manifest's `parallel:` section."""
    par = loaded.manifest.parallel
    return par.tensor, par.pipeline


def check_layout(loaded: "Loaded", nodes: int, gpus_per_node: int) -> Fit:
    """The layout on nodes x gpus_per_node, or UserError naming every reason it does not fit."""
    from factory.train.parallel import Layout, layout_problems

    if nodes < 1 or gpus_per_node < 1:
        raise UserError(f"launch: --nodes ({nodes}) and the GPUs per node ({gpus_per_node}) "
                        "must be >= 1")
    tp, pp = parallel_layout(loaded)
    fit = Fit(nodes, gpus_per_node, tp, pp)
    if fit.world_size % (tp * pp):
        raise UserError(f"parallel: tensor x pipeline = {tp} x {pp} = {tp * pp} does not divide "
                        f"{nodes} node(s) x {gpus_per_node} GPU(s) = {fit.world_size}; change "
                        "the GPU count or the layout")
    dims = _model_dims(loaded)
    m = loaded.manifest
    t = m.training
    problems = layout_problems(
        Layout(tp, pp, m.parallel.virtual_pipeline, m.parallel.sequence_parallel), m.family,
        dims["num_attention_heads"], dims.get("num_query_groups"), dims.get("num_layers"),
        t.seq_length)
    per_step = fit.data_parallel * t.micro_batch_size
    if t.global_batch_size % per_step:
        problems.append(f"training.global_batch_size {t.global_batch_size} is not a multiple of "
                        f"data-parallel size {fit.data_parallel} x micro_batch_size "
                        f"{t.micro_batch_size} = {per_step}")
    if problems:
        raise UserError("; ".join(problems) + f" ({fit.describe()})")
    if tp > gpus_per_node:
        log.warning("tensor parallel %d spans nodes (%d GPUs each): expect it to be slow", tp,
                    gpus_per_node)
    return fit


def _model_dims(loaded: "Loaded") -> dict[str, int]:
    """Head, query-group and layer counts: the manifest's (scratch) or the base's
    (continued)."""
    m = loaded.manifest
    if m.strategy == "scratch":
        return m.model_dims
    from factory.train.models import config_from_hf

    cfg = config_from_hf(_base_folder(m.base.path, loaded.root))
    return {"num_attention_heads": cfg.num_attention_heads,
            "num_query_groups": cfg.num_query_groups, "num_layers": cfg.num_layers}


def _base_folder(spec: str, root: Path) -> Path:
    """A folder holding the base's config.json, without downloading its weights."""
    from factory import base_checkpoint

    if spec.startswith("package:") or Path(spec).expanduser().exists() or \
            not base_checkpoint._HUB_ID.match(spec):
        return base_checkpoint.resolve(spec, root)
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(spec, "config.json")).parent
    except Exception as e:  # noqa: BLE001 - any hub failure is the user's to fix (network, id)
        raise UserError(f"base.path {spec!r}: cannot read its config.json from the Hugging Face "
                        f"hub ({e.__class__.__name__}); the layout check needs its head count"
                        ) from None


# --- the tracking server ---------------------------------------------------------------


def tracking_uri_for(explicit: str | None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else the factory's default SQLite store."""
    if explicit:
        return explicit
    from factory import tracking

    return tracking.tracking_uri()


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """An http(s) tracking URI must answer now: a job that cannot log fails hours later."""
    if not uri.startswith(("http://", "https://")):
        if uri.startswith("sqlite:"):
            log.warning("tracking store %s is a SQLite file: every node must see it on a shared "
                        "filesystem; a tracking server is better (README: Run on a GPU cluster)", uri)
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - http(s) only
            r.read(64)
    except urllib.error.HTTPError as e:
        # The server answered: reachable. Auth or a proxy path may still be off, say so.
        if e.code >= 500:
            raise UserError(f"tracking URI {uri}: the server answered HTTP {e.code} on /health; "
                            "check the MLflow server's log") from None
        log.warning("tracking URI %s: /health answered HTTP %d", uri, e.code)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(f"tracking URI {uri}: unreachable ({reason}); start the MLflow server "
                        "(deploy/compose.yaml; README: Run on a GPU cluster) or fix MLFLOW_TRACKING_URI / "
                        "--tracking-uri") from None


# --- the job ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """What a launched job runs, as the paths and arguments written into its script."""

    manifest: str                       # relative to workdir when inside it, else absolute
    workdir: str                        # the job's working directory
    run_dir: str                        # absolute: every node must see it (shared filesystem)
    stages: tuple[str, ...]             # the pipeline's stages in order
    tracking_uri: str
    fit: Fit
    scale: str | None = None
    overrides: tuple[str, ...] = ()
    name: str = "factory"

    def common_args(self) -> list[str]:
        """The arguments of `factory run` shared by every stage of this job."""
        args = [self.manifest]
        if self.scale:
            args += ["--scale", self.scale]
        args += ["--run-dir", self.run_dir]
        for o in self.overrides:
            args += ["--set", o]
        return args

    def steps(self) -> list[tuple[str, list[str]]]:
        """(where, `factory` arguments) in order; where is "one" process or "every" rank.

        The data stages run as one process (`--until` the last one before pretrain), pretrain on
        every rank, then a plain rerun finds everything up to pretrain cached and runs the rest.
        """
        common = self.common_args()
        return [("one", ["run", *common, "--until", self.before[-1]]),
                ("every", ["run", *common, "--only", DISTRIBUTED_STAGE]),
                ("one", ["run", *common])]

    @property
    def before(self) -> tuple[str, ...]:
        return self.stages[:self.stages.index(DISTRIBUTED_STAGE)]

    @property
    def after(self) -> tuple[str, ...]:
        return self.stages[self.stages.index(DISTRIBUTED_STAGE) + 1:]


def plan_job(loaded: "Loaded", *, nodes: int, gpus_per_node: int, run_dir: Path | None = None,
             tracking_uri: str | None = None, workdir: Path | None = None) -> Job:
    """Check the layout and build the job; nothing is written or contacted."""
    import pipelines
    from factory import runner, tracking

    fit = check_layout(loaded, nodes, gpus_per_node)
    workdir = (workdir or Path.cwd()).resolve()
    target = (run_dir or runner.default_run_dir(loaded, tracking.runs_root())).resolve()
    stages = tuple(s.name for s in pipelines.load(loaded.manifest.strategy).stages)
    if DISTRIBUTED_STAGE not in stages:
        raise UserError(f"pipeline {loaded.manifest.strategy!r} has no {DISTRIBUTED_STAGE} "
                        "stage: nothing to launch on GPUs")
    return Job(manifest=_relative(loaded.path.resolve(), workdir), workdir=str(workdir),
               run_dir=str(target), stages=stages, tracking_uri=tracking_uri_for(tracking_uri),
               fit=fit, scale=loaded.scale, overrides=tuple(loaded.overrides),
               name=loaded.manifest.name)


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def torchrun_command(job: Job, *, nnodes: int, nproc_per_node: int,
                     rdzv_endpoint: str | None = None, rdzv_id: str = "factory",
                     torchrun: tuple[str, ...] = ("torchrun",)) -> list[str]:
    """One torchrun agent running the pretrain stage; `rdzv_endpoint=None` is a lone machine."""
    cmd = [*torchrun, f"--nnodes={nnodes}", f"--nproc-per-node={nproc_per_node}"]
    if rdzv_endpoint is None:
        cmd.append("--standalone")
    else:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}",
                f"--rdzv-id={rdzv_id}"]
    return cmd + ["-m", "factory.cli", *job.steps()[1][1]]


# --- one machine: torchrun -------------------------------------------------------------


def local_commands(job: Job, nproc_per_node: int, python: str = sys.executable
                   ) -> list[list[str]]:
    """The commands of a one-machine launch, in order."""
    factory = [python, "-m", "factory.cli"]
    run = torchrun_command(job, nnodes=1, nproc_per_node=nproc_per_node,
                           torchrun=(python, "-m", "torch.distributed.run"))
    return [run if where == "every" else [*factory, *args] for where, args in job.steps()]


def render_local(job: Job, nproc_per_node: int, python: str = sys.executable) -> str:
    """The one-machine launch as a shell script (what --dry-run prints)."""
    lines = ["#!/bin/bash", _header(job), "set -euo pipefail", f"cd {shlex.quote(job.workdir)}",
             f"export MLFLOW_TRACKING_URI={shlex.quote(job.tracking_uri)}"]
    lines += [f"export {k}={v}" for k, v in GPU_ENV.items()]
    first, *rest = local_commands(job, nproc_per_node, python)
    lines += [shlex.join(first), f"export {CONTINUE_ENV}=1", *(shlex.join(c) for c in rest)]
    return "\n".join(lines) + "\n"


def check_local_gpus(nproc_per_node: int) -> None:
    """On a CUDA machine, one process per GPU: asking for more than there are is a mistake.
    Without CUDA the processes train over gloo on the CPU (how the tests prove the path)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() < nproc_per_node:
        raise UserError(f"launch --torchrun --nproc-per-node {nproc_per_node}: this machine has "
                        f"{torch.cuda.device_count()} GPU(s)")


def run_local(job: Job, nproc_per_node: int) -> int:
    """Run the launch on this machine, stage group by stage group; the first failure's code."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": job.tracking_uri}
    for k, v in GPU_ENV.items():
        env.setdefault(k, v)
    for i, cmd in enumerate(local_commands(job, nproc_per_node)):
        log.info("launch: %s", shlex.join(cmd))
        rc = subprocess.call(cmd, cwd=job.workdir, env={**env, CONTINUE_ENV: "1"} if i else env)
        if rc:
            return rc
    return 0


# --- a Slurm cluster: sbatch -----------------------------------------------------------


@dataclass(frozen=True)
class SlurmOptions:
    container: str | None = None
    runtime: Runtime = "pyxis"
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    port: int = DEFAULT_PORT
    mounts: tuple[str, ...] = ()        # extra host folders the container sees (data, caches)
    env: tuple[str, ...] = ()           # extra KEY=VALUE exported in the job


def check_container(opts: SlurmOptions) -> str | None:
    """The image reference as the runtime wants it, or UserError when it is missing/absent."""
    if opts.runtime not in RUNTIMES:
        raise UserError(f"launch --runtime {opts.runtime!r}: one of {', '.join(RUNTIMES)}")
    if opts.runtime == "none":
        if opts.container:
            raise UserError("launch: --container with --runtime none; pick pyxis or apptainer, "
                            "or drop --container")
        return None
    image = (opts.container or "").strip()
    if not image:
        raise UserError(f"launch --slurm: no container image for --runtime {opts.runtime}; "
                        "pass --container IMAGE (the factory image, see the README, Run on a GPU cluster) or "
                        "--runtime none to use the nodes' own Python environment")
    if image.endswith((".sif", ".sqsh")) or image.startswith(("/", "./", "~")):
        path = Path(image).expanduser()
        if not path.is_file():
            raise UserError(f"launch --container {image}: no such image file")
        return str(path.resolve())
    if opts.runtime == "apptainer":
        return image if "://" in image else f"docker://{image}"
    # enroot separates a registry host from the image path with '#'.
    first, sep, rest = image.partition("/")
    if sep and "#" not in image and ("." in first or ":" in first or first == "localhost"):
        return f"{first}#{rest}"
    return image


def render_sbatch(job: Job, opts: SlurmOptions) -> str:
    """The sbatch script: data stages on one node, torchrun on all, export/evaluate on one."""
    image = check_container(opts)
    fit = job.fit
    sb = [f"--job-name=factory-{job.name}", f"--nodes={fit.nodes}", "--ntasks-per-node=1",
          f"--gpus-per-node={fit.gpus_per_node}", f"--output={job.run_dir}/logs/slurm-%j.out"]
    sb += [f"--{k}={v}" for k, v in (("partition", opts.partition), ("time", opts.time),
                                      ("account", opts.account)) if v]
    q = shlex.quote
    lines = ["#!/bin/bash", *(f"#SBATCH {s}" for s in sb), _header(job), "set -euo pipefail",
             "", f"cd {q(job.workdir)}",
             "# Credentials (MLFLOW_TRACKING_TOKEN, ...) come from the submitting shell: sbatch",
             "# exports its environment to the job; they are never written here.",
             f"export MLFLOW_TRACKING_URI={q(job.tracking_uri)}"]
    lines += [f"export {k}={q(v)}" for k, v in GPU_ENV.items()]
    for kv in opts.env:
        key, _, value = kv.partition("=")
        lines.append(f"export {key}={q(value)}")
    # sed reads every line: `head -n 1` would close the pipe early, and under pipefail the
    # SIGPIPE scontrol gets (many nodes) would fail the job.
    lines += ['HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)',
              f"RDZV_PORT={opts.port}", ""]

    container = _container(opts.runtime, image, _mounts(job, opts), job.workdir)
    lines += [f"ON_FIRST_NODE=(srun --nodes=1 --ntasks-per-node=1{container})",
              f"ON_EVERY_NODE=(srun --nodes={fit.nodes} --ntasks-per-node=1{container})",
              f"RUN=({shlex.join(job.common_args())})", ""]
    lines += [f"# 1. data stages, once, on the first node: {', '.join(job.before)}",
              f'"${{ON_FIRST_NODE[@]}}" factory run "${{RUN[@]}}" --until {job.before[-1]}',
              "# the next steps log under step 1's MLflow run",
              f"export {CONTINUE_ENV}=1",
              f"# 2. {DISTRIBUTED_STAGE} on every GPU ({fit.describe()}):",
              "#    one torchrun agent per node, c10d rendezvous on the first node",
              f'"${{ON_EVERY_NODE[@]}}" torchrun --nnodes={fit.nodes} '
              f"--nproc-per-node={fit.gpus_per_node} \\",
              '  --rdzv-backend=c10d --rdzv-endpoint="$HEAD_NODE:$RDZV_PORT" '
              '--rdzv-id="$SLURM_JOB_ID" \\',
              f'  -m factory.cli run "${{RUN[@]}}" --only {DISTRIBUTED_STAGE}',
              f"# 3. once, on the first node: {', '.join(job.after)} ({DISTRIBUTED_STAGE} and "
              "the data stages are cached)",
              '"${ON_FIRST_NODE[@]}" factory run "${RUN[@]}"']
    return "\n".join(lines) + "\n"


def _header(job: Job) -> str:
    from factory import __version__

    return (f"# Generated by `factory launch` (factory {__version__}): {job.name}, scale "
            f"{job.scale or 'full'}, {job.fit.describe()}.")


def _mounts(job: Job, opts: SlurmOptions) -> list[str]:
    """Host folders the container sees at the same path: the workdir, the runs, extras."""
    out: list[str] = []
    for p in (job.workdir, str(Path(job.run_dir).parent), *opts.mounts):
        if not any(p == q or p.startswith(q.rstrip("/") + "/") for q in out):
            out.append(p)
    return out


def _container(runtime: str, image: str | None, mounts: list[str], workdir: str) -> str:
    """What follows `srun ...` to run a command in the image (empty for runtime none)."""
    q = shlex.quote
    if runtime == "pyxis":
        # One named container per job: later steps on a node reuse the unpacked image.
        return (f" \\\n    --container-image={q(image)} "
                '--container-name="factory-$SLURM_JOB_ID" \\\n'
                f"    --container-mounts={q(','.join(f'{m}:{m}' for m in mounts))} \\\n"
                f"    --container-workdir={q(workdir)}")
    if runtime == "apptainer":
        return (f" \\\n    apptainer exec --nv --bind {q(','.join(mounts))} "
                f"--pwd {q(workdir)} {q(image)}")
    return ""


def submit(job: Job, script: str) -> str:
    """Write the script into the run directory and sbatch it; returns the Slurm job id."""
    import shutil

    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise UserError("launch --slurm: sbatch not found on this machine; run on a Slurm login "
                        "node, or add --dry-run to print the script")
    run_dir = Path(job.run_dir)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    path = run_dir / "launch.sbatch"
    path.write_text(script, encoding="utf-8")
    r = subprocess.run([sbatch, "--parsable", str(path)], capture_output=True, text=True)
    if r.returncode:
        raise UserError(f"sbatch {path}: {r.stderr.strip() or 'failed'} (exit {r.returncode})")
    job_id = r.stdout.strip().split(";")[0]
    (run_dir / "launch.json").write_text(json.dumps(
        {"job_id": job_id, "script": str(path), "fit": job.fit.describe()}, indent=2) + "\n")
    return job_id
