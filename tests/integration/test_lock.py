"""`_lock` on the S3 endpoint (moto: If-None-Match / If-Match are real 412s) with real processes,
and at job level: eight render jobs started at once (local and S3 outputs), and a frozen run
taken over that stops before writing (local) (DESIGN.md "Resume, staleness, concurrency"). The local-file races at
lock level are tests/unit/test_output_lock.py."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from contenders import (
    assert_fenced,
    assert_one_winner,
    crashed_holder,
    frozen_holder_taken_over,
    observer,
    race,
    wait_stale,
)
from helpers import FAST, ROOT, read_manifest, render_args

from pipeline import storage
from pipeline.sample_catalog import make_catalog

CONTENDERS = os.path.join(ROOT, "tests", "contenders.py")


def test_eight_contenders_on_s3_one_acquires(s3_bucket):
    output = f"s3://{s3_bucket}/out"
    outcomes, holder = race(output)
    assert_one_winner(outcomes, holder)
    assert not storage.exists(f"{output}/_lock")


def test_eight_contenders_taking_over_a_crashed_holders_s3_lock(s3_bucket, tmp_path, caplog):
    output = f"s3://{s3_bucket}/out"
    crashed_holder(output, "crashed", 2.0, str(tmp_path))
    assert wait_stale(output, 2.0)["run_id"] == "crashed"
    outcomes, holder = race(output, stale_after_s=2.0)
    assert_one_winner(outcomes, holder)
    # and one taker in this process, for the warning
    (tmp_path / "again").mkdir()
    crashed_holder(output, "crashed-again", 1.0, str(tmp_path / "again"))
    wait_stale(output, 1.0)
    with caplog.at_level(logging.WARNING, logger="pipeline.output.lock"), observer(output, 1.0) as lock:
        assert lock.holder()["token"] == lock.token
    assert "took over the stale lock of run crashed-again" in caplog.text
    assert not storage.exists(f"{output}/_lock")


def test_a_frozen_s3_holder_taken_over_stops_at_its_fence(s3_bucket, tmp_path):
    output = f"s3://{s3_bucket}/out"
    report, taker, holder_after = frozen_holder_taken_over(output, 2.0, str(tmp_path))
    try:
        assert_fenced(report, taker, holder_after)
    finally:
        taker.release()
    assert not storage.exists(f"{output}/_lock")


def _files(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=ROOT, RAY_USAGE_STATS_ENABLED="0")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_eight_render_jobs_started_together_one_renders(where, ray_address, tmp_path, tiny_model_dir, request):
    manifest = make_catalog(str(tmp_path / "catalog"), n_pairs=2, bad_rows=False, sizes=[(64, 48)])
    output = str(tmp_path / "out") if where == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/out"
    go = tmp_path / "go"
    jobs = {}
    for i in range(8):
        args = render_args(manifest, output, tiny_model_dir, "--address", ray_address, "--run-id", f"c{i}", *FAST)
        jobs[f"c{i}"] = subprocess.Popen(
            [sys.executable, CONTENDERS, str(go), *args, "--no-metrics"],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("go.ready-*"))) < 8:  # all imported: open the gate
        assert all(job.poll() is None for job in jobs.values()) and time.monotonic() < deadline
        time.sleep(0.05)
    go.touch()
    results = {run_id: (job.communicate(timeout=300), job.returncode) for run_id, job in jobs.items()}
    winners = [run_id for run_id, (_, code) in results.items() if code == 0]
    assert len(winners) == 1, {run_id: (code, err[-500:]) for run_id, ((_, err), code) in results.items()}
    (winner,) = winners
    for run_id, ((out, err), code) in results.items():
        if run_id == winner:
            continue
        assert code == 2 and f"is locked by run {winner} on host" in err, (run_id, code, err[-2000:])
        assert "[dtc] run" not in out  # refused before resume and Ray
        assert not storage.list_files(storage.join(output, "manifest", run_id))
        assert not storage.exists(storage.join(output, "runs", f"{run_id}.json"))
    assert read_manifest(output, winner).num_rows == 2
    assert not storage.exists(storage.join(output, "_lock"))


def test_a_frozen_run_taken_over_exits_1_without_writing(ray_address, tmp_path, tiny_model_dir):
    manifest = make_catalog(str(tmp_path / "catalog"), n_pairs=4, bad_rows=False, sizes=[(64, 48)])
    output = tmp_path / "out"
    config = tmp_path / "render.yaml"
    # parts of 1000 rows: the frozen run has written none when it is stopped; a 3 s lock lifetime
    config.write_text("lock_stale_s: 3\nmanifest_part_rows: 1000\n")

    def job(run_id: str) -> subprocess.Popen:
        args = render_args(manifest, output, tiny_model_dir, "--address", ray_address, "--run-id", run_id, *FAST)
        log = open(tmp_path / f"{run_id}.log", "w")
        command = [sys.executable, "-m", "jobs.render", *args, "--no-metrics", "--config", str(config)]
        return subprocess.Popen(command, env=_env(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    def freeze_once_it_holds(job: subprocess.Popen, run_id: str) -> None:
        deadline = time.monotonic() + 120
        while (observer(str(output)).holder() or {}).get("run_id") != run_id:
            assert job.poll() is None and time.monotonic() < deadline, (tmp_path / f"{run_id}.log").read_text()
            time.sleep(0.01)
        os.kill(job.pid, signal.SIGSTOP)

    frozen = job("frozen")
    taker = None
    try:
        freeze_once_it_holds(frozen, "frozen")
        assert wait_stale(str(output), 3.0)["run_id"] == "frozen"
        taker = job("taker")
        # The taker is frozen too once it holds the lock, so that the frozen run wakes while the
        # lock is the taker's (and nothing else writes): it must stop at its first fence, exit 1.
        freeze_once_it_holds(taker, "taker")
        before = _files(output)
        os.kill(frozen.pid, signal.SIGCONT)
        assert frozen.wait(timeout=300) == 1
        written = {k for k, v in _files(output).items() if before.get(k) != v}
        os.kill(taker.pid, signal.SIGCONT)
        assert taker.wait(timeout=300) == 0, (tmp_path / "taker.log").read_text()[-3000:]
    finally:
        for job_ in (frozen, taker):
            if job_ is not None and job_.poll() is None:
                os.kill(job_.pid, signal.SIGCONT)
                job_.kill()
    # after the takeover the frozen run wrote its run record and nothing else: no manifest part,
    # no state, and it left the taker's lock in place
    assert written == {"runs/frozen.json"}, written
    log = (tmp_path / "frozen.log").read_text()
    assert "lost the output lock" in log and "to run taker" in log, log[-3000:]
    record = json.loads((output / "runs" / "frozen.json").read_text())
    assert record["exit_code"] == 1 and "lost the output lock" in record["message"], record["message"]
    assert "to run taker" in record["message"] and "stopped before writing" in record["message"]
    assert not (output / "manifest" / "frozen").exists()
    assert "took over the stale lock of run frozen" in (tmp_path / "taker.log").read_text()
    assert pq.read_table(output / "manifest" / "taker").num_rows == 4
    assert not (output / "_lock").exists()  # the taker released it
