"""The CLI surface: exit codes and one-line errors, without running any stage."""

from tests.conftest import REPO


def test_validate_ok(factory_cli):
    r = factory_cli("validate", "domains/biomedical.yaml")
    assert r.returncode == 0, r.stderr
    assert "valid (full, tiny, smoke)" in r.stdout


def test_validate_reports_every_problem_one_line_each(factory_cli, tmp_path):
    bad = (REPO / "domains/biomedical.yaml").read_text()
    bad = bad.replace("      weight: 1.0\n  heldout_fraction", "      weight: -1\n  heldout_fraction")
    bad = bad.replace("  seq_length: 128\n  global_batch_size: 8192",
                      "  seq_length: 128\n  global_batch_sise: 8192")
    p = tmp_path / "biomedical.yaml"
    p.write_text(bad)
    r = factory_cli("validate", p)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert any(l.startswith(f"{p}:") and "corpus.sources[0].weight: must be > 0" in l for l in lines)
    assert any("training.global_batch_sise: unknown field; did you mean 'global_batch_size'" in l
               for l in lines)
    assert "Traceback" not in r.stderr and "│" not in r.stderr and "╭" not in r.stderr


def test_bad_flag_is_one_line_exit_2(factory_cli):
    r = factory_cli("run", "domains/biomedical.yaml", "--bogus")
    assert r.returncode == 2
    assert r.stderr.strip() == "factory run: error: No such option: --bogus (see factory run --help)"


def test_missing_corpus_fails_before_any_work(factory_cli, tmp_path):
    run_dir = tmp_path / "run"
    r = factory_cli("run", "domains/biomedical.yaml", "--run-dir", run_dir)  # paper scale: no data
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "pubmed" in r.stderr and "data/pubmed/*.jsonl.gz" in r.stderr
    assert not run_dir.exists()


def test_unknown_only_stage(factory_cli):
    r = factory_cli("run", "domains/biomedical.yaml", "--scale", "smoke", "--only", "nope")
    assert r.returncode == 2 and "unknown stage" in r.stderr


def test_ui_serves_the_store(tmp_path):
    """`factory ui` starts MLflow's UI on the factory's store and prints its URL."""
    import os
    import socket
    import subprocess
    import time
    import urllib.request

    from tests.conftest import FACTORY

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "FACTORY_RUNS_ROOT": str(tmp_path / "runs")}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([*FACTORY, "ui", "--port", str(port)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        first = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}" in first and str(tmp_path / "runs") in first
        deadline, body = time.time() + 90, ""
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    body = r.read().decode()
                    break
            except OSError:
                time.sleep(0.5)
        assert body.strip() == "OK"
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
