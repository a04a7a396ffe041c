"""Node loss on a multi-node Ray cluster on one machine (issue 17), built as Ray's own tests do:
`ray.cluster_utils.Cluster`, every node a real raylet with its own object store, on 127.0.0.1,
ports picked by Ray. The render job runs as a subprocess driver (`python -m jobs.render
--address ...`) so the test can remove nodes under it (`remove_node(allow_graceful=False)`:
the raylet, its workers and its object store are killed at once).

The cluster is steered, not left to chance:

- the head has no CPUs: only the driver's connection (losing it is losing the driver, the
  SIGKILL case of test_render_job.py);
- the *model node* has 1 CPU and the custom resource `model_node`, which the run asks for
  (`actor_resources`), and the model actor takes that whole CPU (`--cpus-per-actor 1`);
- the *tasks node* has 1 CPU: the read, resume, prepare and finish tasks (0.5 CPU each) run
  there, and their output blocks live in its object store.

Each test adds a fresh model node and tasks node to the module's cluster, removes one (or two,
one after the other) once the run has written its first manifest part, or its last ones, adds a
fresh one, and checks what the issue asks: every pair ok exactly once (one row per run's
manifest, one latest row overall, once in the done index), every image there and decoding, and
the run record naming the lost nodes. Each such run survives its losses; the one case that needs
a re-run is a lost model node with no node left to host the actor.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import ROOT, check_ok_rows, render_args

from pipeline.output.layout import Layout
from pipeline.output.state import latest, uncompacted_runs
from pipeline.sample_catalog import make_catalog

LOOPBACK = "127.0.0.1"
MODEL = "model_node"  # the custom resource that pins the model actor
PAIRS = 60
PART_ROWS = 4
# 2 steps at 2 pairs per model call: ~15 s of rendering here, so a node removed after the first
# part (4 rows) is removed mid-run; the actor takes the model node's whole CPU.
FLAGS = "--steps 2 --batch-size 2 --image-format png --cpus-per-actor 1 --torch-threads 1".split()
RUN_TIMEOUT_S = 240  # a hung run fails the test (with its log) instead of hanging the suite


@pytest.fixture(scope="module")
def cluster():
    """Head only (0 CPUs); the tests add and remove worker nodes. Stops exactly what it started,
    and leaves no trace for a bare `ray.init()` (the session's own Ray is not touched)."""
    from ray._common.utils import get_ray_address_file
    from ray.cluster_utils import Cluster

    address_file = get_ray_address_file(None)
    before = None
    if os.path.exists(address_file):
        with open(address_file) as f:
            before = f.read()
    temp_dir = tempfile.mkdtemp(prefix="dtc-nodes-")  # short: raylet socket paths have a length limit
    cluster = Cluster(
        initialize_head=True,
        head_node_args=dict(
            num_cpus=0,
            node_ip_address=LOOPBACK,
            include_dashboard=False,
            temp_dir=temp_dir,
            # A dead raylet refuses the health check at once: 3 misses 1 s apart mark it dead in
            # ~3 s instead of Ray's default ~15 s (5 x 3 s). Only how soon, not what, happens.
            _system_config={"health_check_period_ms": 1000, "health_check_failure_threshold": 3},
        ),
    )
    # Cluster records its address where a bare `ray.init()` looks for "the cluster `ray start`
    # made here": put back what was there, or another test would join this one (or its corpse).
    _restore(address_file, before)
    try:
        yield cluster
    finally:
        cluster.shutdown()
        _restore(address_file, before)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _restore(path: str, content: str | None) -> None:
    if content is None:
        if os.path.exists(path):
            os.unlink(path)
    else:
        with open(path, "w") as f:
            f.write(content)


def _model_node(cluster):
    return cluster.add_node(num_cpus=1, resources={MODEL: 1}, node_ip_address=LOOPBACK)


def _tasks_node(cluster):
    return cluster.add_node(num_cpus=1, node_ip_address=LOOPBACK)


@pytest.fixture
def nodes(cluster):
    """A fresh model node and tasks node; every worker node left is removed afterwards."""
    model, tasks = _model_node(cluster), _tasks_node(cluster)
    cluster.wait_for_nodes()
    yield model, tasks
    for node in list(cluster.worker_nodes):
        cluster.remove_node(node, allow_graceful=False)


class Job:
    """One manifest, one output, and the `jobs.render` command line that drives the cluster."""

    def __init__(self, cluster, tmp_path):
        self.tmp_path = tmp_path
        self.manifest = make_catalog(
            str(tmp_path / "catalog"), n_pairs=PAIRS, bad_rows=False, sizes=[(72, 64)], unique_images=4
        )
        # A catalog's product attributes ride along as a pass-through column. Their size matters:
        # Ray hands a result under 100 KiB to its owner (the driver) inline, so blocks of this
        # tiny catalog would never be in a node's object store and no node loss could lose one.
        # With 80 KiB a row, every block (as with real photos) lives where it was made, and a
        # lost one must be rebuilt from lineage.
        table = pq.read_table(self.manifest)
        pq.write_table(table.append_column("attributes", pa.array(["x" * 80_000] * table.num_rows)), self.manifest)
        self.pairs = sorted(table["pair_id"].to_pylist())
        self.output = str(tmp_path / "out")
        config = tmp_path / "render.yaml"
        config.write_text(f"actor_resources: {{{MODEL}: 1}}\nmanifest_part_rows: {PART_ROWS}\n")
        self.address = cluster.address
        self.config = str(config)
        self.runs: list[str] = []

    def start(self, model_dir: str, run_id: str) -> subprocess.Popen:
        self.runs.append(run_id)
        args = render_args(self.manifest, self.output, model_dir, "--config", self.config, *FLAGS)
        env = dict(
            os.environ,
            PYTHONPATH=ROOT,
            RAY_USAGE_STATS_ENABLED="0",
            # Ray turns a 127.0.0.1 address into the machine's outward IP before connecting,
            # where this loopback-only cluster does not listen: the driver would retry for ever.
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        )
        env.pop("RAY_ADDRESS", None)
        return subprocess.Popen(
            [sys.executable, "-m", "jobs.render", *args, "--address", self.address, "--run-id", run_id],
            stdout=open(self.log(run_id), "w"),
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )

    def log(self, run_id: str) -> str:
        return str(self.tmp_path / f"{run_id}.log")

    def text(self, run_id: str) -> str:
        return open(self.log(run_id)).read()

    def tail(self, run_id: str) -> str:
        return self.text(run_id)[-4000:]

    def rows_written(self, run_id: str) -> int:
        parts = glob.glob(f"{self.output}/manifest/{run_id}/part-*.parquet")
        return sum(pq.read_metadata(p).num_rows for p in parts)

    def wait_for_rows(self, proc: subprocess.Popen, run_id: str, rows: int) -> int:
        """Block until the run has written `rows` rows (and is still running); fail if it ends
        first, or if it wrote every row when fewer were asked for (the loss would not be mid-run)."""
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while (written := self.rows_written(run_id)) < rows:
            assert proc.poll() is None, f"the run ended before {rows} rows:\n{self.tail(run_id)}"
            assert time.monotonic() < deadline, f"no {rows} rows in time:\n{self.tail(run_id)}"
            time.sleep(0.2)
        assert written < PAIRS or rows == PAIRS, "the run was not mid-way: make it longer"
        assert proc.poll() is None, f"the run ended before the node loss:\n{self.tail(run_id)}"
        return written

    def finish(self, proc: subprocess.Popen, run_id: str) -> int:
        try:
            return proc.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"{run_id} hung after the node loss:\n{self.tail(run_id)}")

    def record(self, run_id: str) -> dict:
        return json.loads(open(os.path.join(self.output, "runs", f"{run_id}.json")).read())

    def check_exactly_once(self) -> None:
        """Every pair ok exactly once: one row in each run's manifest, one latest row, ok, its
        image decoding with the photo kept outside the region; once in the done index, which
        holds every run."""
        tables = []
        for run_id in self.runs:
            parts = sorted(glob.glob(f"{self.output}/manifest/{run_id}/part-*.parquet"))
            table = pa.concat_tables(pq.read_table(p) for p in parts)
            ids = table["pair_id"].to_pylist()
            assert len(ids) == len(set(ids)), f"{run_id}: duplicate rows {sorted(i for i in ids if ids.count(i) > 1)}"
            tables.append(table)
        rows = latest(pa.concat_tables(tables, promote_options="default"))
        assert sorted(rows["pair_id"].to_pylist()) == self.pairs
        assert set(rows["status"].to_pylist()) == {"ok"}
        assert check_ok_rows(rows) == PAIRS
        images = sorted(os.listdir(os.path.join(self.output, "images")))
        assert images == [f"{p}.png" for p in self.pairs]  # nothing missing, no temp file left
        layout = Layout(self.output)
        assert uncompacted_runs(layout) == []
        buckets = sorted(glob.glob(os.path.join(layout.state_buckets_dir, "*.parquet")))
        state = pa.concat_tables(pq.read_table(b) for b in buckets)["pair_id"].to_pylist()
        assert sorted(state) == self.pairs  # each pair once, in one bucket


def _lost_ids(record: dict) -> list[str]:
    return [n["node_id"] for n in record["nodes_lost"]]


def test_model_node_lost_mid_run(cluster, nodes, tmp_path, tiny_model_dir):
    model, _ = nodes
    job = Job(cluster, tmp_path)
    proc = job.start(tiny_model_dir, "model-lost")
    try:
        job.wait_for_rows(proc, "model-lost", PART_ROWS)
        cluster.remove_node(model, allow_graceful=False)
        _model_node(cluster)  # the actor's only possible home again
        code = job.finish(proc, "model-lost")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = job.text("model-lost")
    assert code == 0, log[-4000:]
    job.check_exactly_once()
    record = job.record("model-lost")
    assert record["exit_code"] == 0 and record["counts"]["ok"] == PAIRS
    assert _lost_ids(record) == [model.node_id]
    assert "1 Ray node(s) lost during the run" in log


def test_tasks_node_lost_mid_run(cluster, nodes, tmp_path, tiny_model_dir):
    _, tasks = nodes
    job = Job(cluster, tmp_path)
    proc = job.start(tiny_model_dir, "tasks-lost")
    try:
        job.wait_for_rows(proc, "tasks-lost", PART_ROWS)
        cluster.remove_node(tasks, allow_graceful=False)
        _tasks_node(cluster)
        code = job.finish(proc, "tasks-lost")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = job.text("tasks-lost")
    assert code == 0, log[-4000:]
    # Ray's own line: blocks in the lost object store were rebuilt from lineage (the case under
    # test, not a loss that cost nothing)
    assert "lost objects by resubmitting their tasks" in log
    job.check_exactly_once()
    record = job.record("tasks-lost")
    assert record["exit_code"] == 0 and record["counts"]["ok"] == PAIRS
    assert _lost_ids(record) == [tasks.node_id]


@pytest.mark.chaos
def test_two_nodes_lost_in_a_row(cluster, nodes, tmp_path, tiny_model_dir):
    model, tasks = nodes
    job = Job(cluster, tmp_path)
    proc = job.start(tiny_model_dir, "two-lost")
    try:
        written = job.wait_for_rows(proc, "two-lost", PART_ROWS)
        cluster.remove_node(tasks, allow_graceful=False)
        _tasks_node(cluster)
        job.wait_for_rows(proc, "two-lost", written + 2 * PART_ROWS)  # recovered from the first
        cluster.remove_node(model, allow_graceful=False)
        _model_node(cluster)
        code = job.finish(proc, "two-lost")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = job.text("two-lost")
    assert code == 0, log[-4000:]
    job.check_exactly_once()
    record = job.record("two-lost")
    assert record["exit_code"] == 0 and record["counts"]["ok"] == PAIRS
    assert _lost_ids(record) == [tasks.node_id, model.node_id]
    assert "2 Ray node(s) lost during the run" in log


@pytest.mark.chaos
@pytest.mark.parametrize("rows_before", [PAIRS - 2 * PART_ROWS, PAIRS], ids=["last-parts", "state-fold"])
def test_tasks_node_lost_at_the_end(cluster, nodes, tmp_path, tiny_model_dir, rows_before):
    """Lost while the last parts are written (the last rows' finish tasks were on it), or once
    every part is written, while the driver folds the run into the state on the cluster."""
    _, tasks = nodes
    job = Job(cluster, tmp_path)
    proc = job.start(tiny_model_dir, "end-lost")
    try:
        job.wait_for_rows(proc, "end-lost", rows_before)
        cluster.remove_node(tasks, allow_graceful=False)
        _tasks_node(cluster)
        code = job.finish(proc, "end-lost")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = job.tail("end-lost")
    assert code == 0, log
    job.check_exactly_once()
    record = job.record("end-lost")
    assert record["exit_code"] == 0 and record["counts"]["ok"] == PAIRS
    assert _lost_ids(record) == [tasks.node_id]


@pytest.mark.chaos  # a 30 s stall wait on a 3-node cluster (~70 s): make test-chaos, with the other extra cases
def test_model_node_lost_with_no_node_left_for_the_actor(cluster, nodes, tmp_path, tiny_model_dir):
    """No node has the actor's resources any more: the run cannot survive it, the stall
    watchdog stops it (exit 1) and a re-run, once such a node is back, renders only the rest."""
    model, _ = nodes
    job = Job(cluster, tmp_path)
    with open(job.config, "a") as f:
        # short, but above the longest quiet spell of a healthy run here (the model loading)
        f.write("stall_timeout_s: 30\n")
    proc = job.start(tiny_model_dir, "stranded")
    try:
        job.wait_for_rows(proc, "stranded", PART_ROWS)
        cluster.remove_node(model, allow_graceful=False)
        code = job.finish(proc, "stranded")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = job.text("stranded")
    assert code == 1, log[-4000:]
    record = job.record("stranded")
    assert record["exit_code"] == 1 and "no progress for 30 s" in record["message"], record["message"]
    assert _lost_ids(record) == [model.node_id]
    done = record["counts"]["ok"]
    assert 0 < done < PAIRS

    _model_node(cluster)
    rerun = job.start(tiny_model_dir, "rerun")
    try:
        code = job.finish(rerun, "rerun")
    finally:
        if rerun.poll() is None:
            os.killpg(rerun.pid, signal.SIGKILL)
    assert code == 0, job.tail("rerun")
    job.check_exactly_once()
    record = job.record("rerun")
    assert record["nodes_lost"] == [] and record["counts"]["reused"] == done


TRAIN_RECIPE = """\
steps: 6
batch_size: 4
learning_rate: 0.001
pixel_weight: 0
perceptual_weight: 0
checkpoint_every: 2
keep_checkpoints: 1
log_every: 1
workers: 2
cpus_per_worker: 1
data_cpus: 0.25
torch_threads: 1
max_failures: 1
val_renders: 0
"""


def _train(cluster, tmp_path, model_dir: str, manifest: str, name: str, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT, RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "jobs.train", "--manifest", manifest, "--init-model", model_dir]
    command += ["--output", str(tmp_path / name), "--address", cluster.address, *extra]
    return subprocess.Popen(
        command,
        stdout=open(tmp_path / f"{name}.log", "w"),
        stderr=subprocess.STDOUT,
        env=env,
        cwd=ROOT,
        start_new_session=True,
    )


def _finish(proc: subprocess.Popen, log) -> int:
    try:
        return proc.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"the training run hung:\n{open(log).read()[-4000:]}")


def test_training_worker_node_lost_mid_epoch(cluster, tmp_path, tiny_model_dir):
    """Issue 30: two training workers, one per 1-CPU node; the node of one is removed mid-epoch
    (every worker paused before step 2, the step-2 checkpoint committed; an epoch is 3 steps).
    Ray Train restarts the group from that checkpoint on the node added in its place, the run
    finishes in the one command, and its weights equal an uninterrupted run's bit for bit (the
    data order and every draw depend on (seed, pair_id, epoch), not on which worker or node)."""
    from safetensors.torch import load

    from pipeline.toy.catalog import make_training_catalog
    from pipeline.train.step import WEIGHTS_FILE

    manifest = make_training_catalog(str(tmp_path / "catalog"), n_pairs=16, val_fraction=0.25)  # 12 train
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(TRAIN_RECIPE)
    marker = tmp_path / "paused"
    faulty = tmp_path / "faulty.yaml"
    faulty.write_text(
        TRAIN_RECIPE + f"fault_injection: {{pause_at_step: 2, pause_s: 60, pause_once_marker: '{marker}'}}\n"
    )
    first, second = (cluster.add_node(num_cpus=1, node_ip_address=LOOPBACK) for _ in range(2))
    cluster.wait_for_nodes()
    try:
        plain = _train(cluster, tmp_path, tiny_model_dir, manifest, "plain", "--config", str(recipe))
        assert _finish(plain, tmp_path / "plain.log") == 0, (tmp_path / "plain.log").read_text()[-4000:]

        proc = _train(cluster, tmp_path, tiny_model_dir, manifest, "lost", "--config", str(faulty))
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not marker.exists():  # the workers are paused before step 2
            assert proc.poll() is None, (tmp_path / "lost.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "the run never reached step 2"
            time.sleep(0.2)
        cluster.remove_node(second, allow_graceful=False)
        cluster.add_node(num_cpus=1, node_ip_address=LOOPBACK)
        assert _finish(proc, tmp_path / "lost.log") == 0, (tmp_path / "lost.log").read_text()[-4000:]
    finally:
        for node in list(cluster.worker_nodes):
            cluster.remove_node(node, allow_graceful=False)
    log = (tmp_path / "lost.log").read_text()
    assert "resumed from the checkpoint of step 2" in log, log[-4000:]
    record = json.loads((tmp_path / "lost" / "runs" / "train.json").read_text())
    assert record["exit_code"] == 0

    def weights(name: str) -> dict:
        path = tmp_path / name / "checkpoints" / "train" / "checkpoint_00000006" / WEIGHTS_FILE
        return load(path.read_bytes())

    expected, got = weights("plain"), weights("lost")
    assert expected.keys() == got.keys()
    for key, tensor in expected.items():
        assert torch.equal(tensor, got[key]), key
