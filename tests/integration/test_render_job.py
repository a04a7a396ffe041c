"""The render job end to end: real local Ray, real S3 endpoint on loopback, tiny model.

Each test calls `jobs.render.main` (in-process, on the session's Ray) or runs it as a
subprocess driver joining the same cluster, exactly as a user would.
"""

from __future__ import annotations

import glob
import io
import json
import os
import signal
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import FAST, check_ok_rows, read_manifest, render_args, subprocess_render, wait_for_parts
from PIL import Image

from jobs.render import main as render
from pipeline import storage
from pipeline.sample_catalog import make_catalog


def test_s3_manifest_renders_to_s3(ray_address, s3_bucket, tmp_path):
    catalog = tmp_path / "catalog"
    make_catalog(str(catalog), n_pairs=52, bad_rows=False)
    for path in glob.glob(str(catalog / "**" / "*"), recursive=True):
        if os.path.isfile(path):
            rel = os.path.relpath(path, catalog)
            storage.write_bytes(f"s3://{s3_bucket}/catalog/{rel}", open(path, "rb").read())
    output = f"s3://{s3_bucket}/renders"
    code = render(
        render_args(f"s3://{s3_bucket}/catalog/manifest.parquet", output, _tiny_model(), "--run-id", "s3run", *FAST)
    )
    assert code == 0
    table = read_manifest(output, "s3run")
    assert table.num_rows == 52 and sorted(table["pair_id"].to_pylist()) == [f"pair-{i:04d}" for i in range(52)]
    assert set(table["status"].to_pylist()) == {"ok"}
    assert all(u.startswith(f"s3://{s3_bucket}/renders/images/") for u in table["output_uri"].to_pylist())
    assert check_ok_rows(table) == 52
    record = json.loads(storage.read_bytes(f"{output}/runs/s3run.json"))
    assert record["exit_code"] == 0 and record["counts"]["ok"] == 52
    assert record["steady_rows_per_s"] > 0 and record["arrival_rows_per_s"] > 0  # 13 model calls of 4
    assert storage.exists(f"{output}/state/done.json") and not storage.exists(f"{output}/_lock")
    assert storage.list_files(f"{output}/state/buckets") and not storage.exists(f"{output}/state/done.parquet")


_MODEL: list[str] = []


def _tiny_model() -> str:
    return _MODEL[0]


@pytest.fixture(autouse=True)
def _model_path(tiny_model_dir):
    _MODEL[:] = [tiny_model_dir]


def _bad_rows_manifest(catalog) -> str:
    """The demo catalog plus one row for each row-level problem of the issue."""
    path = make_catalog(str(catalog), n_pairs=6, bad_rows=False)
    good = pq.read_table(path).to_pylist()
    ctx, prod = good[0]["context_uri"], good[0]["product_uri"]
    (catalog / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (catalog / "images" / "empty-mask.png").write_bytes(_png(np.zeros((240, 320), np.uint8)))
    base = {"mask_uri": None, "bbox": None, "category": "x"}
    bad = [
        dict(
            base,
            pair_id="bad-unreadable",
            context_uri="images/broken.jpg",
            product_uri=prod,
            bbox=[1.0, 1.0, 50.0, 50.0],
        ),
        dict(
            base, pair_id="bad-missing", context_uri="images/nope.jpg", product_uri=prod, bbox=[1.0, 1.0, 50.0, 50.0]
        ),
        dict(
            base,
            pair_id="bad-both",
            context_uri=ctx,
            product_uri=prod,
            mask_uri=good[1]["mask_uri"],
            bbox=[1.0, 1.0, 50.0, 50.0],
        ),
        dict(base, pair_id="bad-neither", context_uri=ctx, product_uri=prod),
        dict(base, pair_id="bad-empty-region", context_uri=ctx, product_uri=prod, mask_uri="images/empty-mask.png"),
        dict(base, pair_id="bad-outside", context_uri=ctx, product_uri=prod, bbox=[900.0, 900.0, 950.0, 950.0]),
        dict(base, pair_id="dup", context_uri=ctx, product_uri=prod, bbox=[1.0, 1.0, 50.0, 50.0]),
        dict(base, pair_id="dup", context_uri=ctx, product_uri=prod, bbox=[2.0, 2.0, 60.0, 60.0]),
        dict(base, pair_id="../escape", context_uri=ctx, product_uri=prod, bbox=[1.0, 1.0, 50.0, 50.0]),
    ]
    rows = good + bad
    table = pa.table(
        {k: [r[k] for r in rows] for k in ("pair_id", "context_uri", "product_uri", "mask_uri")}
        | {
            "bbox": pa.array([r["bbox"] for r in rows], pa.list_(pa.float64())),
            "category": [r["category"] for r in rows],
        }
    )
    pq.write_table(table, path)
    return path


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_local_paths_bad_rows_fail_with_distinct_codes(ray_address, tmp_path):
    manifest = _bad_rows_manifest(tmp_path / "catalog")
    output = tmp_path / "out"
    code = render(
        render_args(manifest, str(output), _tiny_model(), "--run-id", "r1", "--max-failed-fraction", "0.9", *FAST)
    )
    assert code == 0
    table = read_manifest(str(output), "r1")
    assert table.num_rows == 15  # one output row per input row, the duplicates included
    by_id: dict[str, list] = {}
    for row in table.to_pylist():
        by_id.setdefault(row["pair_id"], []).append(row)
    expected = {
        "bad-unreadable": "image_unreadable",
        "bad-missing": "image_missing",
        "bad-both": "region_ambiguous",
        "bad-neither": "region_missing",
        "bad-empty-region": "region_empty",
        "bad-outside": "bad_bbox",
        "../escape": "invalid_pair_id",
    }
    for pair_id, code_ in expected.items():
        (row,) = by_id[pair_id]
        assert (row["status"], row["error_code"]) == ("failed", code_), row
        assert row["error_message"]
    assert [r["error_code"] for r in by_id["dup"]] == ["duplicate_pair_id"] * 2
    assert len(set(expected.values())) == len(expected)
    good = [r for r in table.to_pylist() if r["pair_id"].startswith("pair-")]
    assert len(good) == 6 and {r["status"] for r in good} == {"ok"}
    assert check_ok_rows(table) == 6
    assert {r["category"] for r in good} <= {"chair", "lamp", "rug", "vase"}  # pass-through column kept
    # nothing escaped the output: only the layout's folders exist
    assert sorted(os.listdir(output)) == ["images", "manifest", "report", "runs", "state"]
    assert sorted(os.listdir(output / "images")) == sorted(f"{r['pair_id']}.png" for r in good)


@pytest.mark.parametrize(
    "content, message",
    [
        ({"pair_id": ["a"], "context_uri": ["c.jpg"]}, "product_uri"),
        ({"pair_id": [1], "context_uri": ["c.jpg"], "product_uri": ["p.png"], "bbox": [[0.0, 0, 9, 9]]}, "pair_id"),
        (
            {
                "pair_id": pa.array([], pa.string()),
                "context_uri": pa.array([], pa.string()),
                "product_uri": pa.array([], pa.string()),
                "bbox": pa.array([], pa.list_(pa.float64())),
            },
            "empty",
        ),
        (b"PAR1 not really parquet", "manifest.parquet"),
        (None, "does not exist"),
    ],
    ids=["missing-column", "wrong-type", "empty", "unreadable", "absent"],
)
def test_bad_manifest_exits_2_and_writes_nothing(tmp_path, capsys, content, message):
    manifest = tmp_path / "manifest.parquet"
    if isinstance(content, dict):
        pq.write_table(pa.table(content), manifest)
    elif isinstance(content, bytes):
        manifest.write_bytes(content)
    output = tmp_path / "out"
    assert render(["--manifest", str(manifest), "--output", str(output), "--model", _tiny_model()]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not output.exists()


def test_most_rows_failing_exits_3_with_outputs(ray_address, tmp_path):
    path = make_catalog(str(tmp_path / "catalog"), n_pairs=2, bad_rows=False)
    rows = pq.read_table(path).to_pylist()
    rows += [dict(rows[0], pair_id=f"gone-{i}", context_uri=f"images/gone-{i}.jpg") for i in range(6)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    output = tmp_path / "out"
    assert (
        render(["--manifest", path, "--output", str(output), "--model", _tiny_model(), "--run-id", "most", *FAST]) == 3
    )
    table = read_manifest(str(output), "most")
    assert table.num_rows == 8 and table["status"].to_pylist().count("failed") == 6
    record = json.loads((output / "runs" / "most.json").read_text())
    assert record["exit_code"] == 3 and record["counts"]["failed"] == 6
    # a run id names one run: using it again is refused before any work
    assert (
        render(["--manifest", path, "--output", str(output), "--model", _tiny_model(), "--run-id", "most", *FAST]) == 2
    )


def _latest_rows(output) -> dict[str, dict]:
    latest: dict[str, dict] = {}
    for row in read_manifest(str(output)).to_pylist():
        if row["pair_id"] not in latest or row["finished_at"] > latest[row["pair_id"]]["finished_at"]:
            latest[row["pair_id"]] = row
    return latest


def test_interrupt_resume_lock_staleness_and_determinism(ray_address, tmp_path):
    manifest = make_catalog(str(tmp_path / "catalog"), n_pairs=40, bad_rows=False)
    output = tmp_path / "out"
    config = tmp_path / "render.yaml"
    # small parts so the killed run leaves some rows; a short lock lifetime for the takeover
    config.write_text("manifest_part_rows: 4\nlock_stale_s: 4\nbatch_size: 2\n")
    args = [
        "--manifest",
        manifest,
        "--output",
        str(output),
        "--model",
        _tiny_model(),
        "--config",
        str(config),
        "--address",
        ray_address,
        *"--steps 12 --image-format png --cpus-per-actor 0.5 --torch-threads 1".split(),  # batch size from the YAML
    ]
    first = subprocess_render([*args, "--run-id", "first"], tmp_path / "first.log")
    try:
        wait_for_parts(first, output, "first", 2, tmp_path / "first.log")
        # a second run on the same output is refused while the first holds the lock
        assert render([*args, "--run-id", "second"]) == 2
        assert not (output / "manifest" / "second").exists()
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver dies at once: no cleanup, the lock stays
        first.wait()
    done_first = {r["pair_id"]: r for r in read_manifest(str(output), "first").to_pylist() if r["status"] == "ok"}
    assert 0 < len(done_first) < 40
    mtimes = {p: os.stat(output / "images" / f"{p}.png").st_mtime_ns for p in done_first}
    time.sleep(4.5)  # the killed run's heartbeat goes stale

    assert render([*args, "--run-id", "resumed"]) == 0
    resumed = {r["pair_id"]: r for r in read_manifest(str(output), "resumed").to_pylist()}
    assert len(resumed) == 40 and {r["status"] for r in resumed.values()} == {"ok"}
    for pair_id in done_first:  # not rendered again: carried over, image untouched
        assert resumed[pair_id]["attempt"] == 0
        assert os.stat(output / "images" / f"{pair_id}.png").st_mtime_ns == mtimes[pair_id]
    assert sum(r["attempt"] == 1 for r in resumed.values()) >= 40 - len(done_first)
    latest = _latest_rows(output)
    assert len(latest) == 40 and all(r["status"] == "ok" for r in latest.values())
    assert sorted(os.listdir(output / "images")) == sorted(f"{p}.png" for p in latest)

    # A clean run of the same pairs: same bytes for the same batch composition, and the
    # resumed images within 1 uint8 level (their batches were composed differently).
    clean = tmp_path / "clean"
    clean_args = [a if a != str(output) else str(clean) for a in args]
    assert render([*clean_args, "--run-id", "c1"]) == 0
    c1_bytes = {p: (clean / "images" / f"{p}.png").read_bytes() for p in latest}
    assert render([*clean_args, "--run-id", "c2", "--force"]) == 0
    c2 = {r["pair_id"]: r for r in read_manifest(str(clean), "c2").to_pylist()}
    assert {r["attempt"] for r in c2.values()} == {1}  # --force rendered every pair again
    for pair_id in latest:
        again = (clean / "images" / f"{pair_id}.png").read_bytes()
        assert again == c1_bytes[pair_id], f"{pair_id}: not byte-identical across runs"
        resumed_img = np.asarray(Image.open(output / "images" / f"{pair_id}.png")).astype(int)
        clean_img = np.asarray(Image.open(io.BytesIO(again))).astype(int)
        assert np.abs(resumed_img - clean_img).max() <= 1, pair_id

    # A new setting or a new model makes every pair pending again.
    assert render([*clean_args, "--run-id", "c3"]) == 0
    assert {r["attempt"] for r in read_manifest(str(clean), "c3").to_pylist()} == {0}
    assert render([*[a if a != "12" else "13" for a in clean_args], "--run-id", "c4"]) == 0
    assert {r["attempt"] for r in read_manifest(str(clean), "c4").to_pylist()} == {1}
    other_model = tmp_path / "other-model"
    from jobs.make_model import main as make_model

    assert make_model(["--preset", "tiny", "--seed", "1", "--out", str(other_model)]) == 0
    model_args = [a if a != _tiny_model() else str(other_model) for a in clean_args]
    model_args = [a if a != "12" else "13" for a in model_args]
    assert render([*model_args, "--run-id", "c5"]) == 0
    c5 = read_manifest(str(clean), "c5").to_pylist()
    assert {r["attempt"] for r in c5} == {1} and len({r["model_digest"] for r in c5}) == 1
