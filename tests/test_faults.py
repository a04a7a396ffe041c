"""Faults in the model stage, injected for real: a worker that dies (os._exit, as a segfault
would) once or every time, and GPU out-of-memory errors. Every pair ends exactly once."""

from __future__ import annotations

import glob

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.render import main as render
from pipeline.sample_catalog import make_catalog

FAST = ["--steps", "2", "--batch-size", "4", "--image-format", "png", "--cpus-per-actor", "0.5", "--torch-threads", "1"]


def _run(tmp_path, tiny_model_dir, fault: str, run_id: str, pairs: int = 8) -> tuple[int, dict[str, dict], str]:
    manifest = make_catalog(str(tmp_path / "catalog"), n_pairs=pairs, bad_rows=False, sizes=[(72, 64)], unique_images=4)
    config = tmp_path / f"{run_id}.yaml"
    config.write_text(f"fault_injection: {fault}\nmax_failed_fraction: 0.5\n")
    output = tmp_path / "out"
    code = render(["--manifest", manifest, "--output", str(output), "--model", tiny_model_dir, "--run-id", run_id,
                   "--config", str(config), *FAST])
    rows = pa.concat_tables(pq.read_table(p) for p in sorted(glob.glob(f"{output}/manifest/{run_id}/part-*.parquet"))).to_pylist()
    by_id = {}
    for row in rows:
        assert row["pair_id"] not in by_id, f"{row['pair_id']} has two rows"
        by_id[row["pair_id"]] = row
    return code, by_id, str(output)


def test_worker_dies_once_mid_batch(ray_address, tmp_path, tiny_model_dir):
    marker = tmp_path / "crashed"
    code, rows, output = _run(tmp_path, tiny_model_dir, f'{{crash_on_pair: pair-0002, crash_once_marker: "{marker}"}}', "once")
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
