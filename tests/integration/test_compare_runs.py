"""jobs.compare on two real runs of the demo catalog (conftest's `demo_output`, a tiny DTC, and the
same catalog rendered by the tiny Paint-by-Example folder into another output): the summary's figures
against the runs' own and a direct computation from their manifests, the page in headless Chromium (every strip
image drawn), and the refusals that need stored runs (other extractors, no shared pair)."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from helpers import FAST, browser_view, metric_flags, read_manifest, render_args

from jobs.compare import main as compare_main
from jobs.render import main as render
from pipeline.metrics.compare import mean_difference, paired_interval, win_rate


@pytest.fixture(scope="module")
def pbe_output(demo_output, tmp_path_factory, pbe_tiny_dir, extractors):
    """The demo catalog rendered by the tiny Paint-by-Example folder into an output of its own,
    with the same extractors: the paper's Table 2 protocol in miniature (PBE vs a DTC)."""
    record = json.loads((demo_output / "runs" / "demo.json").read_text())
    output = tmp_path_factory.mktemp("pbe") / "out"
    config = output.parent / "render.yaml"
    config.write_text("metrics_random_weights: true\n")
    flags = ["--run-id", "pbe", *metric_flags(extractors), "--config", str(config)]
    assert render(render_args(record["manifest"]["uri"], output, pbe_tiny_dir, *flags, *FAST)) == 0
    return output


def test_pbe_and_dtc_side_by_side(demo_output, pbe_output, tmp_path, chromium):
    runs = [(pbe_output, "pbe"), (demo_output, "demo")]
    out = tmp_path / "cmp"
    argv = ["--run", f"{pbe_output}:pbe", "--run", f"{demo_output}:demo", "--out", str(out)]
    assert compare_main([*argv, "--resamples", "500"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["index.html", "summary.json"]  # nothing else written
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shared_pairs"] == 3 and summary["baseline"] == "pbe"
    assert [r["counts"]["shared"] for r in summary["runs"]] == [3, 3] and summary["protocol"]["random_weights"]
    digests = [r["model"]["digest"] for r in summary["runs"]]
    assert digests[0] != digests[1] and digests == [
        json.loads((o / "runs" / f"{r}.json").read_text())["model"]["digest"] for o, r in runs
    ]

    # the figures, directly from the stored files
    rows = [read_manifest(str(o), r).sort_by("pair_id") for o, r in runs]
    clip = [np.array(t["clip_score"].to_pylist()) for t in rows]
    figures = summary["global"]
    for k, (output, run_id) in enumerate(runs):
        # every pair of each run is shared: its FID and KID are the run's own (summary.json, made by the render)
        own = json.loads((output / "metrics" / run_id / "summary.json").read_text())["global"]
        assert figures["runs"][k]["fid"] == pytest.approx(own["fid"], rel=1e-9) and figures["runs"][k]["fid_n"] == 3
        assert figures["runs"][k]["kid_mean"] == pytest.approx(own["kid_mean"], rel=1e-9)
        assert figures["runs"][k]["clip_mean"] == pytest.approx(clip[k].mean(), rel=1e-12)
    delta = figures["deltas"][0]
    assert delta["clip"]["value"] == pytest.approx((clip[1] - clip[0]).mean(), rel=1e-9)
    direct_win = np.mean((clip[1] > clip[0]) + 0.5 * (clip[1] == clip[0]))
    assert delta["win_rate"]["value"] == pytest.approx(direct_win)
    expected = paired_interval(clip[0], clip[1], mean_difference, resamples=500, seed=0)
    assert delta["clip"] == pytest.approx(expected) and delta["clip"]["low"] <= delta["clip"]["high"]
    assert delta["win_rate"] == pytest.approx(paired_interval(clip[0], clip[1], win_rate, resamples=500, seed=0))
    # two models: identity_score is each one's own encoder, so no identity delta, and the page says why
    assert delta["identity"] is None and delta["identity_note"].startswith("n/a: pbe and demo are different models")
    assert [s["shard"] for s in summary["shards"]] == sorted({s for s in rows[0]["shard"].to_pylist()})
    assert sum(s["pairs"] for s in summary["shards"]) == 3

    # the page: every strip drawn (photo, product, each run's render) for the pairs summary.json lists
    page = (out / "index.html").read_text()
    shown = summary["shown"]
    strips = len(shown["better"]["demo"]) + len(shown["worse"]["demo"]) + len(shown["sample"])
    assert len(shown["sample"]) == 3 and strips >= 3
    assert len(re.findall(r"<tr class='pair' data-pair=", page)) == strips
    assert len(re.findall(r"<img src='data:image/jpeg;base64,", page)) == strips * 4
    assert "id='random-weights'" in page and "id='deltas'" in page and "id='settings'" in page
    assert "are different models" in page
    dom, pixels = browser_view(chromium, out / "index.html", tmp_path / "compare.png")
    assert 'data-images-loaded="true"' in dom
    assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 500


def _copy_run(output, run_id, to):
    """A run's stored files (record, manifest, metrics) copied under another output."""
    for folder in ("manifest", "metrics"):
        shutil.copytree(output / folder / run_id, to / folder / run_id)
    (to / "runs").mkdir(parents=True)
    shutil.copy(output / "runs" / f"{run_id}.json", to / "runs" / f"{run_id}.json")
    return to


def test_other_extractors_no_shared_pair_or_no_metrics_are_refused(demo_output, tmp_path, capsys):
    other = _copy_run(demo_output, "demo", tmp_path / "other")
    summary_file = other / "metrics" / "demo" / "summary.json"
    summary = json.loads(summary_file.read_text())
    summary["protocol"]["inception_sha256"] = "0" * 64
    summary_file.write_text(json.dumps(summary))
    out = tmp_path / "cmp"
    argv = ["--run", f"{demo_output}:demo", "--run", f"{other}:demo", "--out", str(out)]
    assert compare_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "were measured with different extractors (inception_sha256:" in err

    apart = _copy_run(demo_output, "demo", tmp_path / "apart")
    for part in (apart / "manifest" / "demo").glob("*.parquet"):
        table = pq.read_table(part)
        renamed = pc.binary_join_element_wise("other-", table["pair_id"], "")
        pq.write_table(table.set_column(table.schema.get_field_index("pair_id"), "pair_id", renamed), part)
    assert compare_main(["--run", f"{demo_output}:demo", "--run", f"{apart}:demo", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "share no pair rendered ok in every run" in err

    bare = _copy_run(demo_output, "demo", tmp_path / "bare")
    (bare / "metrics" / "demo" / "summary.json").unlink()  # as a run made without metric weights has none
    assert compare_main(["--run", f"{demo_output}:demo", "--run", f"{bare}:demo", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"run {bare}:demo has no metrics" in err

    unnamed = _copy_run(demo_output, "demo", tmp_path / "unnamed")
    summary_file = unnamed / "metrics" / "demo" / "summary.json"
    older = json.loads(summary_file.read_text())
    del older["protocol"]  # a summary that does not name its extractors
    summary_file.write_text(json.dumps(older))
    assert compare_main(["--run", f"{demo_output}:demo", "--run", f"{unnamed}:demo", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "names no extractors" in err
    assert not out.exists()


def test_one_model_compares_identity(demo_output, tmp_path):
    """The demo run against a copy of itself under another output: one model digest, so identity
    deltas are given; every delta is 0 and every pair a tie."""
    copy = _copy_run(demo_output, "demo", tmp_path / "copy")
    out = tmp_path / "cmp"
    assert compare_main(["--run", f"{demo_output}:demo", "--run", f"{copy}:demo", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["label"] for r in summary["runs"]] == [f"{demo_output}:demo", f"{copy}:demo"]  # ids alike: specs
    delta = summary["global"]["deltas"][0]
    assert delta["identity_note"] is None and delta["identity"] == {"n": 3, "value": 0.0, "low": 0.0, "high": 0.0}
    assert delta["clip"] == {"n": 3, "value": 0.0, "low": 0.0, "high": 0.0}
    assert delta["win_rate"] == {"n": 3, "value": 0.5, "low": 0.5, "high": 0.5}
    assert summary["shown"]["better"][f"{copy}:demo"] == summary["shown"]["worse"][f"{copy}:demo"] == []
