"""Metrics inside a render run: shard files, summary, recomputation, merging, the QA report
(checked in headless Chromium), and the plain "skipped" path without weights."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.metrics import main as metrics_main
from jobs.render import main as render
from pipeline.metrics.stats import FeatureStats, fid_from_stats
from pipeline.sample_catalog import make_catalog
from pipeline.metrics.shards import FEATURE_DIM

FAST = ["--steps", "2", "--batch-size", "4", "--image-format", "png", "--cpus-per-actor", "0.5", "--torch-threads", "1"]


@pytest.fixture(scope="module")
def extractors(tmp_path_factory):
    from pipeline.metrics.extract import save_random_extractors

    return save_random_extractors(str(tmp_path_factory.mktemp("extractors")))


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's chromium; installed here when missing (the tests run as root, as CI does)."""
    path = shutil.which("chromium")
    if path is None:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"], check=True, env=env,
                       capture_output=True, timeout=900)
        path = shutil.which("chromium")
    assert path, "chromium could not be installed"
    return path


def _catalog(root) -> str:
    """Two manifest files in one folder: two shards (their stems)."""
    for k, name in enumerate(("north", "south")):
        make_catalog(str(root), n_pairs=5, bad_rows=False, seed=k, manifest_name=f"{name}.parquet", sizes=[(96, 80), (80, 96)],
                     pair_prefix=name)
    return str(root)


def _summary(output, run_id) -> dict:
    return json.loads((output / "metrics" / run_id / "summary.json").read_text())


def _manifest(output, run_id) -> list[dict]:
    return pa.concat_tables(pq.read_table(p) for p in sorted((output / "manifest" / run_id).glob("part-*.parquet"))).to_pylist()


def _close(a, b, rel=1e-9):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            if k != "created_at":
                _close(a[k], b[k], rel)
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _close(x, y, rel)
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=rel, abs=1e-12)
    else:
        assert a == b


def test_run_with_metrics_writes_shards_summary_and_report(ray_address, tmp_path, tiny_model_dir, extractors, chromium):
    inception, clip = extractors
    root = _catalog(tmp_path / "catalog")
    output = tmp_path / "out"
    args = ["--manifest", root, "--output", str(output), "--model", tiny_model_dir, "--inception-weights", inception,
            "--clip-model", clip, *FAST]
    assert render([*args, "--run-id", "m1"]) == 0
    metrics_dir = output / "metrics" / "m1"
    for shard in ("north", "south"):
        for suffix in (".json", ".real.npz", ".gen.npz", ".features.parquet"):
            assert (metrics_dir / f"shard={shard}{suffix}").exists(), suffix
        shard_file = json.loads((metrics_dir / f"shard={shard}.json").read_text())
        assert shard_file["n"] == 5 and shard_file["fid_label"] == "FID@5" and shard_file["fid"] > 0
        assert shard_file["protocol"]["inception_sha256"] and shard_file["protocol"]["random_weights"] is False
        features = pq.read_table(metrics_dir / f"shard={shard}.features.parquet")
        assert features.num_rows == 5 and len(features["feat_gen"][0].as_py()) == FEATURE_DIM * 2  # fp16
    summary = _summary(output, "m1")
    rows = _manifest(output, "m1")
    assert all(r["clip_score"] is not None for r in rows)
    assert summary["global"]["clip"]["n"] == 10
    assert summary["global"]["clip"]["mean"] == pytest.approx(np.mean([r["clip_score"] for r in rows]), rel=1e-12)

    # The global FID from merged shard statistics equals a one-pass FID over all features.
    tables = [pq.read_table(metrics_dir / f"shard={s}.features.parquet") for s in ("north", "south")]
    real = np.concatenate([np.frombuffer(b"".join(t["feat_real"].to_pylist()), np.float16).reshape(-1, FEATURE_DIM) for t in tables])
    gen = np.concatenate([np.frombuffer(b"".join(t["feat_gen"].to_pylist()), np.float16).reshape(-1, FEATURE_DIM) for t in tables])
    one_pass = fid_from_stats(FeatureStats.from_features(real.astype(np.float64)), FeatureStats.from_features(gen.astype(np.float64)))
    assert summary["global"]["fid"] == pytest.approx(one_pass, rel=1e-9)

    # summary.json equals a recomputation from the stored statistics alone
    before = summary
    assert metrics_main(["--output", str(output), "--run-id", "m1"]) == 0
    _close(before, _summary(output, "m1"))

    # the report: one table row per shard, counts equal to the manifest's, images that decode
    page = (output / "report" / "m1" / "index.html").read_text()
    shard_rows = re.findall(r"<tr class='shard'><td>([^<]+)</td><td>(\d+)</td><td>(\d+)</td>", page)
    assert sorted(shard_rows) == [("north", "5", "0"), ("south", "5", "0")]
    images = re.findall(r"src='data:image/jpeg;base64,([^']+)'", page)
    assert len(images) >= 3 * 8
    for data in images:
        Image.open(io.BytesIO(base64.b64decode(data))).verify()
    assert "RANDOM-WEIGHT" not in page

    # ... and a browser shows it: images loaded, a screenshot that is not blank
    profile = tempfile.mkdtemp(prefix="chromium-")
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}"]
    url = (output / "report" / "m1" / "index.html").as_uri()
    dom = subprocess.run([*flags, "--virtual-time-budget=5000", "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert 'data-images-loaded="true"' in dom.stdout, dom.stderr[-1000:]
    shot = tmp_path / "report.png"
    subprocess.run([*flags, "--window-size=1000,1400", f"--screenshot={shot}", url], capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(float)
    assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 500  # text, tables and photos
    shutil.rmtree(profile, ignore_errors=True)

    # merging two runs shard by shard: the counts add up
    assert render([*args, "--run-id", "m2", "--force"]) == 0
    assert metrics_main(["--output", str(output), "--run-id", "m1", "--run-id", "m2", "--out-id", "both"]) == 0
    merged = _summary(output, "both")
    assert merged["global"]["n"] == 20 and {s["shard"]: s["n"] for s in merged["shards"]} == {"north": 10, "south": 10}
    assert merged["protocol"]["merged_runs"] == ["m1", "m2"]


def test_without_weights_metrics_are_skipped_plainly(ray_address, tmp_path, tiny_model_dir, capsys):
    manifest = make_catalog(str(tmp_path / "catalog"), n_pairs=2, bad_rows=False, sizes=[(64, 64)])
    output = tmp_path / "out"
    assert render(["--manifest", manifest, "--output", str(output), "--model", tiny_model_dir, "--run-id", "plain", *FAST]) == 0
    assert "metrics    SKIPPED: no --inception-weights / --clip-model given" in capsys.readouterr().out
    assert not (output / "metrics").exists()
    assert "id='metrics-skipped'" in (output / "report" / "plain" / "index.html").read_text()
    assert metrics_main(["--output", str(output), "--run-id", "plain"]) == 2


def test_demo_style_random_weights_say_so_in_the_report(ray_address, tmp_path, tiny_model_dir, extractors):
    inception, clip = extractors
    manifest = make_catalog(str(tmp_path / "catalog"), n_pairs=3, bad_rows=False, sizes=[(64, 64)])
    config = tmp_path / "render.yaml"
    config.write_text("metrics_random_weights: true\n")
    output = tmp_path / "out"
    assert render(["--manifest", manifest, "--output", str(output), "--model", tiny_model_dir, "--run-id", "demo",
                   "--inception-weights", inception, "--clip-model", clip, "--config", str(config), *FAST]) == 0
    page = (output / "report" / "demo" / "index.html").read_text()
    assert "id='random-weights'" in page and "RANDOM-WEIGHT EXTRACTORS" in page
    assert _summary(output, "demo")["protocol"]["random_weights"] is True
