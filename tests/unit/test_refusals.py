"""What every entrypoint refuses before any work (exit 2, one line, nothing written), and the
dry run's counts: no Ray is started for any of these."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.backfill import main as backfill
from jobs.metrics import main as metrics
from jobs.render import main as render
from pipeline.sample_catalog import make_catalog

BAD_NAMES = ["run1\n", "a/b", "../x", ".hidden", "caf\u00e9", "x" * 201, ""]


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> str:
    return make_catalog(str(tmp_path_factory.mktemp("catalog")), n_pairs=2, bad_rows=False, sizes=[(64, 48)])


def _one_line_refusal(capsys, code: int, expected: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and expected in err, err
    return err


@pytest.mark.parametrize("run_id", BAD_NAMES)
def test_render_refuses_a_bad_run_id(capsys, tmp_path, catalog, tiny_model_dir, run_id):
    output = tmp_path / "out"
    code = render(["--manifest", catalog, "--output", str(output), "--model", tiny_model_dir, "--run-id", run_id])
    _one_line_refusal(capsys, code, "--run-id")
    assert not output.exists()


@pytest.mark.parametrize("run_id", ["run1\n", "a/b"])
def test_backfill_refuses_a_bad_run_id(capsys, tmp_path, tiny_model_dir, run_id):
    root = tmp_path / "manifests"
    make_catalog(
        str(root / "dt=2026-11-01"), n_pairs=1, bad_rows=False, manifest_name="part-0.parquet", sizes=[(64, 48)]
    )
    output = tmp_path / "out"
    code = backfill(
        [
            "--manifest-root",
            str(root),
            "--start",
            "2026-11-01",
            "--end",
            "2026-11-01",
            "--output",
            str(output),
            "--model",
            tiny_model_dir,
            "--run-id",
            run_id,
        ]
    )
    _one_line_refusal(capsys, code, "--run-id")
    assert not output.exists()


@pytest.mark.parametrize("flag", ["--run-id", "--out-id"])
def test_metrics_refuses_a_bad_run_id(capsys, tmp_path, flag):
    args = ["--output", str(tmp_path / "out"), "--run-id", "fine"]
    code = metrics(
        [*args, flag, "run1\n"] if flag == "--out-id" else ["--output", str(tmp_path), "--run-id", "run1\n"]
    )
    _one_line_refusal(capsys, code, flag)


def test_metrics_refuses_the_same_run_twice(capsys, tmp_path):
    code = metrics(["--output", str(tmp_path), "--run-id", "r1", "--run-id", "r2", "--run-id", "r1"])
    _one_line_refusal(capsys, code, "r1 given more than once")


@pytest.mark.parametrize(
    "yaml_text, expected",
    [
        ("steps: twenty\n", "steps must be int, got str 'twenty'"),
        ("guidance_scale: [5]\n", "guidance_scale must be float"),
        ("force: 'yes'\n", "force must be bool"),
        ("actors: many\n", "actors must be MIN,MAX or N"),
        ("allow_root: 7\n", "allow_root must be list[str]"),
        ("- a list\n", "must be a mapping"),
        ("stepz: 4\n", "unknown option(s) ['stepz']"),
    ],
)
def test_a_config_value_of_the_wrong_type_is_one_line(capsys, tmp_path, catalog, tiny_model_dir, yaml_text, expected):
    config = tmp_path / "render.yaml"
    config.write_text(yaml_text)
    output = tmp_path / "out"
    code = render(["--manifest", catalog, "--output", str(output), "--model", tiny_model_dir, "--config", str(config)])
    _one_line_refusal(capsys, code, expected)
    assert not output.exists()


def test_an_output_that_cannot_be_written_is_refused(capsys, catalog, tiny_model_dir):
    # /sys refuses new entries to everyone, root included (tests run as root, so a chmod'ed
    # folder would not do): the probe in pipeline.run.check_writable sees what a read-only
    # mount or a folder of another user gives.
    code = render(["--manifest", catalog, "--output", "/sys/dtc-render-out", "--model", tiny_model_dir])
    _one_line_refusal(capsys, code, "--output /sys/dtc-render-out cannot be written")


def test_dry_run_counts_disallowed_uris_as_invalid(capsys, tmp_path, tiny_model_dir):
    root = tmp_path / "manifests"
    day = root / "dt=2026-11-01"
    path = make_catalog(str(day), n_pairs=3, bad_rows=False, manifest_name="part-0.parquet", sizes=[(64, 48)])
    outside = make_catalog(str(tmp_path / "elsewhere"), n_pairs=1, bad_rows=False, sizes=[(64, 48)])
    rows = pq.read_table(path).to_pylist()
    far = pq.read_table(outside).to_pylist()[0]
    rows[0]["context_uri"] = str(tmp_path / "elsewhere" / far["context_uri"])  # outside every allowed root
    rows[1]["product_uri"] = "http://169.254.169.254/latest/meta-data"  # http is off
    pq.write_table(pa.Table.from_pylist(rows), path)
    before = sorted(p.name for p in tmp_path.iterdir())
    args = [
        "--manifest-root",
        str(root),
        "--start",
        "2026-11-01",
        "--end",
        "2026-11-01",
        "--output",
        str(tmp_path / "out"),
        "--model",
        tiny_model_dir,
        "--dry-run",
    ]
    assert backfill(args) == 0
    totals = next(
        line.split()[1:] for line in capsys.readouterr().out.splitlines() if line.strip().startswith("total")
    )
    assert [int(v) for v in totals] == [1, 0, 0, 2, 0]  # render, reuse, carried, invalid, skipped
    assert backfill([*args, "--allow-root", str(tmp_path / "elsewhere")]) == 0
    totals = next(
        line.split()[1:] for line in capsys.readouterr().out.splitlines() if line.strip().startswith("total")
    )
    assert [int(v) for v in totals] == [2, 0, 0, 1, 0]
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # a dry run writes nothing, not even a probe


def test_whole_numbers_digest_like_floats():
    """`guidance_scale: 5` in a YAML and `--guidance-scale 5` (a float) are the same settings."""
    from pipeline.config import RenderConfig

    common = dict(manifest="m", output="o", model="x")
    as_int = RenderConfig(**common, guidance_scale=5, crop_margin=0).check()
    as_float = RenderConfig(**common, guidance_scale=5.0, crop_margin=0.0).check()
    assert as_int.settings_digest(128) == as_float.settings_digest(128) and isinstance(as_int.guidance_scale, float)


def _csv(path, bboxes: list[str]) -> str:
    lines = ["pair_id,context_uri,product_uri,bbox"]
    lines += [f'p{i},photo-{i}.png,product-{i}.png,"{bbox}"' for i, bbox in enumerate(bboxes)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize(
    ("bbox", "expected"),
    [
        ("10 20 30 40", "fail with bad_bbox (the first: bbox '10 20 30 40' is not a JSON array"),
        ("[0.1, 0.2, 0.5, 0.6]", "fail with region_too_small (the first: bbox [0.1, 0.2, 0.5, 0.6] covers 1x1"),
    ],
)
def test_a_manifest_whose_sampled_rows_all_fail_the_same_way_is_refused_before_ray(
    capsys, tmp_path, tiny_model_dir, bbox, expected
):
    manifest = _csv(tmp_path / "m.csv", [bbox] * 100)
    output = tmp_path / "out"
    code = render(["--manifest", manifest, "--output", str(output), "--model", tiny_model_dir])
    err = _one_line_refusal(capsys, code, expected)
    assert "all of its first 64 rows" in err and "nothing was rendered" in err
    if "0.1" in bbox:
        assert "looks normalised to [0, 1]" in err  # bbox is in pixels
    assert not output.exists()


def test_a_manifest_with_one_good_row_in_the_sample_is_not_refused(tmp_path):
    from pipeline.manifest import plan_manifest
    from pipeline.rows import sample_problem

    folder = tmp_path
    assert sample_problem(plan_manifest(_csv(folder / "m.csv", ["10 20 30 40"] * 9 + ["[0, 0, 40, 40]"]))) is None
    mixed = ["10 20 30 40", "[0.1, 0.2, 0.5, 0.6]"] * 5  # all bad, two ways: rows fail with their reasons
    assert sample_problem(plan_manifest(_csv(folder / "n.csv", mixed))) is None
