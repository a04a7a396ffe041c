"""The recipe's optimiser steps on the tiny model, in-process (no Ray): zero-init gradient flow, the
loss falling on a fixed small set, and a save/load in the middle or the prefetch depth changing nothing."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest
import torch

from pipeline.fetch import InputPolicy
from pipeline.manifest import plan_manifest
from pipeline.model.presets import build_preset
from pipeline.schema import FUSION_FORMS
from pipeline.stages.prepare_stage import PrepareConfig
from pipeline.toy.catalog import make_training_catalog
from pipeline.train.config import TrainConfig
from pipeline.train.dataset import prepare_training_batch, read_training_files
from pipeline.train.loss import TRAINABLE, TrainableDTC
from pipeline.train.samples import SampleSet
from pipeline.train.step import Learner
from pipeline.train.vgg import load_vgg19, save_random_vgg19


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> SampleSet:
    path = make_training_catalog(str(tmp_path_factory.mktemp("grad")), n_pairs=6, val_fraction=0)
    plan = plan_manifest(path)
    config = PrepareConfig(InputPolicy(plan.base_dir), resolution=128, product_size=224)
    batches = read_training_files({"file_index": [0]}, plan=plan, conflicts_ref=[])
    rows = pa.concat_tables([prepare_training_batch(b, config=config) for b in batches]).to_pylist()
    return SampleSet.from_rows(rows, 128, 224)


@pytest.fixture(scope="module")
def vgg(tmp_path_factory):
    """A random-weight VGG19: plumbing only (the perceptual term's gradient path, not its meaning)."""
    return load_vgg19(save_random_vgg19(str(tmp_path_factory.mktemp("vgg") / "random-vgg19.pth")))[0]


def _config(**overrides) -> TrainConfig:
    values = dict(
        manifest="m",
        init_model="i",
        output="o",
        batch_size=4,
        learning_rate=1e-3,
        perceptual_weight=0.0,
        pixel_weight=0.0,
        cfg_drop=0.5,
        seed=1,
    )
    return TrainConfig(**{**values, **overrides})


def _learner(cfg: TrainConfig, vgg=None, checkpointing: bool = False) -> Learner:
    pipe = build_preset("tiny", seed=0)
    if checkpointing:
        for module in (pipe.unet, pipe.hint_encoder, pipe.vae):
            module.enable_gradient_checkpointing()
    return Learner(TrainableDTC(pipe, vgg), cfg)


def _grad(module: torch.nn.Module, recurse: bool = True) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters(recurse=recurse) if p.grad is not None)


def _leaf_modules(model: TrainableDTC):
    for name in TRAINABLE:
        for sub, module in getattr(model, name).named_modules():
            if any(True for _ in module.parameters(recurse=False)):
                yield f"{name}.{sub}", module


@pytest.mark.slow  # three steps with the x0 decode and VGG (seconds): `make test` runs it
def test_zero_init_gradient_flow(samples, vgg):
    """Step 1: the zero FiLM heads get gradient, the hint encoder behind them and the adapter exactly
    none. By step 3 every trainable module has gradient. All losses finite (x0 terms included)."""
    learner = _learner(_config(pixel_weight=0.1, perceptual_weight=1e-3, perceptual_every=1), vgg, checkpointing=True)
    model = learner.model
    heads, body = (
        model.hint_encoder.film_heads,
        [m for n, m in model.hint_encoder.named_children() if n != "film_heads"],
    )
    stats = learner.train_step(0, samples)
    assert all(_grad(head) > 0 for head in heads)
    assert all(p.grad is not None and not p.grad.any() for m in body for p in m.parameters())
    assert all(p.grad is not None and not p.grad.any() for p in model.hint_adapter.parameters())
    assert _grad(model.unet) > 0 and _grad(model.image_projection.proj) > 0
    history = [stats]
    for step in (1, 2):
        history.append(learner.train_step(step, samples))
    missing = [name for name, module in _leaf_modules(model) if _grad(module, recurse=False) == 0]
    assert not missing, f"no gradient at step 3: {missing[:5]}"
    assert all(math.isfinite(v) for s in history for v in (s.loss, s.mse, s.pixel, s.perceptual, s.grad_norm))


@pytest.mark.parametrize("form", FUSION_FORMS)
def test_every_trained_parameter_gets_a_gradient_in_every_fusion_form(samples, form):
    """DDP reduces every parameter that requires a gradient and fails a step in which one got none
    (with more than one worker): each fusion form's trainable parameters all take part in the
    loss (zero gradients are fine), and `off` trains no hint adapter, which would feed nothing."""
    pipe = build_preset("tiny", seed=0, film_mode=form)
    learner = Learner(TrainableDTC(pipe), _config())
    learner.train_step(0, samples)
    missing = [n for n, p in learner.model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]
    adapter = list(pipe.hint_adapter.parameters())
    assert all(p.requires_grad != (form == "off") for p in adapter)
    assert len(learner.params) == sum(p.requires_grad for p in learner.model.parameters())


def _grid_loss(learner: Learner, samples: SampleSet) -> float:
    return learner.validation_loss(samples)  # the fixed (t, noise) grid, here on the training pairs


@pytest.mark.slow  # trains: `make test` runs it, `make test-unit` does not
def test_the_loss_falls_on_a_fixed_small_set(samples):
    learner = _learner(_config(cfg_drop=0.2))
    start = _grid_loss(learner, samples)
    for step in range(24):
        learner.train_step(step, samples)
    end = _grid_loss(learner, samples)
    assert end < 0.5 * start, (start, end)


def test_save_and_load_mid_run_and_the_prefetch_depth_change_nothing(samples, tmp_path):
    cfg = _config(pixel_weight=0.1, perceptual_every=2)
    straight = _learner(cfg.model_copy(update={"prefetch_steps": 0}))  # each batch built in its step
    for step in range(4):
        straight.train_step(step, samples)
    first = _learner(cfg)
    for step in range(2):
        first.train_step(step, samples)
    first.save(str(tmp_path / "ckpt"), {"step": 2})
    resumed = _learner(cfg)  # a fresh process would build exactly this, then load
    assert resumed.load(str(tmp_path / "ckpt")) == {"step": 2}
    for step in range(2, 4):
        resumed.train_step(step, samples)
    assert cfg.prefetch_steps == 2 and resumed.feed.pool is not None  # these built 2 steps ahead, in threads
    for name in TRAINABLE:
        a, b = getattr(straight.model, name).state_dict(), getattr(resumed.model, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_a_non_finite_loss_stops_the_step_before_any_update(samples):
    learner = _learner(_config(learning_rate=1e6, grad_clip=1e12))  # diverges within a few steps
    with pytest.raises(FloatingPointError, match=r"(the loss|the gradient norm) is (nan|inf) at step \d"):
        for step in range(8):
            learner.train_step(step, samples)
