"""The resume decision on the cluster (issue #17), at 10k rows on the session's real local Ray:
half of the pairs done in a layout-1 index (one `state/done.parquet`, as outputs written before
the buckets have it), a pair_id repeated across manifest files, a done pair whose image was
deleted. The run reuses exactly the done pairs, renders the rest, fails every row of the
repeated pair_id, renders the pair whose image is gone (`--verify-images`), writes one output
row per input row, and folds everything into the bucketed index."""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from helpers import png, read_manifest, render_args
from PIL import Image

from jobs.render import build_parser, config_from_flags
from jobs.render import main as render
from pipeline.output.layout import Layout
from pipeline.output.state import STATE_BUCKETS, load_state
from pipeline.rows import stable_seed
from pipeline.run import check
from pipeline.sample_catalog import product, scene
from pipeline.schema import state_schema

ROWS, FILES = 10_000, 3
# one step, no CFG (guidance 1: a single UNet call per step): 5k renders in CI stay cheap
LEAN = "--steps 1 --guidance-scale 1 --batch-size 32 --image-format png --cpus-per-actor 0.5 --torch-threads 1"
LEAN = [*LEAN.split(), "--no-metrics"]


def _catalog(folder) -> tuple[str, list[str]]:
    """ROWS rows over FILES manifest files (one small photo and product shared by all); the
    last row of the last file repeats the first row's pair_id."""
    folder.mkdir()
    rng = np.random.default_rng(11)
    (folder / "context.png").write_bytes(png(scene(48, 40, rng)))
    (folder / "product.png").write_bytes(png(product(24, rng)))
    ids = [f"p{i:05d}" for i in range(ROWS - 1)] + ["p00000"]
    bounds = np.linspace(0, ROWS, FILES + 1).astype(int)
    for f in range(FILES):
        chunk = ids[bounds[f] : bounds[f + 1]]
        n = len(chunk)
        table = {"pair_id": chunk, "context_uri": ["context.png"] * n, "product_uri": ["product.png"] * n}
        pq.write_table(pa.table({**table, "bbox": [[6.0, 6.0, 30.0, 30.0]] * n}), folder / f"part-{f}.parquet")
    return str(folder), ids


def _done_half(output: str, argv: list[str], done: list[str]) -> None:
    """A layout-1 index with `done` as ok rows of this model and settings, and their images."""
    spec = check(config_from_flags(vars(build_parser().parse_args(argv))), probe_output=False)
    layout = Layout(output)
    buffer = io.BytesIO()
    Image.new("RGB", (48, 40), (90, 120, 150)).save(buffer, format="PNG")
    os.makedirs(layout.images_dir)
    for pair_id in done:
        with open(layout.image(pair_id, "png"), "wb") as f:
            f.write(buffer.getvalue())
    n = len(done)
    values = {
        "pair_id": done,
        "status": ["ok"] * n,
        "output_uri": [layout.image(p, "png") for p in done],
        "width": [48] * n,
        "height": [40] * n,
        "seed": [stable_seed(p) for p in done],
        "model_digest": [spec.model_digest] * n,
        "settings_digest": [spec.settings_digest] * n,
        "finished_at": ["2026-12-01T00:00:00.000+00:00"] * n,
        "run_id": ["earlier"] * n,
    }
    columns = {f.name: values.get(f.name, pa.nulls(n, f.type)) for f in state_schema()}
    os.makedirs(os.path.dirname(layout.state))
    pq.write_table(pa.table(columns, schema=state_schema()), layout.state)


def test_ten_thousand_rows_half_done_reuse_exactly_the_done_ones(ray_address, tmp_path, tiny_model_dir):
    catalog, ids = _catalog(tmp_path / "catalog")
    output = str(tmp_path / "out")
    cluster_plan = tmp_path / "render.yaml"
    cluster_plan.write_text("driver_plan_rows: 0\n")  # decided on the cluster, as a large manifest is
    argv = render_args(
        catalog, output, tiny_model_dir, *LEAN, "--verify-images", "--run-id", "big", "--config", str(cluster_plan)
    )
    done = ids[1 : ROWS - 1 : 2]  # p00001, p00003, ...: half the pairs, not the repeated p00000
    _done_half(output, argv, done)
    gone = done[7]
    os.unlink(Layout(output).image(gone, "png"))

    assert render(argv) == 0

    rows = read_manifest(output, "big")
    assert rows.num_rows == ROWS  # one output row per input row
    outcome: dict[str, set] = {"reused": set(), "rendered": set(), "failed": set()}
    for pair_id, status, attempt in zip(*(rows[c].to_pylist() for c in ("pair_id", "status", "attempt"))):
        kind = "failed" if status != "ok" else "reused" if attempt == 0 else "rendered"
        outcome[kind].add(pair_id)
    assert outcome["reused"] == set(done) - {gone}  # exactly the done pairs whose image exists
    assert outcome["rendered"] == (set(ids) - set(done) - {"p00000"}) | {gone}
    assert outcome["failed"] == {"p00000"}
    repeated = rows.filter(pa.compute.equal(rows["pair_id"], "p00000"))
    assert repeated["error_code"].to_pylist() == ["duplicate_pair_id"] * 2  # both rows, in two files

    layout = Layout(output)
    state = load_state(layout)
    assert state.num_rows == ROWS - 2 and not os.path.exists(layout.state)  # folded into buckets
    assert 0 < len(os.listdir(layout.state_buckets_dir)) <= STATE_BUCKETS
    # every pair's row is this run's: the rendered ones, and the reused ones, whose layout-1 rows
    # had no inputs_digest (the reuse records this run's inputs: resume.StateIndex.same_inputs)
    assert set(state.filter(pa.compute.equal(state["run_id"], "big"))["pair_id"].to_pylist()) == set(ids) - {"p00000"}
    assert state["inputs_digest"].null_count == 0
