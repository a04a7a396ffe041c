"""What a new user hits on the first day, end to end on the session's Ray: a run where every
row fails, inputs allowed only after a second look, a backfill over full daily dumps, and a
re-render with other settings."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
from helpers import FAST, read_manifest, render_args

from jobs.backfill import main as backfill
from jobs.render import main as render
from pipeline import storage
from pipeline.output.layout import Layout
from pipeline.output.state import load_state
from pipeline.sample_catalog import make_catalog


def test_a_run_where_every_row_fails_exits_3_with_report_and_summary(ray_address, tmp_path, capsys, tiny_model_dir):
    path = make_catalog(str(tmp_path / "catalog"), n_pairs=3, bad_rows=False, sizes=[(64, 48)])
    rows = [dict(r, context_uri=f"images/missing-{i}.jpg") for i, r in enumerate(pq.read_table(path).to_pylist())]
    pq.write_table(pa.Table.from_pylist(rows), path)
    output = tmp_path / "out"
    assert (
        render(["--manifest", path, "--output", str(output), "--model", tiny_model_dir, "--run-id", "all-bad", *FAST])
        == 3
    )
    out = capsys.readouterr().out
    report = Layout(str(output)).report("all-bad")
    assert os.path.exists(report) and f"report     {report}" in out
    assert "failures   image_missing 3" in out
    record = json.loads((output / "runs" / "all-bad.json").read_text())
    assert record["exit_code"] == 3 and record["counts"]["failed"] == 3
    assert "missing-0.jpg" in open(report).read()  # the failed pairs are listed on the page


def test_inputs_allowed_later_are_judged_again_without_retry_failed(ray_address, tmp_path, capsys, tiny_model_dir):
    photos = make_catalog(str(tmp_path / "photos"), n_pairs=2, bad_rows=False, sizes=[(64, 48)])
    rows = pq.read_table(photos).to_pylist()
    for row in rows:  # absolute paths outside the manifest's folder
        for column in ("context_uri", "product_uri", "mask_uri"):
            if row.get(column):
                row[column] = str(tmp_path / "photos" / row[column])
    (tmp_path / "manifests").mkdir()
    manifest = str(tmp_path / "manifests" / "m.parquet")
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    args = ["--manifest", manifest, "--output", str(tmp_path / "out"), "--model", tiny_model_dir, *FAST]
    assert render([*args, "--run-id", "first"]) == 3
    assert set(read_manifest(str(tmp_path / "out"), "first")["error_code"].to_pylist()) == {"uri_not_allowed"}
    capsys.readouterr()
    assert render([*args, "--run-id", "second", "--allow-root", str(tmp_path / "photos")]) == 0
    second = read_manifest(str(tmp_path / "out"), "second")
    assert second["status"].to_pylist() == ["ok", "ok"] and second["attempt"].to_pylist() == [1, 1]
    assert "carried" not in capsys.readouterr().out


def test_backfill_of_full_daily_dumps_renders_each_pair_once_from_its_latest_day(
    ray_address, tmp_path, tiny_model_dir
):
    root = tmp_path / "manifests"
    days = ["2026-11-25", "2026-11-26"]
    for k, day in enumerate(days):  # the same two pairs on both days, the photos changed in between
        make_catalog(
            str(root / f"dt={day}"),
            n_pairs=2,
            bad_rows=False,
            seed=k,
            manifest_name="part-0.parquet",
            sizes=[(64, 48)],
            pair_prefix="sku",
        )
    output = tmp_path / "out"
    args = [
        "--manifest-root",
        str(root),
        "--start",
        days[0],
        "--end",
        days[1],
        "--output",
        str(output),
        "--model",
        tiny_model_dir,
        *FAST,
    ]
    assert backfill([*args, "--run-id", "dumps"]) == 0
    table = read_manifest(str(output), "dumps").to_pylist()
    assert len(table) == 4  # every input row accounted for
    by_day = {(r["shard"], r["pair_id"]): r for r in table}
    for pair in ("sku-0000", "sku-0001"):
        old, new = by_day[(f"dt={days[0]}", pair)], by_day[(f"dt={days[1]}", pair)]
        assert (old["status"], old["error_code"]) == ("skipped", "superseded") and days[1] in old["error_message"]
        assert old["attempt"] == 0  # not rendered in this run
        assert new["status"] == "ok" and new["context_uri"].startswith(str(root / f"dt={days[1]}"))
    record = json.loads((output / "runs" / "dumps.json").read_text())
    assert record["counts"]["skipped"] == 2 and record["counts"]["failed"] == 0
    state = load_state(Layout(str(output)))
    assert sorted(state["pair_id"].to_pylist()) == ["sku-0000", "sku-0001"]  # one latest row per pair


def test_re_rendering_with_other_settings_replaces_the_image_and_the_state_says_so(
    ray_address, tmp_path, tiny_model_dir
):
    path = make_catalog(str(tmp_path / "catalog"), n_pairs=1, bad_rows=False, sizes=[(64, 48)])
    output = str(tmp_path / "out")
    args = ["--manifest", path, "--output", output, "--model", tiny_model_dir, *FAST]
    assert render([*args, "--run-id", "v1"]) == 0
    first = read_manifest(output, "v1").to_pylist()[0]
    before = storage.read_bytes(first["output_uri"])
    assert render([*args, "--run-id", "v2", "--guidance-scale", "2"]) == 0
    second = read_manifest(output, "v2").to_pylist()[0]
    assert second["output_uri"] == first["output_uri"] and second["attempt"] == 1  # same key, rendered again
    assert storage.read_bytes(second["output_uri"]) != before  # overwritten in place
    assert read_manifest(output, "v1").to_pylist()[0]["settings_digest"] == first["settings_digest"]  # history kept
    latest = load_state(Layout(output)).to_pylist()[0]
    assert (
        (latest["run_id"], latest["settings_digest"])
        == ("v2", second["settings_digest"])
        != ("v1", first["settings_digest"])
    )


def test_limit_zero_renders_nothing_and_finishes(ray_address, tmp_path, tiny_model_dir):
    path = make_catalog(str(tmp_path / "catalog"), n_pairs=2, bad_rows=False, sizes=[(64, 48)])
    output = tmp_path / "out"
    assert render(["--manifest", path, "--output", str(output), "--model", tiny_model_dir, "--limit", "0", *FAST]) == 0
    (record,) = [json.loads(p.read_text()) for p in (output / "runs").iterdir()]
    assert record["exit_code"] == 0 and record["counts"]["rows"] == 0


def test_sigterm_stops_the_run_with_its_record_and_releases_the_lock(ray_address, tmp_path, tiny_model_dir):
    path = make_catalog(str(tmp_path / "catalog"), n_pairs=12, bad_rows=False, sizes=[(64, 48)], unique_images=2)
    output = tmp_path / "out"
    args = render_args(path, output, tiny_model_dir, "--address", ray_address, "--run-id", "stopped", *FAST)
    env = dict(os.environ, PYTHONPATH=os.getcwd(), RAY_USAGE_STATS_ENABLED="0")
    job = subprocess.Popen(
        [sys.executable, "-m", "jobs.render", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while not (output / "_lock").exists():  # the run has started: lock taken
            assert job.poll() is None and time.time() < deadline
            time.sleep(0.2)
        job.send_signal(signal.SIGTERM)
        out, _ = job.communicate(timeout=120)
    finally:
        job.kill()
    assert job.returncode == 1, out[-2000:]
    record = json.loads((output / "runs" / "stopped.json").read_text())
    assert record["exit_code"] == 1 and "stopped by SIGTERM" in record["message"]
    assert not (output / "_lock").exists()  # released: the next run need not wait for staleness
    assert "stopped by SIGTERM" in out
