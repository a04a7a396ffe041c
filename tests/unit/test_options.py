"""One declaration per option (`pipeline.options`): the settings digest takes every field
declared `pixels` and no other, today's digests stay what they were, and the flags, YAML keys,
checks and Serve limits come from the same declarations."""

from __future__ import annotations

import argparse
import os
import types
import typing
from typing import Literal

import pytest
from helpers import ROOT

from jobs.render import build_parser, config_from_flags
from jobs.train import build_parser as train_parser
from pipeline.config import MAX_VARIANTS, ConfigError, RenderConfig
from pipeline.options import Options, add_flags, bounds, default, marked
from pipeline.options_page import page
from pipeline.serve.args import ServeArgs
from pipeline.train.config import RECIPE_FIELDS, TrainConfig

PIXELS = marked(RenderConfig, "pixels")
# select chooses among variants: it can change the pixels only with two or more
BASE = dict(manifest="m", output="o", model="x", variants=2)


def _another(model: type[Options], name: str, value):
    """A valid value of the field other than `value`, from its declaration alone."""
    kind = model.model_fields[name].annotation
    if typing.get_origin(kind) is types.UnionType:  # `int | None`: the int
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if typing.get_origin(kind) is Literal:
        return next(choice for choice in typing.get_args(kind) if choice != value)
    if kind is bool:
        return not value
    if kind in (int, float):
        limit = bounds(model, name)
        low, high = limit.get("ge", limit.get("gt", 0)), limit.get("le", limit.get("lt"))
        if value is None:
            return kind(low + 1)
        if kind is int:
            return value + 1 if high is None or value + 1 <= high else value - 1
        return value + 1 if high is None else (value + high) / 2 if value < high else (value + low) / 2
    if kind is str:
        return f"{value or 'x'}-other"
    if typing.get_origin(kind) is list:
        return [7] if typing.get_args(kind) == (int,) else ["/elsewhere"]
    return {dict: {"gpu_node": 1}, tuple: ("2026-11-01", "2026-11-02") if name == "partition_range" else (2, 3)}[
        typing.get_origin(kind) or kind
    ]


@pytest.mark.parametrize("name", PIXELS)
def test_each_pixel_option_moves_the_settings_digest(name):
    before = RenderConfig(**BASE).settings_digest(128)
    assert (
        RenderConfig(
            **{**BASE, name: _another(RenderConfig, name, RenderConfig(**BASE).model_dump()[name])}
        ).settings_digest(128)
        != before
    )


@pytest.mark.parametrize("name", sorted(set(RenderConfig.model_fields) - set(PIXELS)))
def test_no_other_option_moves_the_settings_digest(name):
    before = RenderConfig(**BASE).settings_digest(128)
    assert (
        RenderConfig(
            **{**BASE, name: _another(RenderConfig, name, RenderConfig(**BASE).model_dump()[name])}
        ).settings_digest(128)
        == before
    )


def test_the_settings_digests_of_existing_catalogs_are_kept():
    """Resume reuses pairs whose digest matches: a digest that moved re-renders every catalog.
    The values were computed on main before the options were declared with pydantic."""
    common = dict(manifest="m", output="o", model="x")
    assert RenderConfig(**common).check().settings_digest(512) == "f914f25b2407f956"
    changed = RenderConfig(
        **common,
        image_format="png",
        variants=4,
        select="clip",
        clip_model="c",
        steps=20,
        scheduler="dpmpp",
        guidance_scale=7,
        crop_margin=0.5,
        feather_px=2,
    )
    assert changed.check().settings_digest(256) == "1849c309f3dc96eb"
    assert RenderConfig(**common, variants=4, select="clip").settings(256)["variants"] == 4
    assert "variants" not in RenderConfig(**common, select="clip").settings(256)  # one render: nothing selected


@pytest.mark.parametrize("name", RECIPE_FIELDS)
def test_each_recipe_option_moves_the_recipe_digest(name):
    base = dict(manifest="m", init_model="i", output="o")
    before = TrainConfig(**base).recipe_digest("init")
    assert (
        TrainConfig(**{**base, name: _another(TrainConfig, name, default(TrainConfig, name))}).recipe_digest("init")
        != before
    )


@pytest.mark.parametrize("name", sorted(set(TrainConfig.model_fields) - set(RECIPE_FIELDS)))
def test_no_other_option_moves_the_recipe_digest(name):
    base = dict(manifest="m", init_model="i", output="o")
    before = TrainConfig(**base).recipe_digest("init")
    assert (
        TrainConfig(**{**base, name: _another(TrainConfig, name, default(TrainConfig, name))}).recipe_digest("init")
        == before
    )


def test_the_recipe_digest_of_existing_runs_is_kept():
    base = dict(manifest="m", init_model="i", output="o", perceptual_weight=0.0)
    assert TrainConfig(**base).check().recipe_digest("init") == "d5bafd4d3acba7a1"
    changed = TrainConfig(**base, learning_rate=2e-5, validation_timesteps=[1, 2], bf16=False, grad_clip=2)
    assert changed.check().recipe_digest("abc") == "19b3e02627a68543"


def _backfill_only_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(argument_default=argparse.SUPPRESS)
    add_flags(parser, RenderConfig, which="backfill")
    return parser


@pytest.mark.parametrize(
    "build, model, which",
    [
        (build_parser, RenderConfig, True),
        (_backfill_only_parser, RenderConfig, "backfill"),
        (train_parser, TrainConfig, True),
    ],
    ids=["render", "backfill", "train"],
)
def test_every_option_with_a_flag_is_a_flag_with_its_declared_default_in_the_help(build, model, which):
    flags = {option: action for action in build()._actions for option in action.option_strings}
    for name, field in model.model_fields.items():
        dashed = name.replace("_", "-")
        if field.json_schema_extra["flag"] != which:
            assert f"--{dashed}" not in flags and f"--no-{dashed}" not in flags, name
            continue
        value = default(model, name)
        if value is True:  # on by default: the flag is --no-x, and its help says so
            action = flags[f"--no-{dashed}"]
            assert action.dest == name and action.help == f"turn off (on by default): {field.description}", name
            continue
        action = flags[f"--{dashed}"]
        assert action.dest == name and action.help.startswith(field.description), name
        # `is`: 0 == False, and a default of 0 (train --seed) is a default to show
        if not (value is None or value is False or value in ("", [])):
            shown = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
            assert f"(default {shown})" in action.help, name


def test_a_default_of_zero_is_shown():
    seed = next(action for action in train_parser()._actions if "--seed" in action.option_strings)
    assert "(default 0)" in seed.help


def test_flags_reach_the_config():
    args = ["--steps", "7", "--actors", "2,3", "--allow-root", "/a", "--allow-root", "/b", "--scheduler", "dpmpp"]
    cfg = config_from_flags(vars(build_parser().parse_args(args)))
    assert (cfg.steps, cfg.actors, cfg.allow_root, cfg.scheduler) == (7, (2, 3), ["/a", "/b"], "dpmpp")


def test_yaml_only_options_are_no_flags():
    """A demo's or a chaos test's setting is not a user's flag: YAML only."""
    flags = {option for action in build_parser()._actions for option in action.option_strings}
    for name in ("metrics_random_weights", "fault_injection", "actor_resources", "partition_range"):
        assert f"--{name.replace('_', '-')}" not in flags, name
        assert name in RenderConfig.keys()


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(steps=0), "--steps must be in 1..1000, got 0"),
        (dict(batch_size=0), "--batch-size must be >= 1, got 0"),
        (dict(cpus_per_actor=0.0), "--cpus-per-actor must be > 0, got 0.0"),
        (dict(scheduler="euler"), "--scheduler must be one of ('ddim', 'dpmpp'), got 'euler'"),
        (dict(limit="5"), "limit must be int | None, got str '5'"),
        (dict(actors=(1, 2, 3)), "actors must be MIN,MAX or N, got (1, 2, 3)"),
        (dict(stepz=4), "unknown option 'stepz'"),
    ],
)
def test_a_bad_value_is_one_line_naming_it(values, message):
    with pytest.raises(ConfigError) as refused:
        RenderConfig(**values)
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)


def test_serve_limits_are_the_declared_ranges():
    assert MAX_VARIANTS == bounds(RenderConfig, "variants")["le"]
    for name in ("steps", "guidance_scale", "jpeg_quality", "max_pixels"):
        assert bounds(ServeArgs, name) == bounds(RenderConfig, name), name
        assert default(ServeArgs, name) == default(RenderConfig, name), name


def test_the_options_page_is_generated_from_the_declarations():
    with open(os.path.join(ROOT, "docs", "options.md")) as f:
        written = f.read()
    assert written == page(), "docs/options.md is stale: python -m pipeline.options_page > docs/options.md"
