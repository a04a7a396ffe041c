"""Metrics inside a render run: shard files, summary, recomputation, merging, the QA report
(checked in headless Chromium), the plain "skipped" path without weights, the random-weights
warning through jobs.metrics, a run id given twice, and a run whose every pair failed."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import FAST, browser_view, metric_flags, read_manifest
from PIL import Image

from jobs.metrics import main as metrics_main
from jobs.render import main as render
from pipeline.metrics.feature_stats import FeatureStats, fid_from_stats
from pipeline.metrics.shards import FEATURE_DIM
from pipeline.sample_catalog import make_catalog


def _catalog(root) -> str:
    """Two manifest files in one folder: two shards (their stems)."""
    for k, name in enumerate(("north", "south")):
        options = {"manifest_name": f"{name}.parquet", "sizes": [(96, 80), (80, 96)], "pair_prefix": name}
        make_catalog(str(root), n_pairs=5, bad_rows=False, seed=k, **options)
    return str(root)


def _summary(output, run_id) -> dict:
    return json.loads((output / "metrics" / run_id / "summary.json").read_text())


def _render_args(manifest, output, model: str, *extra: str) -> list[str]:
    return ["--manifest", str(manifest), "--output", str(output), "--model", model, *extra, *FAST]


def _stats(tables, column: str) -> FeatureStats:
    """float64 statistics of one side's fp16 features, in one pass over every table."""
    rows = [np.frombuffer(b"".join(t[column].to_pylist()), np.float16).reshape(-1, FEATURE_DIM) for t in tables]
    return FeatureStats.from_features(np.concatenate(rows).astype(np.float64))


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


def _check_in_browser(chromium: str, page, shot) -> None:
    """Headless Chromium shows the page: every image loaded, a screenshot that is not blank."""
    dom, pixels = browser_view(chromium, page, shot)
    assert 'data-images-loaded="true"' in dom
    assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 500  # text, tables and photos


def test_metrics_run_writes_shards_summary_and_report(ray_address, tmp_path, tiny_model_dir, extractors, chromium):
    output = tmp_path / "out"
    args = _render_args(_catalog(tmp_path / "catalog"), output, tiny_model_dir, *metric_flags(extractors))
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
    rows = read_manifest(str(output), "m1").to_pylist()
    assert all(r["clip_score"] is not None for r in rows)
    assert summary["global"]["clip"]["n"] == 10
    assert summary["global"]["clip"]["mean"] == pytest.approx(np.mean([r["clip_score"] for r in rows]), rel=1e-12)

    # The global FID from merged shard statistics equals a one-pass FID over all features.
    tables = [pq.read_table(metrics_dir / f"shard={s}.features.parquet") for s in ("north", "south")]
    one_pass = fid_from_stats(_stats(tables, "feat_real"), _stats(tables, "feat_gen"))
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
    # jobs.metrics wrote this page (through write_report): the run's settings from its record, labelled sheets
    assert "<tr><td>steps</td><td>2</td></tr>" in page and "<tr><td>image_format</td><td>png</td></tr>" in page
    assert page.count("<tr><th>pair</th><th>context</th><th>product</th><th>output</th></tr>") == 2

    _check_in_browser(chromium, output / "report" / "m1" / "index.html", tmp_path / "report.png")

    # merging two runs shard by shard: the counts add up
    assert render([*args, "--run-id", "m2", "--force"]) == 0
    assert metrics_main(["--output", str(output), "--run-id", "m1", "--run-id", "m2", "--out-id", "both"]) == 0
    merged = _summary(output, "both")
    assert merged["global"]["n"] == 20 and {s["shard"]: s["n"] for s in merged["shards"]} == {"north": 10, "south": 10}
    assert merged["protocol"]["merged_runs"] == ["m1", "m2"]


def test_without_weights_metrics_are_skipped_plainly(ray_address, tmp_path, tiny_model_dir, capsys):
    manifest = make_catalog(str(tmp_path / "catalog"), n_pairs=2, bad_rows=False, sizes=[(64, 64)])
    output = tmp_path / "out"
    assert render(_render_args(manifest, output, tiny_model_dir, "--run-id", "plain")) == 0
    assert "metrics    SKIPPED: no --inception-weights / --clip-model given" in capsys.readouterr().out
    assert not (output / "metrics").exists()
    assert "id='metrics-skipped'" in (output / "report" / "plain" / "index.html").read_text()
    assert metrics_main(["--output", str(output), "--run-id", "plain"]) == 2


def test_demo_style_random_weights_say_so_in_the_report(demo_output):
    page = (demo_output / "report" / "demo" / "index.html").read_text()
    assert "id='random-weights'" in page and "RANDOM-WEIGHT EXTRACTORS" in page
    assert _summary(demo_output, "demo")["protocol"]["random_weights"] is True


def test_recomputed_and_merged_figures_keep_the_random_weights_warning(demo_output, capsys):
    output = demo_output
    assert metrics_main(["--output", str(output), "--run-id", "demo"]) == 0
    assert "[RANDOM-WEIGHT EXTRACTORS: meaningless]" in capsys.readouterr().out
    assert _summary(output, "demo")["protocol"]["random_weights"] is True
    assert "id='random-weights'" in (output / "report" / "demo" / "index.html").read_text()

    # a second run with the same stored files, under its own id (no second render)
    for folder in ("metrics", "manifest"):
        shutil.copytree(output / folder / "demo", output / folder / "demo-copy", dirs_exist_ok=True)
    shutil.copy(output / "runs" / "demo.json", output / "runs" / "demo-copy.json")
    merge = ["--output", str(output), "--run-id", "demo", "--run-id", "demo-copy", "--out-id", "demo-2x"]
    assert metrics_main(merge) == 0
    assert "[RANDOM-WEIGHT EXTRACTORS: meaningless]" in capsys.readouterr().out
    merged = _summary(output, "demo-2x")
    assert merged["protocol"]["random_weights"] is True and merged["protocol"]["merged_runs"] == ["demo", "demo-copy"]
    assert merged["global"]["n"] == 6
    page = (output / "report" / "demo-2x" / "index.html").read_text()
    assert "id='random-weights'" in page and "Merged from runs: demo, demo-copy" in page
    assert "<tr><td>total</td><td>6</td></tr>" in page  # both runs' manifest rows


def test_a_run_id_given_twice_is_refused(demo_output, capsys):
    assert metrics_main(["--output", str(demo_output), "--run-id", "demo", "--run-id", "demo"]) == 2
    assert "--run-id demo given more than once; name each run once" in capsys.readouterr().err
    assert not (demo_output / "metrics" / "merged-demo-2").exists()


def test_a_run_whose_every_pair_failed_exits_3_with_its_report(ray_address, tmp_path, tiny_model_dir, extractors):
    manifest = make_catalog(str(tmp_path / "catalog"), n_pairs=2, bad_rows=False, sizes=[(64, 64)])
    for product in (tmp_path / "catalog" / "images").glob("*-product.png"):
        product.unlink()
    output = tmp_path / "out"
    flags = ["--run-id", "allfail", *metric_flags(extractors)]
    assert render(_render_args(manifest, output, tiny_model_dir, *flags)) == 3  # EXIT_TOO_MANY_FAILED
    summary = _summary(output, "allfail")
    assert summary["global"]["n"] == 0 and [s["failed"] for s in summary["shards"]] == [2]
    page = (output / "report" / "allfail" / "index.html").read_text()
    assert "id='failed-pairs'" in page and "<td>pair-0000</td>" in page and "<td>pair-0001</td>" in page
    assert "image_missing" in page
