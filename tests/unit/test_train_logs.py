"""Rank 0's training logs without Ray: TensorBoard event files read back with TensorBoard's own
reader (tags, steps, a resumed attempt's points replacing the dead one's past the restart step),
the val pairs picked from a manifest, and the training page built from what the workers write."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
from helpers import png
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipeline import storage
from pipeline.manifest import plan_manifest
from pipeline.toy.catalog import make_training_catalog
from pipeline.train.logs import TrainLog, log_uri, tensorboard_uri
from pipeline.train.training_page import render_training_page
from pipeline.train.val_renders import pick_val_pairs, render_uri, val_renders_uri


def _train_line(step: int, loss: float) -> dict:
    return {
        "step": step,
        "epoch": step / 4,
        "loss": loss,
        "mse": loss / 2,
        "pixel": None,  # a step without the decode: no point
        "perceptual": 0.5 if step % 3 == 0 else None,
        "grad_norm": 0.25,
        "data_s": 0.1,
        "compute_s": 0.3,
        "decode_s": 0.0,
        "samples_per_s": 10.0,
        "lr": 1e-5,
        "time": 1_700_000_000.0 + step,
    }


def _attempt(output: str, start: int, end: int, offset: float, checkpoint_every: int = 2) -> None:
    """What rank 0 logs from `start` to `end` (a line per step, the validation loss at each
    checkpoint, a flush there), then closes: the file stays as the attempt left it."""
    log = TrainLog(output, "r", start, enabled=True)
    if start == 0:
        log.add({"step": 0, "val_loss": offset + 0.5, "time": 1_700_000_000.0})
    for step in range(start + 1, end + 1):
        log.add(_train_line(step, offset + step))
        if step % checkpoint_every == 0:
            log.add({"step": step, "val_loss": offset + step + 0.5, "best": True, "time": 1_700_000_000.0 + step})
            log.flush()
    log.close()


def _scalars(output: str) -> EventAccumulator:
    events = EventAccumulator(tensorboard_uri(output, "r"))
    events.Reload()
    return events


def test_tensorboard_events_hold_every_tag_at_its_steps(tmp_path):
    output = str(tmp_path)
    _attempt(output, 0, 4, offset=0.0)
    events = _scalars(output)
    tags = set(events.Tags()["scalars"])
    expected = {"train/loss", "train/mse", "train/perceptual", "train/grad_norm", "train/lr", "train/epoch"}
    expected |= {"perf/samples_per_s", "perf/data_wait_s", "perf/compute_s", "perf/step_s", "perf/data_wait_fraction"}
    assert expected | {"val/loss", "perf/decode_s"} == tags  # no pixel: never logged
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.value for e in events.Scalars("train/loss")] == [1.0, 2.0, 3.0, 4.0]
    assert [e.step for e in events.Scalars("train/perceptual")] == [3]
    assert [e.step for e in events.Scalars("val/loss")] == [0, 2, 4]
    assert [e.wall_time for e in events.Scalars("train/loss")] == [1_700_000_000.0 + s for s in (1, 2, 3, 4)]
    assert events.Scalars("perf/data_wait_fraction")[0].value == np.float32(0.25)


def test_a_resumed_attempt_replaces_the_points_past_its_restart_step(tmp_path):
    """The first attempt logged to step 7 and died; the run resumed from its step-4 checkpoint.
    The reader shows each step once, in order: <= 4 from the first attempt, the rest from the second."""
    output = str(tmp_path)
    _attempt(output, 0, 7, offset=0.0)
    _attempt(output, 4, 8, offset=100.0)
    assert len(storage.list_files(tensorboard_uri(output, "r"))) == 2  # a file per attempt
    events = _scalars(output)
    for tag in ("train/loss", "train/grad_norm", "perf/step_s"):
        assert [e.step for e in events.Scalars(tag)] == list(range(1, 9)), tag
    assert [e.value for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 105, 106, 107, 108]
    assert [(e.step, e.value) for e in events.Scalars("val/loss")] == [
        (0, 0.5), (2, 2.5), (4, 4.5), (6, 106.5), (8, 108.5)
    ]  # fmt: skip
    lines = [json.loads(line) for line in storage.read_bytes(log_uri(output, "r")).decode().splitlines()]
    assert [line["step"] for line in lines if "loss" in line] == list(range(1, 9))  # train.jsonl cut back too


def test_a_rerun_from_step_zero_replaces_the_first_attempts_points(tmp_path):
    output = str(tmp_path)
    _attempt(output, 0, 3, offset=0.0, checkpoint_every=10)  # died before its first checkpoint
    _attempt(output, 0, 2, offset=50.0)
    events = _scalars(output)
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 51.0), (2, 52.0)]
    assert [e.step for e in events.Scalars("val/loss")] == [0, 2]


def test_val_pairs_are_the_first_good_val_rows_in_manifest_order(tmp_path):
    manifest = make_training_catalog(str(tmp_path / "catalog"), n_pairs=8, val_fraction=0.5, sizes=[(48, 40)])
    plan = plan_manifest(manifest)
    picked = pick_val_pairs(plan, 3)
    assert [p["pair_id"] for p in picked] == ["pair-0004", "pair-0005", "pair-0006"]
    assert pick_val_pairs(plan, 3) == picked  # the same in every attempt
    assert set(picked[0]) == {"pair_id", "context_uri", "product_uri", "mask_uri", "bbox", "seed"}
    assert storage.exists(picked[0]["context_uri"])  # resolved against the manifest's folder
    assert len(pick_val_pairs(plan, 100)) == 4 and pick_val_pairs(plan, 0) == ()


def test_the_training_page_shows_curves_and_the_committed_checkpoints_renders(tmp_path):
    """Renders at steps 0, 2 and 4 (train.jsonl's checkpoints) are columns; step 6's, written by an
    attempt that died before its checkpoint was committed, is not. A pair that could not be
    prepared says why."""
    output = str(tmp_path / "out")
    manifest = make_training_catalog(str(tmp_path / "catalog"), n_pairs=4, val_fraction=0.5, sizes=[(48, 40)])
    good = pick_val_pairs(plan_manifest(manifest), 1)[0]
    bad = {**good, "pair_id": "pair-broken", "error": "image_missing: no such file"}
    pairs = [{**good, "error": None}, bad]
    storage.write_bytes(
        storage.join(val_renders_uri(output, "r"), "pairs.json"), json.dumps({"steps": 4, "pairs": pairs}).encode()
    )
    rng = np.random.default_rng(0)
    for step in (0, 2, 4, 6):
        noise = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
        storage.write_bytes(render_uri(output, "r", step, good["pair_id"]), png(noise))
    lines = [{"step": 0, "val_loss": 0.9}] + [_train_line(s, 1.0 / s) for s in (1, 2, 3, 4)]
    lines += [{"step": 2, "val_loss": 0.7}, {"step": 4, "val_loss": 0.6}]
    storage.write_bytes(log_uri(output, "r"), "\n".join(map(json.dumps, lines)).encode())

    page = render_training_page(output, "r", max_pixels=10**7)
    curves = re.search(r'<svg id="loss-curves".*?</svg>', page).group(0)
    assert curves.count("<polyline") == 2 and curves.count("<circle") == 3  # train line; val line, a dot each
    grid = re.search(r"<table class='sheet grid' id='val-grid'>.*?</table>", page, re.S).group(0)
    assert re.findall(r"<th>step (\d+)</th>", grid) == ["0", "2", "4"]
    shown = re.findall(r"src='data:image/jpeg;base64,([^']+)'", grid)
    assert len(shown) == 2 + 3  # photo, product, three checkpoints
    for data in shown:
        assert Image.open(io.BytesIO(base64.b64decode(data))).size[1] == 160
    assert "not prepared: image_missing: no such file" in grid
    assert "0.90000 -&gt; 0.60000" in page and f"tensorboard --logdir {tensorboard_uri(output, 'r')}" in page


def test_val_renders_are_the_render_paths_and_leave_trainings_random_numbers_alone(tmp_path, tiny_model_dir):
    """Rank 0's renders on the training pipeline: a PNG per pair of the photo's size, the same
    bytes at the same weights (manifest seeds), torch's global RNG where it was; an input gone
    since the pick is listed with its reason; a failing render is a line, not an exception."""
    import contextlib

    import torch

    from pipeline.fetch import InputPolicy
    from pipeline.model.loading import load_pipeline
    from pipeline.train.config import TrainConfig
    from pipeline.train.loop import LoopSpec
    from pipeline.train.val_renders import ValRenders

    catalog = tmp_path / "catalog"
    manifest = make_training_catalog(str(catalog), n_pairs=4, val_fraction=0.5, sizes=[(48, 40)])
    picked = pick_val_pairs(plan_manifest(manifest), 2)
    gone = {**picked[1], "context_uri": str(catalog / "missing.png")}
    output = str(tmp_path / "out")
    pipe = load_pipeline(tiny_model_dir, dtype=torch.float32)
    cfg = TrainConfig(manifest=manifest, init_model=tiny_model_dir, output=output, val_render_steps=2)
    spec = LoopSpec(
        cfg, "r", output, "unused-store", 4, pipe.config.resolution, pipe.config.product_size, "d", "i",
        val_pairs=(picked[0], gone), input_policy=InputPolicy(str(catalog)),
    )  # fmt: skip
    renders = ValRenders(spec, pipe, "cpu")
    listed = json.loads(storage.read_bytes(storage.join(val_renders_uri(output, "r"), "pairs.json")))["pairs"]
    assert [p["error"] is None for p in listed] == [True, False] and "missing.png" in listed[1]["error"]

    torch.manual_seed(7)
    assert renders.render(2, contextlib.nullcontext) is None
    after = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(torch.rand(3), after)  # the renders drew nothing from the global generator
    first = storage.read_bytes(render_uri(output, "r", 2, picked[0]["pair_id"]))
    assert Image.open(io.BytesIO(first)).size == (48, 40)  # pasted back into the whole photo
    assert renders.render(4, contextlib.nullcontext) is None
    assert storage.read_bytes(render_uri(output, "r", 4, picked[0]["pair_id"])) == first  # same weights, same seed
    assert not storage.exists(render_uri(output, "r", 2, gone["pair_id"]))

    def broken():
        raise RuntimeError("out of memory")

    problem = renders.render(6, broken)
    assert "step 6 failed (RuntimeError: out of memory)" in problem
