"""The training job end to end: real local Ray (Ray Data + Ray Train V2), the moto S3 endpoint, the
tiny model, a random-weight VGG19 (plumbing only: the perceptual term's path, not its meaning).

One reference run trains on S3 (manifest, output, its prepared-sample store and VGG weights
there), 1 worker x batch 4; the other runs train the same recipe on a local copy of the same
catalog and are compared with it:

- 2 workers x batch 2: the same weights up to float reduction order (tolerance below);
- 2 workers, one killed at step 3 (FailureConfig restarts the group from the step-2 checkpoint):
  exactly the uninterrupted 2-worker weights;
- a driver SIGKILLed after the first checkpoint, then the same command: exactly the reference's.

Every worker reads only its own samples from the store (`reader.StoreReader`), prefetching the
next steps' batches in threads: the exactness below holds on that path.

Tolerance of the data-parallel comparison: DDP averages two per-worker mean gradients where one
worker takes the mean over the whole batch; the two differ in the last bits (float addition is not
associative). The logged losses then agree to ~1e-7, but AdamW divides each gradient element by
its own running RMS, so an element whose gradient is at float-noise level (~1e-9, against eps 1e-8)
moves by a fraction of the learning rate in a direction the noise picks. So the check is per tensor
on the training update: |w_2 - w_1| <= 1e-3 |w_1 - w_init| (measured: 2e-4 at worst, 4e-5
over all weights), and the losses to rtol 1e-5. With the same worker count the weights are
bit-identical, and the resume checks say so.
"""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import ROOT, browser_view, read_manifest
from PIL import Image
from safetensors.torch import load
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from jobs.render import main as render
from jobs.train import main as train
from pipeline import compose, images, storage
from pipeline.config import RENDER_DEFAULTS
from pipeline.fetch import InputPolicy
from pipeline.model.checkpoint import model_digest
from pipeline.model.renderer import Renderer
from pipeline.stages.prepare_stage import PrepareConfig, prepare_pair
from pipeline.toy.catalog import make_training_catalog
from pipeline.train.step import WEIGHTS_FILE
from pipeline.train.vgg import save_random_vgg19

RECIPE = """\
steps: 4
batch_size: 4
learning_rate: 0.001
pixel_weight: 0.1
perceptual_weight: 0.001
perceptual_every: 3
cfg_drop: 0.5
checkpoint_every: 2
keep_checkpoints: 1
log_every: 1
cpus_per_worker: 0.5
data_cpus: 0.25
torch_threads: 1
max_failures: 1
lock_stale_s: 3
"""


def _upload(folder: str, prefix: str) -> None:
    for path in glob.glob(os.path.join(folder, "**", "*"), recursive=True):
        if os.path.isfile(path):
            storage.write_bytes(storage.join(prefix, os.path.relpath(path, folder)), open(path, "rb").read())


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("train")
    manifest = make_training_catalog(str(folder / "catalog"), n_pairs=8, val_fraction=0.25, bad_rows=True)
    vgg = save_random_vgg19(str(folder / "random-vgg19.pth"))  # plumbing only
    (folder / "recipe.yaml").write_text(RECIPE)
    return {"folder": folder, "manifest": manifest, "vgg": vgg, "recipe": str(folder / "recipe.yaml")}


def _final_weights(output: str, run_id: str = "train") -> dict[str, torch.Tensor]:
    """The trainable weights of the step-4 (last) checkpoint (local or S3)."""
    return load(storage.read_bytes(storage.join(output, "checkpoints", run_id, "checkpoint_00000004", WEIGHTS_FILE)))


@pytest.fixture(scope="module")
def reference(ray_address, s3_endpoint, catalog, tiny_model_dir) -> dict:
    """The reference run, all on S3: 1 worker x batch 4, 4 steps, checkpoints at 2 and 4."""
    bucket = f"t-train-reference-{os.getpid() % 1000}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    _upload(str(catalog["folder"] / "catalog"), f"s3://{bucket}/catalog")
    storage.write_bytes(f"s3://{bucket}/vgg/random-vgg19.pth", open(catalog["vgg"], "rb").read())
    output = f"s3://{bucket}/train"
    args = [
        "--manifest",
        f"s3://{bucket}/catalog/manifest.parquet",
        "--init-model",
        tiny_model_dir,
        "--output",
        output,
        "--config",
        catalog["recipe"],
        "--vgg-weights",
        f"s3://{bucket}/vgg/random-vgg19.pth",
    ]
    assert train(args) == 0
    return {"bucket": bucket, "output": output, "weights": _final_weights(output)}


def _local_run(catalog, tmp_path, *extra: str, config: str | None = None) -> tuple[int, str]:
    output = str(tmp_path / "out")
    args = [
        "--manifest",
        catalog["manifest"],
        "--init-model",
        _tiny(),
        "--output",
        output,
        "--config",
        config or catalog["recipe"],
        "--vgg-weights",
        catalog["vgg"],
        *extra,
    ]
    return train(args), output


_TINY: list[str] = []


def _tiny() -> str:
    return _TINY[0]


@pytest.fixture(autouse=True)
def _tiny_path(tiny_model_dir):
    _TINY[:] = [tiny_model_dir]


def _assert_exact(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _assert_close_updates(a: dict, b: dict, init: dict) -> None:
    """Each tensor's training update (weights - init) equal within 1e-3 of its own size."""
    assert a.keys() == b.keys()
    for key in a:
        update = (a[key] - init[key]).norm()
        assert (a[key] - b[key]).norm() <= 1e-3 * update + 1e-12, (key, float((a[key] - b[key]).norm()), float(update))


def _init_weights() -> dict[str, torch.Tensor]:
    from pipeline.model.loading import load_pipeline
    from pipeline.train.loss import TRAINABLE

    pipe = load_pipeline(_tiny())
    return {f"{n}.{k}": v for n in TRAINABLE for k, v in getattr(pipe, n).state_dict().items()}


def _losses(output: str) -> list[tuple[int, float]]:
    text = storage.read_bytes(storage.join(output, "metrics", "train", "train.jsonl")).decode()
    return [(r["step"], r.get("loss", r.get("val_loss"))) for r in map(json.loads, text.splitlines())]


@pytest.fixture(scope="module")
def two_workers(reference, catalog, tmp_path_factory) -> str:
    """The same recipe on 2 workers x batch 2 (local output)."""
    code, output = _local_run(catalog, tmp_path_factory.mktemp("two-workers"), "--workers", "2")
    assert code == 0
    return output


def test_reference_run_records_skips_and_exports(reference, tiny_model_dir):
    output = reference["output"]
    record = json.loads(storage.read_bytes(f"{output}/runs/train.json"))
    assert record["exit_code"] == 0 and record["status"] == "finished"
    assert record["rows"]["usable"] == {"train": 6, "val": 2}
    assert record["rows"]["skipped"]["train"] == {"image_missing": 1, "bad_bbox": 1}  # skipped, counted, no crash
    assert record["steps"]["end"] == 4 and record["steps"]["run_this_attempt"] == 4
    losses = record["losses"]
    assert all(np.isfinite(losses[k]) for k in ("initial_val_loss", "val_loss", "best_val_loss"))
    assert "plumbing only" in record["vgg"]["note"]  # a random VGG says so
    lines = [
        json.loads(line) for line in storage.read_bytes(f"{output}/metrics/train/train.jsonl").decode().splitlines()
    ]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) for r in lines if "loss" in r)
    # the data wait (what prefetch did not hide) beside compute, and the batch's build time
    assert all(r["data_s"] >= 0 and r["load_s"] > 0 and r["compute_s"] > 0 for r in lines if "loss" in r)
    assert [r["perceptual"] is not None for r in lines if "loss" in r] == [True, False, False, True]
    kept = {p.split("/")[0] for p, _, _ in storage.list_files(f"{output}/checkpoints/train") if "/" in p}
    assert kept == {"checkpoint_00000004"}  # the last one (keep_checkpoints 1); the best is kept apart
    best = json.loads(storage.read_bytes(f"{output}/best/train/state.json"))
    assert best["step"] == losses["best_step"] and best["best_val_loss"] == losses["best_val_loss"]
    assert record["model"]["digest"] == model_digest(f"{output}/model") != model_digest(tiny_model_dir)


def _events(output: str, tmp_path) -> EventAccumulator:
    """The run's TensorBoard files (a local copy when on S3), through TensorBoard's own reader."""
    folder = storage.join(output, "metrics", "train", "tensorboard")
    local = tmp_path / "tensorboard"
    local.mkdir()
    for rel, _, _ in storage.list_files(folder):
        (local / rel).write_bytes(storage.read_bytes(storage.join(folder, rel)))
    events = EventAccumulator(str(local))
    events.Reload()
    return events


def _scalar_steps(events: EventAccumulator, tag: str) -> list[int]:
    return [e.step for e in events.Scalars(tag)]


def _pixels(uri: str) -> np.ndarray:
    return images.decode_image(storage.read_bytes(uri), max_pixels=10**8).astype(int)


def test_reference_run_logs_tensorboard_and_a_training_page(reference, tmp_path, chromium):
    """On S3: event files with every tag at its steps, the validation renders at step 0 and each
    checkpoint equal to the render path's own render of those weights, and the training page, seen
    in headless Chromium: its grid's images drawn (photos, not blank cells)."""
    output = reference["output"]
    record = json.loads(storage.read_bytes(f"{output}/runs/train.json"))
    assert record["tensorboard"] == f"{output}/metrics/train/tensorboard"
    assert record["training_page"] == f"{output}/metrics/train/training.html"

    events = _events(output, tmp_path)
    tags = {"train/loss", "train/mse", "train/perceptual", "train/lr", "train/grad_norm", "val/loss"}
    assert tags | {"perf/samples_per_s", "perf/data_wait_s", "perf/step_s"} <= set(events.Tags()["scalars"])
    assert _scalar_steps(events, "train/loss") == [1, 2, 3, 4]
    assert _scalar_steps(events, "train/perceptual") == [1, 4]  # perceptual_every 3: 0-based steps 0 and 3
    val = [(e.step, e.value) for e in events.Scalars("val/loss")]
    assert [s for s, _ in val] == [0, 2, 4]
    assert val[-1][1] == pytest.approx(record["losses"]["val_loss"], rel=1e-6)  # float32 in the file

    # the renders: the 2 val pairs at steps 0, 2, 4; the exported (best) step's through the render path
    renders = f"{output}/metrics/train/val_renders"
    pairs = json.loads(storage.read_bytes(f"{renders}/pairs.json"))["pairs"]
    assert len(pairs) == 2 and not any(p["error"] for p in pairs)
    pngs = sorted(p for p, _, _ in storage.list_files(renders) if p.endswith(".png"))
    assert pngs == [f"step_{s:08d}/{p['pair_id']}.png" for s in (0, 2, 4) for p in pairs]
    best = record["losses"]["best_step"]
    renderer = Renderer.from_pretrained(f"{output}/model", device="cpu", torch_threads=1)
    policy = InputPolicy(f"s3://{reference['bucket']}/catalog")
    config = PrepareConfig(policy, renderer.resolution, renderer.product_size)
    for p in pairs:
        pair = prepare_pair(p["context_uri"], p["product_uri"], p["mask_uri"], p["bbox"], config)
        m = {k: v[None] for k, v in pair.model.items() if k != "crop_box"}
        (window,) = renderer.render(
            m["context"], m["hole"], m["product"], m["product_alpha"], np.array([p["seed"]]), steps=8,
            guidance_scale=RENDER_DEFAULTS.guidance_scale, hint=m["hint"], hint_mask=m["hint_mask"],
        )  # fmt: skip
        box, feather = pair.model["crop_box"], RENDER_DEFAULTS.feather_px
        ours = np.asarray(compose.postprocess(pair.context, window, pair.hole, box, feather))
        logged = _pixels(f"{renders}/step_{best:08d}/{p['pair_id']}.png")
        assert np.abs(logged - ours.astype(int)).max() <= 1  # batch-mates move a pixel by 1 level at most (Renderer)
        assert np.abs(_pixels(f"{renders}/step_00000000/{p['pair_id']}.png") - logged).max() > 8  # it learned

    page = tmp_path / "training.html"
    page.write_bytes(storage.read_bytes(record["training_page"]))
    dom, pixels = browser_view(chromium, page, tmp_path / "training.png", size=(1100, 1600))
    assert 'data-images-loaded="true"' in dom
    boxes = [tuple(map(int, b.split(","))) for b in re.search(r'data-grid-images="([^"]*)"', dom).group(1).split(";")]
    assert len(boxes) == 2 * (2 + 3)  # each pair: photo, product, three checkpoints
    for left, top, right, bottom in boxes:
        assert right - left > 100 and bottom - top == 160 and bottom <= pixels.shape[0]
        cell = pixels[top:bottom, left:right]
        assert cell.std() > 10 and len(np.unique(cell.reshape(-1, 3), axis=0)) > 100  # a picture, not a blank
    Image.open(tmp_path / "training.png").verify()


def test_two_workers_equal_one_worker_with_twice_the_batch(reference, two_workers):
    _assert_close_updates(_final_weights(two_workers), reference["weights"], _init_weights())
    (steps, ours), (ref_steps, theirs) = zip(*_losses(two_workers)), zip(*_losses(reference["output"]))
    assert steps == ref_steps
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)  # every logged loss, step by step


def test_a_killed_worker_resumes_exactly(two_workers, catalog, tmp_path):
    marker = tmp_path / "killed"
    config = tmp_path / "kill.yaml"
    config.write_text(
        RECIPE + f'fault_injection: {{crash_at_step: 3, crash_rank: 1, crash_once_marker: "{marker}"}}\n'
    )
    code, output = _local_run(catalog, tmp_path, "--workers", "2", config=str(config))
    assert code == 0 and marker.exists()  # the worker really died, and the run finished
    _assert_exact(_final_weights(output), _final_weights(two_workers))
    assert _losses(output) == _losses(two_workers)  # train.jsonl cut back to step 2, then redone
    # TensorBoard: a file per attempt; the reader shows each step once, in order, as train.jsonl
    events = _events(output, tmp_path)
    assert len(os.listdir(tmp_path / "tensorboard")) == 2
    assert _scalar_steps(events, "train/loss") == [1, 2, 3, 4] and _scalar_steps(events, "val/loss") == [0, 2, 4]
    lines = [json.loads(line) for line in open(os.path.join(output, "metrics", "train", "train.jsonl"))]
    logged = [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in lines if "loss" in r]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == logged  # the resumed attempt's 3 and 4


def _train_command(catalog: dict, output, config, ray_address: str, *flags: str) -> list[str]:
    """`python -m jobs.train` on the local catalog and the tiny model, joining the session's Ray."""
    return [
        sys.executable,
        *("-m", "jobs.train", "--manifest", catalog["manifest"], "--init-model", _tiny()),
        *("--output", str(output), "--config", str(config), "--address", ray_address, *flags),
    ]


def test_driver_sigkill_then_the_same_command_resumes_exactly(reference, catalog, tmp_path, ray_address):
    marker = tmp_path / "paused"
    config = tmp_path / "pause.yaml"
    config.write_text(RECIPE + f'fault_injection: {{pause_at_step: 3, pause_s: 60, pause_once_marker: "{marker}"}}\n')
    output = tmp_path / "out"
    command = _train_command(catalog, output, config, ray_address, "--vgg-weights", catalog["vgg"])
    env = dict(os.environ, PYTHONPATH=ROOT)
    first = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.time() + 240
        snapshot = output / "checkpoints" / "train" / "checkpoint_manager_snapshot.json"
        # step 3 starts once step 2's report returned; Ray Train registers the checkpoint (its snapshot)
        # when the controller next polls the workers: kill after that, while the run is paused at step 3
        while not (marker.exists() and snapshot.exists() and "checkpoint_00000002" in snapshot.read_text()):
            assert time.time() < deadline and first.poll() is None, "the first run did not reach step 3"
            time.sleep(0.2)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver dies at once: no cleanup, the lock stays
        first.wait()
    assert not (output / "model").exists()
    time.sleep(3.5)  # the killed run's lock heartbeat goes stale
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from the checkpoint of step 2" in again.stdout, again.stdout[-3000:]
    _assert_exact(_final_weights(str(output)), reference["weights"])
    record = json.loads((output / "runs" / "train.json").read_text())
    assert record["steps"]["run_this_attempt"] == 2 and record["attempts"][-1]["status"] == "running"
    page = (output / "metrics" / "train" / "training.html").read_text()  # rewritten by the resumed run
    assert re.findall(r"<th>step (\d+)</th>", page) == ["0", "2", "4"]


def test_sigterm_stops_a_training_run_with_its_record_and_the_lock_released(catalog, tmp_path, ray_address):
    """SIGTERM mid-training (a scheduler's stop) ends the driver and its Ray Train workers: exit 1,
    the run record says why, `_lock` is released, and the session's CPUs are free again."""
    import ray

    config = tmp_path / "long.yaml"
    config.write_text(RECIPE.replace("steps: 4\n", "steps: 100000\n"))
    output = tmp_path / "out"
    command = _train_command(catalog, output, config, ray_address, "--perceptual-weight", "0")
    run = subprocess.Popen(
        command,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        log = output / "metrics" / "train" / "train.jsonl"
        deadline = time.time() + 240
        while not (log.exists() and log.read_text().count("\n") >= 2):  # training steps are being taken
            assert time.time() < deadline and run.poll() is None, "training did not start"
            time.sleep(0.2)
        run.send_signal(signal.SIGTERM)
        out, _ = run.communicate(timeout=120)  # before the fix it trained on: its one ray.get swallowed it
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    assert run.returncode == 1, out[-3000:]
    assert "stopped by SIGTERM" in out and "Traceback" not in out, out[-3000:]
    record = json.loads((output / "runs" / "train.json").read_text())
    assert record["exit_code"] == 1 and "stopped by SIGTERM" in record["message"]
    assert not (output / "_lock").exists() and not (output / "model").exists()
    deadline = time.time() + 60  # the run's controller and workers end with their driver
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        assert time.time() < deadline, ray.available_resources()
        time.sleep(0.5)


def test_export_renders_on_s3_as_an_in_memory_render(reference, tmp_path):
    bucket, output = reference["bucket"], reference["output"]
    model = f"{output}/model"
    renders = f"s3://{bucket}/renders"
    code = render(
        [
            "--manifest",
            f"s3://{bucket}/catalog/manifest.parquet",
            "--output",
            renders,
            "--model",
            model,
            "--run-id",
            "r1",
            "--steps",
            "2",
            "--batch-size",
            "1",
            "--image-format",
            "png",
            "--cpus-per-actor",
            "0.5",
            "--torch-threads",
            "1",
            "--max-failed-fraction",
            "0.5",
            "--no-metrics",
        ]
    )
    assert code == 0
    rows = [r for r in read_manifest(renders, "r1").to_pylist() if r["status"] == "ok"]
    assert len(rows) == 8 and {r["model_digest"] for r in rows} == {model_digest(model)}
    renderer = Renderer.from_pretrained(model, device="cpu", torch_threads=1)
    config = PrepareConfig(InputPolicy(f"s3://{bucket}/catalog"), renderer.resolution, renderer.product_size)
    for row in rows:
        pair = prepare_pair(row["context_uri"], row["product_uri"], row["mask_uri"], row["bbox"], config)
        m = pair.model
        (window,) = renderer.render(
            m["context"][None],
            m["hole"][None],
            m["product"][None],
            m["product_alpha"][None],
            np.array([row["seed"]]),
            steps=2,
            guidance_scale=5.0,
            hint=m["hint"][None],
            hint_mask=m["hint_mask"][None],
        )
        final = compose.postprocess(pair.context, window, pair.hole, m["crop_box"], RENDER_DEFAULTS.feather_px)
        assert images.encode_image(final, "png") == storage.read_bytes(row["output_uri"]), row["pair_id"]


def test_a_paint_by_example_warm_start_trains_as_it_is(ray_address, catalog, tmp_path, pbe_warm):
    """`make_model --from-parts --pbe`'s DTC through the training job unchanged: two steps, PBE's
    UNet among the weights that moved, the export still in the pbe layout."""
    from diffusers import UNet2DConditionModel

    from pipeline.model.loading import load_pipeline

    output = str(tmp_path / "out")
    flags = ["--steps", "2", "--checkpoint-every", "2", "--val-renders", "0", "--perceptual-weight", "0"]
    args = ["--manifest", catalog["manifest"], "--init-model", pbe_warm["model"], "--output", output]
    assert train([*args, "--config", catalog["recipe"], *flags]) == 0
    text = storage.read_bytes(storage.join(output, "metrics", "train", "train.jsonl")).decode()
    lines = [json.loads(line) for line in text.splitlines()]
    assert [(r["step"], bool(np.isfinite(r["loss"]))) for r in lines if "loss" in r] == [(1, True), (2, True)]
    exported = load_pipeline(f"{output}/model")
    assert (exported.config.input_layout, exported.config.trained) == ("pbe", True)
    pbe = UNet2DConditionModel.from_pretrained(pbe_warm["pbe"], subfolder="unet").state_dict()
    assert any(not torch.equal(v, pbe[k]) for k, v in exported.unet.state_dict().items())


def test_a_manifest_without_a_usable_training_row_is_refused(ray_address, tmp_path, capsys):
    manifest = make_training_catalog(str(tmp_path / "catalog"), n_pairs=2, val_fraction=0, bad_rows=True)
    table = pq.read_table(manifest)
    pq.write_table(table.filter(pa.array([p.startswith("bad-") for p in table["pair_id"].to_pylist()])), manifest)
    output = tmp_path / "out"
    code = train(
        ["--manifest", manifest, "--init-model", _tiny(), "--output", str(output), "--perceptual-weight", "0"]
    )
    assert code == 2 and os.listdir(output) == ["prepared"]  # the store only: no run record, no checkpoint
    message = capsys.readouterr().err
    assert "no usable training row" in message and "image_missing 1" in message and "bad_bbox 1" in message


def test_a_store_read_that_fails_fails_the_run_with_its_cause(two_workers, catalog, tmp_path):
    """A part of the store gone after preparation: the run fails (exit 1) naming the part, no
    sample is skipped. The store is the 2-worker run's (same manifest, same digest: reused)."""
    import shutil

    output = tmp_path / "out"
    shutil.copytree(os.path.join(two_workers, "prepared"), output / "prepared")
    (part,) = glob.glob(str(output / "prepared" / "*" / "parts" / "*.parquet"))
    os.remove(part)
    code, _ = _local_run(catalog, tmp_path, "--max-failures", "0", "--perceptual-weight", "0")
    record = json.loads((output / "runs" / "train.json").read_text())
    assert code == 1 and record["exit_code"] == 1, record["message"]
    assert "cannot read row group" in record["message"] and os.path.basename(part) in record["message"]
