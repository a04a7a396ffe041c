"""No silent stalls: a plan whose actor pool cannot start beside one task of the other steps is
refused before any work (exit 2, the numbers in the message; a job with a fresh 2-CPU Ray of its
own, as a first-day user runs it: the session's Ray has carried other tests' clusters), and a
run that cannot move stops after --stall-timeout-s (exit 1, the waiting stages named) and hands
the cluster's resources back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import ray
from helpers import FAST, ROOT, render_args

from jobs.render import main as render
from pipeline.sample_catalog import make_catalog


def _catalog(tmp_path) -> str:
    return make_catalog(str(tmp_path / "catalog"), n_pairs=2, bad_rows=False, sizes=[(64, 48)])


def test_a_pool_that_does_not_fit_the_cluster_is_refused_before_any_work(
    ray_address, tmp_path, capsys, tiny_model_dir
):
    output = tmp_path / "out"
    args = render_args(_catalog(tmp_path), output, tiny_model_dir, "--run-id", "too-big", *FAST)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONPATH": ROOT}
    cpus = float(os.cpu_count())  # the job's own local Ray has every core: two such actors never fit
    job = subprocess.run(
        [sys.executable, "-m", "jobs.render", *args, "--actors", "2,2", "--cpus-per-actor", str(cpus)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert job.returncode == 2, job.stdout[-2000:] + job.stderr[-2000:]
    out, err = job.stdout, job.stderr
    expected = (
        f"--actors 2,2 needs 2 x {cpus:.1f} CPU for the model actors plus 1.0 CPU for one hash shuffle/repartition"
    )
    assert expected in err and f"the cluster has {cpus:.1f} CPUs and no autoscaler" in err
    record = json.loads((output / "runs" / "too-big.json").read_text())
    assert (
        record["exit_code"] == 2
        and expected in record["message"]
        and f"= {2 * cpus + 1:.1f} CPUs" in record["message"]
    )
    assert f"note       {record['message']}" in out
    assert not (output / "manifest").exists() or not any((output / "manifest").rglob("*"))
    assert not (output / "_lock").exists()


@ray.remote(num_cpus=2)
class Placeholder:
    """Another job's actor holding every CPU of the cluster: the totals fit, nothing can start."""

    def ready(self) -> bool:
        return True


def test_a_run_that_cannot_move_stops_naming_the_stages_and_frees_the_cluster(
    ray_address, tmp_path, capsys, tiny_model_dir
):
    placeholder = Placeholder.remote()
    assert ray.get(placeholder.ready.remote())
    output = tmp_path / "out"
    catalog = _catalog(tmp_path)
    # planned on the cluster (the read and resume steps wait for a CPU), then planned in the
    # driver (a small manifest: its rows go straight to the prepare step, which waits)
    on_cluster = tmp_path / "on-cluster.yaml"
    on_cluster.write_text("driver_plan_rows: 0\n")
    args = render_args(catalog, output, tiny_model_dir, "--run-id", "stuck", *FAST, "--config", str(on_cluster))
    planned = render_args(catalog, tmp_path / "planned", tiny_model_dir, "--run-id", "planned", *FAST)
    try:
        assert render([*args, "--stall-timeout-s", "5"]) == 1
        out, err = capsys.readouterr()
        assert render([*planned, "--stall-timeout-s", "5"]) == 1
        capsys.readouterr()
    finally:
        ray.kill(placeholder)
    planned_message = json.loads((tmp_path / "planned" / "runs" / "planned.json").read_text())["message"]
    assert planned_message.startswith("no progress for 5 s"), planned_message
    message = json.loads((output / "runs" / "stuck.json").read_text())["message"]
    assert message.startswith("no progress for 5 s (no batch reached the driver since the stream started"), message
    assert "MapBatches(read_files) has 1 submitted task, waiting for {CPU: 0.5} per task" in message
    assert "MapBatches(RenderStage) has 0 running actors of min 1 (pending: 1 waiting for resources" in message
    assert "free now CPU 0 of 2" in message
    assert f"note       {message}" in out and f"render: failed: {message}" in err
    assert not (output / "_lock").exists()
    # the stalled stream's actor and task are gone: the next test gets both CPUs back
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == 2
