"""Faults injected for real, each ending with every pair exactly once (or, where the job must
refuse, with nothing written):

- the model stage: a worker that dies (os._exit, as a segfault would) once or every time, and
  GPU out-of-memory errors;
- storage: S3 answering 503 SlowDown / 500 to every Nth request (tests/s3proxy.py in front of
  moto), S3 down at start, an output folder that cannot be created, and a disk that fills up
  (RLIMIT_FSIZE on the driver process).

The driver's SIGKILL mid-run and the re-run are in test_render_job.py.
"""

from __future__ import annotations

import glob
import io
import json
import os
import resource
import subprocess
import sys

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import FAST, S3_SECRET, free_port, render_args

from jobs.render import main as render
from pipeline import storage
from pipeline.output.layout import Layout
from pipeline.output.state import load_state
from pipeline.sample_catalog import make_catalog


def _run(tmp_path, tiny_model_dir, fault: str, run_id: str, pairs: int = 8) -> tuple[int, dict[str, dict], str]:
    manifest = make_catalog(
        str(tmp_path / "catalog"), n_pairs=pairs, bad_rows=False, sizes=[(72, 64)], unique_images=4
    )
    config = tmp_path / f"{run_id}.yaml"
    config.write_text(f"fault_injection: {fault}\nmax_failed_fraction: 0.5\n")
    output = tmp_path / "out"
    code = render(
        render_args(manifest, str(output), tiny_model_dir, "--run-id", run_id, "--config", str(config), *FAST)
    )
    rows = pa.concat_tables(
        pq.read_table(p) for p in sorted(glob.glob(f"{output}/manifest/{run_id}/part-*.parquet"))
    ).to_pylist()
    by_id = {}
    for row in rows:
        assert row["pair_id"] not in by_id, f"{row['pair_id']} has two rows"
        by_id[row["pair_id"]] = row
    return code, by_id, str(output)


def test_worker_dies_once_mid_batch(ray_address, tmp_path, tiny_model_dir):
    marker = tmp_path / "crashed"
    code, rows, output = _run(
        tmp_path, tiny_model_dir, f'{{crash_on_pair: pair-0002, crash_once_marker: "{marker}"}}', "once"
    )
    assert marker.exists()  # the worker really died
    assert code == 0 and len(rows) == 8 and {r["status"] for r in rows.values()} == {"ok"}
    assert rows["pair-0002"]["attempt"] == 2  # the batch that died, then alone
    assert not glob.glob(f"{output}/state/inflight/once/*")  # no attempt counter left behind


def test_poison_row_fails_with_worker_crash_after_two_retries(ray_address, tmp_path, tiny_model_dir):
    code, rows, _ = _run(tmp_path, tiny_model_dir, "{crash_on_pair: pair-0005}", "poison")
    assert code == 0 and len(rows) == 8
    poison = rows.pop("pair-0005")
    assert (poison["status"], poison["error_code"], poison["attempt"]) == ("failed", "worker_crash", 3)
    assert "killed its worker 3 times" in poison["error_message"]
    assert {r["status"] for r in rows.values()} == {"ok"}


def test_gpu_oom_splits_the_batch_and_a_lone_misfit_fails(ray_address, tmp_path, tiny_model_dir):
    code, rows, _ = _run(tmp_path, tiny_model_dir, "{oom_over: 1, oom_pair: pair-0006}", "oom")
    assert code == 0 and len(rows) == 8
    misfit = rows.pop("pair-0006")
    assert (misfit["status"], misfit["error_code"]) == ("failed", "oom")
    assert {r["status"] for r in rows.values()} == {"ok"}  # every batch split down to single pairs


def _upload(folder, prefix: str) -> None:
    for path in glob.glob(f"{folder}/**/*", recursive=True):
        if os.path.isfile(path):
            storage.write_bytes(f"{prefix}/{os.path.relpath(path, folder)}", open(path, "rb").read())


def _keys(bucket: str) -> list[str]:
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def test_flaky_s3_is_retried_and_every_pair_lands_once(
    ray_address, s3_proxy, s3_bucket, tmp_path, tiny_model_dir, capfd
):
    make_catalog(str(tmp_path / "catalog"), n_pairs=12, bad_rows=False, sizes=[(72, 64)], unique_images=4)
    _upload(tmp_path / "catalog", f"s3://{s3_bucket}/catalog")
    output = f"s3://{s3_bucket}/out"
    injected = s3_proxy.injected
    s3_proxy.fail_every = 4  # every 4th request, from the driver and the workers: 503 SlowDown or 500
    try:
        code = render(
            render_args(
                f"s3://{s3_bucket}/catalog/manifest.parquet", output, tiny_model_dir, "--run-id", "flaky", *FAST
            )
        )
    finally:
        s3_proxy.fail_every = 0
    assert s3_proxy.injected - injected >= 20  # the errors really happened
    assert code == 0
    parts = [k for k in _keys(s3_bucket) if k.startswith("out/manifest/flaky/")]
    rows = pa.concat_tables(
        pq.read_table(io.BytesIO(storage.read_bytes(f"s3://{s3_bucket}/{k}"))) for k in parts
    ).to_pylist()
    assert sorted(r["pair_id"] for r in rows) == [f"pair-{i:04d}" for i in range(12)]
    assert {r["status"] for r in rows} == {"ok"}
    images = [k for k in _keys(s3_bucket) if k.startswith("out/images/")]
    assert len(images) == 12
    done = load_state(Layout(output))
    assert sorted(done["pair_id"].to_pylist()) == [f"pair-{i:04d}" for i in range(12)]

    # The secret key is in every process's environment; it must appear in no output object
    # (manifests, run record, report, state), nothing printed, and no Ray log of the session.
    secret = os.environ["AWS_SECRET_ACCESS_KEY"].encode()
    assert secret == S3_SECRET.encode()
    keys = _keys(s3_bucket)
    assert any(k.startswith("out/runs/") for k in keys) and any(k.startswith("out/report/") for k in keys)
    for key in (k for k in keys if not k.endswith("/")):  # "out/" is pyarrow's folder marker
        assert secret not in storage.read_bytes(f"s3://{s3_bucket}/{key}"), key
    printed = capfd.readouterr()
    assert "[dtc] run flaky" in printed.out and secret.decode() not in printed.out + printed.err
    import ray

    logs = glob.glob(os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs", "*"))
    assert logs
    for path in logs:
        if os.path.isfile(path):
            assert secret not in open(path, "rb").read(), path


@pytest.mark.parametrize("manifest_on", ["s3", "local"])
def test_s3_down_at_start_is_one_error_exit_1_and_nothing_written(
    s3_bucket, tmp_path, tiny_model_dir, capsys, monkeypatch, manifest_on
):
    manifest = make_catalog(str(tmp_path / "catalog"), n_pairs=2, bad_rows=False, sizes=[(72, 64)])
    if manifest_on == "s3":
        _upload(tmp_path / "catalog", f"s3://{s3_bucket}/catalog")
        manifest = f"s3://{s3_bucket}/catalog/manifest.parquet"
    before = _keys(s3_bucket)
    with monkeypatch.context() as down:
        down.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
        down.setenv("DTC_S3_MAX_ATTEMPTS", "2")  # fail in a second, not after the default backoff
        code = render(render_args(manifest, f"s3://{s3_bucket}/out", tiny_model_dir, "--run-id", "down", *FAST))
    assert code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "failed:" in err and "Could not connect" in err, err
    assert _keys(s3_bucket) == before  # nothing written
    assert os.listdir(tmp_path) == ["catalog"]


def test_output_under_a_regular_file_is_refused_and_nothing_written(tmp_path, tiny_model_dir, capsys):
    manifest = make_catalog(str(tmp_path / "catalog"), n_pairs=2, bad_rows=False, sizes=[(72, 64)])
    (tmp_path / "plain-file").write_text("not a folder")
    code = render(
        ["--manifest", manifest, "--output", str(tmp_path / "plain-file" / "out"), "--model", tiny_model_dir, *FAST]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot be created" in err and "is a file" in err, err
    assert (tmp_path / "plain-file").read_text() == "not a folder"
    assert sorted(os.listdir(tmp_path)) == ["catalog", "plain-file"]


def test_disk_full_is_one_error_nothing_half_written_and_a_rerun_completes(ray_address, tmp_path, tiny_model_dir):
    manifest = make_catalog(str(tmp_path / "catalog"), n_pairs=8, bad_rows=False, sizes=[(72, 64)], unique_images=4)
    output = tmp_path / "out"
    args = render_args(manifest, str(output), tiny_model_dir, "--address", ray_address, *FAST)
    env = dict(os.environ, PYTHONPATH=os.getcwd(), RAY_USAGE_STATS_ENABLED="0")

    def small_disk():  # in the driver process only: files over 4 KiB cannot be written (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    full = subprocess.run(
        [sys.executable, "-m", "jobs.render", *args, "--run-id", "full"],
        env=env,
        capture_output=True,
        text=True,
        preexec_fn=small_disk,
        timeout=300,
    )
    assert full.returncode == 1, full.stdout[-3000:] + full.stderr[-3000:]
    errors = [line for line in full.stderr.splitlines() if line.startswith("render: failed:")]
    assert len(errors) == 1 and "File too large" in errors[0], full.stderr[-3000:]
    # nothing half-written: no temp file left, every file that exists is whole
    files = [os.path.join(d, f) for d, _, names in os.walk(output) for f in names]
    assert not [f for f in files if ".tmp-" in f], files
    for f in files:
        if f.endswith(".parquet"):
            pq.read_table(f)
        elif f.endswith(".json"):
            json.loads(open(f).read())
    assert not (output / "_lock").exists()

    again = subprocess.run(
        [sys.executable, "-m", "jobs.render", *args, "--run-id", "again"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    done = load_state(Layout(str(output))).to_pylist()
    assert sorted(r["pair_id"] for r in done) == [f"pair-{i:04d}" for i in range(8)]
    assert {r["status"] for r in done} == {"ok"}
