"""`ray job submit` and JobSubmissionClient against a real cluster: `ray start --head` on
loopback (own temp dir, 2 CPUs, usage stats off), stopped by the test (its process group only)."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import pyarrow.parquet as pq
import pytest
from helpers import FAST, ROOT, free_port

from pipeline.sample_catalog import make_catalog

VENV_BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="module")
def cluster():
    # The temp dir lives outside the working dir that jobs upload (a folder named `ray` in it
    # would shadow the package); the venv's bin comes first so jobs run this project's python.
    temp_dir = tempfile.mkdtemp(prefix="dtc-ray-")
    dashboard = free_port()
    env = dict(
        os.environ, PATH=f"{VENV_BIN}:{os.environ['PATH']}", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0"
    )
    env.pop("RAY_ADDRESS", None)
    ports = [
        f"--port={free_port()}",
        f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--metrics-export-port={free_port()}",
    ]
    head = subprocess.Popen(
        [
            os.path.join(VENV_BIN, "ray"),
            "start",
            "--head",
            "--block",
            "--num-cpus=2",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            "--include-dashboard=true",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
            *ports,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except OSError:
            assert head.poll() is None, "ray start --head exited"
            assert time.time() < deadline, "the dashboard did not come up"
            time.sleep(1)
    yield address, env
    os.killpg(head.pid, signal.SIGTERM)
    try:  # its graceful stop can take half a minute; what is left of the group is killed after 10 s
        head.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
    shutil.rmtree(temp_dir, ignore_errors=True)


def _render_args(manifest: str, output: str, model: str) -> list[str]:
    return ["python", "-m", "jobs.render", "--manifest", manifest, "--output", output, "--model", model, *FAST]


def _rows(output: str) -> list[dict]:
    return [r for p in sorted(glob.glob(f"{output}/manifest/*/part-*.parquet")) for r in pq.read_table(p).to_pylist()]


def test_cli_submit_client_submit_and_a_failing_job(cluster, tmp_path, tiny_model_dir):
    address, env = cluster
    manifest = make_catalog(str(tmp_path / "catalog"), n_pairs=4, bad_rows=False, sizes=[(96, 96)])

    # 1. the CLI, exactly as documented
    out_cli = str(tmp_path / "out-cli")
    done = subprocess.run(
        [
            os.path.join(VENV_BIN, "ray"),
            "job",
            "submit",
            "--address",
            address,
            "--working-dir",
            ROOT,
            "--runtime-env",
            os.path.join(ROOT, "infra", "runtime_env.yaml"),
            "--",
            *_render_args(manifest, out_cli, tiny_model_dir),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout.lower() and "[dtc] 4/4 rows" in done.stdout  # progress reaches the logs
    assert [r["status"] for r in _rows(out_cli)] == ["ok"] * 4

    # 2. the Python client
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    runtime_env = {"working_dir": ROOT, "excludes": [".venv/", ".git/", "demo_out/", "**/__pycache__/"]}
    out_client = str(tmp_path / "out-client")
    ok_job = client.submit_job(
        entrypoint=" ".join(_render_args(manifest, out_client, tiny_model_dir)), runtime_env=runtime_env
    )
    bad = tmp_path / "bad.parquet"
    pq.write_table(pq.read_table(manifest).drop_columns(["product_uri"]), bad)
    bad_job = client.submit_job(
        entrypoint=" ".join(_render_args(str(bad), str(tmp_path / "out-bad"), tiny_model_dir)), runtime_env=runtime_env
    )
    final = {}
    deadline = time.time() + 600
    while len(final) < 2:
        for job in (ok_job, bad_job):
            status = client.get_job_status(job)
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                final[job] = status
        assert time.time() < deadline, f"jobs did not finish: {final}"
        time.sleep(2)
    assert final[ok_job] == JobStatus.SUCCEEDED, client.get_job_logs(ok_job)[-3000:]
    assert [r["status"] for r in _rows(out_client)] == ["ok"] * 4
    assert final[bad_job] == JobStatus.FAILED
    logs = client.get_job_logs(bad_job)
    assert "required column" in logs and "product_uri" in logs, logs[-2000:]
    assert not os.path.exists(tmp_path / "out-bad")
