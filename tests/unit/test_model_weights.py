"""Whether a model was trained, said where it matters (issue 28 points 7 and 8): the flags a model
folder records (make_model presets and --from-parts: untrained; the training job's export:
trained; the toy's image encoder: random), the warning the console summary and the QA page
print, and the packed train-tiny file taken by `--model` as it is, keyed by the digest of the
folder it unpacks to."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import save_file

from jobs.make_model import main as make_model
from pipeline import record, storage
from pipeline.config import RENDER_DEFAULTS, RenderConfig
from pipeline.metrics.report import render_report
from pipeline.model.checkpoint import (
    RANDOM_IMAGE_ENCODER_WARNING,
    UNTRAINED_WARNING,
    check_dtc_checkpoint,
    model_digest,
    weights_warning,
)
from pipeline.model.loading import load_pipeline
from pipeline.model.packed import unpack
from pipeline.output.stats import RunStats
from pipeline.run import check
from pipeline.schema import EXIT_OK
from pipeline.train.export import export_model
from pipeline.train.step import TRAINABLE, WEIGHTS_FILE

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKED = os.path.join(ROOT, "models", "train-tiny.safetensors")
MAX_PIXELS = RENDER_DEFAULTS.max_pixels


def _index(folder: str) -> dict:
    with open(os.path.join(folder, "model_index.json")) as f:
        return json.load(f)


def _spec(tmp_path, model: str):
    manifest = tmp_path / "in.parquet"
    rows = {"pair_id": ["a"], "context_uri": ["x.png"], "product_uri": ["y.png"], "bbox": [[0.0, 0.0, 9.0, 9.0]]}
    pq.write_table(pa.table(rows), manifest)
    return check(RenderConfig(manifest=str(manifest), output=str(tmp_path / "out"), model=model))


def test_make_model_presets_are_recorded_untrained_and_say_so(tmp_path, tiny_model_dir, capsys):
    assert _index(tiny_model_dir)["trained"] is False and _index(tiny_model_dir)["image_encoder_trained"] is False
    assert weights_warning(_index(tiny_model_dir)) == UNTRAINED_WARNING
    out = str(tmp_path / "train-tiny")
    assert make_model(["--preset", "train-tiny", "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "resolution 64" in printed and UNTRAINED_WARNING.upper() in printed
    assert weights_warning(check_dtc_checkpoint(out)) == UNTRAINED_WARNING


def test_the_training_export_records_trained_and_keeps_the_random_image_encoder(tmp_path, tiny_model_dir):
    pipe = load_pipeline(tiny_model_dir)
    weights = str(tmp_path / "checkpoint")
    os.makedirs(weights)
    state = {f"{name}.{k}": v.contiguous() for name in TRAINABLE for k, v in getattr(pipe, name).state_dict().items()}
    save_file(state, os.path.join(weights, WEIGHTS_FILE))
    out = str(tmp_path / "model")
    export_model(tiny_model_dir, weights, out, {"run": "test"})
    index = check_dtc_checkpoint(out)
    assert index["trained"] is True and index["image_encoder_trained"] is False  # the tiny preset's encoder
    assert weights_warning(index) == RANDOM_IMAGE_ENCODER_WARNING
    assert weights_warning({**index, "image_encoder_trained": True}) is None  # trained, real encoder


def test_a_folder_written_before_the_flags_warns_of_nothing_and_loads(tmp_path, tiny_model_dir):
    import shutil

    old = str(tmp_path / "old")
    shutil.copytree(tiny_model_dir, old)
    index = {k: v for k, v in _index(old).items() if k not in ("trained", "image_encoder_trained")}
    with open(os.path.join(old, "model_index.json"), "w") as f:
        json.dump(index, f)
    assert weights_warning(check_dtc_checkpoint(old)) is None  # unknown: no claim either way
    assert load_pipeline(old).config.trained is None


def test_the_console_summary_the_record_and_the_qa_page_carry_the_warning(tmp_path, tiny_model_dir):
    spec = _spec(tmp_path, tiny_model_dir)
    assert spec.model_warning == UNTRAINED_WARNING
    stats = RunStats()
    summary = record.summary_text(spec, stats, 1.0, EXIT_OK, None, report_written=True)
    lines = summary.splitlines()
    metrics_at = next(i for i, line in enumerate(lines) if line.startswith("  metrics"))
    assert lines[metrics_at + 1] == f"  model      {UNTRAINED_WARNING.upper()}"  # beside the extractors' warning
    run = record.run_record(
        spec, stats, exit_code=EXIT_OK, message="", started_at=datetime.now(UTC),
        elapsed=1.0, manifest_parts=0, rss_samples=[],
    )  # fmt: skip
    assert run["model"]["warning"] == UNTRAINED_WARNING
    types = {c: pa.string() for c in ("pair_id", "status", "error_code", "error_message", "shard")}
    rows = pa.schema({**types, "clip_score": pa.float64()}).empty_table()
    page = render_report("r", rows, None, model_warning=spec.model_warning, max_pixels=MAX_PIXELS)
    banner = f"<p class='banner' id='model-warning'>{UNTRAINED_WARNING.upper()}</p>"
    assert banner in page and page.index(banner) < page.index("id='metrics-skipped'")
    assert "model-warning" not in render_report("r", rows, None, max_pixels=MAX_PIXELS)


def test_model_takes_the_packed_file_keyed_as_the_folder_it_unpacks_to(tmp_path):
    index = check_dtc_checkpoint(PACKED)  # the header alone: no torch on the driver
    assert index["_class_name"] == "DTCPipeline" and index["resolution"] == 64 and index["trained"] is True
    assert weights_warning(index) == RANDOM_IMAGE_ENCODER_WARNING  # the toy's DINOv2 is random
    folder = unpack(PACKED, str(tmp_path / "unpacked"))
    assert model_digest(PACKED) == model_digest(folder)  # runs with either reuse each other's pairs
    assert check_dtc_checkpoint(folder)["trained"] is True
    assert os.path.exists(os.path.join(folder, "dtc_training.json"))  # the provenance comes along

    cache = str(tmp_path / "cache")
    pipe = load_pipeline(PACKED, cache_dir=cache)  # unpacked once into the node cache
    reference = load_pipeline(folder)
    for name in ("unet", "hint_encoder", "vae", "image_projection"):
        for (key, value), (_, expected) in zip(
            getattr(pipe, name).state_dict().items(), getattr(reference, name).state_dict().items()
        ):
            assert torch.equal(value, expected), f"{name}.{key}"
    [unpacked] = [d for d in os.listdir(cache) if d.startswith("packed-") and not d.endswith(".lock")]
    assert model_digest(os.path.join(cache, unpacked)) == model_digest(PACKED)

    spec = _spec(tmp_path, PACKED)  # the render job's checks take it as they take the folder
    assert spec.model_digest == model_digest(folder) and spec.resolution == 64
    assert storage.exists(PACKED)


def test_a_packed_file_without_its_index_is_one_clear_error(tmp_path):
    import pytest

    from pipeline.model.checkpoint import CheckpointError

    bare = str(tmp_path / "bare.safetensors")
    save_file({"x": torch.zeros(2)}, bare, metadata={"preset": "train-tiny"})
    with pytest.raises(CheckpointError, match="not a packed DTC model of this version"):
        check_dtc_checkpoint(bare)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        (tmp_path / "text.safetensors").write_text("hello")
        model_digest(str(tmp_path / "text.safetensors"))


def test_make_model_vae_from_keeps_the_fitted_vae_and_refuses_one_of_another_factor(tmp_path, capsys):
    out = str(tmp_path / "init")
    assert make_model(["--preset", "train-tiny", "--vae-from", PACKED, "--film-mode", "spatial", "--out", out]) == 0
    fitted, made = load_pipeline(PACKED).vae.state_dict(), load_pipeline(out)
    assert fitted.keys() == made.vae.state_dict().keys()
    assert all(torch.equal(fitted[k], made.vae.state_dict()[k]) for k in fitted)
    assert made.hint_encoder.config.film_mode == "spatial" and made.config.trained is False
    assert make_model(["--preset", "tiny", "--vae-from", PACKED, "--out", str(tmp_path / "bad")]) == 2
    assert "does not fit the tiny preset's (factor 8" in capsys.readouterr().err
