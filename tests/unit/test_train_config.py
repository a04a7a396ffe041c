"""TrainConfig, jobs.train's flags and YAML, the refusals before any work, and a torch-free driver."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import ROOT

from jobs.train import config_from_flags
from jobs.train import main as train
from pipeline.config import ConfigError
from pipeline.manifest import plan_manifest
from pipeline.toy.catalog import make_training_catalog
from pipeline.train.config import RECIPE_FIELDS, TrainConfig
from pipeline.train.dataset import check_splits

BASE = dict(manifest="m.parquet", init_model="model", output="out", perceptual_weight=0.0)


def test_yaml_keys_are_the_flags_and_flags_win(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("batch-size: 4\nlearning_rate: 0.0001\nworkers: 2\nvalidation_timesteps: [10, 20]\n")
    cfg = config_from_flags({"config": str(config), "workers": 4, **BASE})
    assert (cfg.batch_size, cfg.learning_rate, cfg.workers, cfg.validation_timesteps) == (4, 1e-4, 4, [10, 20])
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['lerning_rate'\]"):
        config_from_flags({"lerning_rate": 1.0, **BASE})


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(batch_size=6, workers=4), "must be a multiple of --workers 4"),
        (dict(steps="ten"), "steps must be int, got str 'ten'"),
        (dict(cfg_drop=1.5), "--cfg-drop must be in 0..1, got 1.5"),
        (dict(export="latest"), "--export must be one of"),
        (dict(run_id="../x"), "--run-id '../x' must be"),
        (dict(perceptual_weight=1e-3), "needs VGG19 weights: pass --vgg-weights"),
        (dict(validation_timesteps=[1000]), "validation_timesteps must be 1+ timesteps in 0..999"),
        (dict(init_model=""), "--init-model is required"),
    ],
)
def test_bad_settings_are_refused_with_one_message(change, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        TrainConfig(**{**BASE, **change}).check()


def test_the_recipe_digest_covers_the_recipe_not_the_resources():
    cfg = TrainConfig(**BASE)
    digest = cfg.recipe_digest("init")
    assert TrainConfig(**BASE, workers=2, steps=5000, checkpoint_every=7).recipe_digest("init") == digest
    assert TrainConfig(**BASE, learning_rate=2e-5).recipe_digest("init") != digest
    assert cfg.recipe_digest("other-init") != digest
    assert set(RECIPE_FIELDS) <= TrainConfig.keys()


def test_a_bad_split_value_refuses_the_manifest(tmp_path):
    path = make_training_catalog(str(tmp_path), n_pairs=2)
    check_splits(plan_manifest(path))  # train/val: fine
    table = pq.read_table(path)
    pq.write_table(table.set_column(table.schema.get_field_index("split"), "split", pa.array(["train", "test"])), path)
    with pytest.raises(ConfigError, match=r"split must be train or val \(or empty\), got \['test'\]"):
        check_splits(plan_manifest(path))


def test_refusals_before_work_exit_2_and_write_nothing(tmp_path, tiny_model_dir, capsys):
    manifest = make_training_catalog(str(tmp_path / "catalog"), n_pairs=2)
    output = tmp_path / "out"
    no_vgg = ["--perceptual-weight", "0"]
    cases = [
        (["--manifest", str(tmp_path / "none.parquet"), "--init-model", tiny_model_dir, *no_vgg], "does not exist"),
        (["--manifest", manifest, "--init-model", str(tmp_path), *no_vgg], "not a diffusers checkpoint"),
        (
            ["--manifest", manifest, "--init-model", tiny_model_dir, "--vgg-weights", str(tmp_path / "vgg19.pth")],
            "--vgg-weights .*vgg19.pth does not exist",
        ),
    ]
    for args, message in cases:
        assert train([*args, "--output", str(output)]) == 2
        assert re.search(message, capsys.readouterr().err), message
        assert not output.exists()


def test_the_driver_side_does_not_import_torch():
    code = (
        "import sys\n"
        "import jobs.train, pipeline.train.config, pipeline.train.dataset, pipeline.train.recipe\n"
        "import pipeline.train.record, pipeline.toy.catalog, pipeline.train.export, pipeline.train.faults\n"
        "heavy = ('torch', 'diffusers', 'transformers')\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in heavy)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"driver modules imported: {out.stdout.strip()[:300]}"
    done = subprocess.run([sys.executable, "-m", "jobs.train", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and "--vgg-weights" in done.stdout


def test_a_rerun_with_another_recipe_is_refused_not_resumed(tmp_path, tiny_model_dir, capsys):
    manifest = make_training_catalog(str(tmp_path / "catalog"), n_pairs=2)
    earlier = TrainConfig(**{**BASE, "learning_rate": 5e-5})
    runs = tmp_path / "out" / "runs"
    runs.mkdir(parents=True)
    (runs / "train.json").write_text(json.dumps({"recipe_digest": "0123", "recipe": earlier.recipe()}))
    args = ["--manifest", manifest, "--init-model", tiny_model_dir, "--output", str(tmp_path / "out")]
    assert train([*args, "--perceptual-weight", "0"]) == 2
    message = capsys.readouterr().err
    assert "other recipe settings (learning_rate, init model differ)" in message and "new --run-id" in message
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == ["runs", "train.json"]
