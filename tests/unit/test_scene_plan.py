"""Scenes, variants and the identity score without Ray: the scene plan on hand-built groups
(checks, the digest chain, packing), variant seeds, the identity score through the real image
encoder class, its histogram, the settings digest, and the render stage's variants on the tiny
DTC (one model call, the best kept)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from transformers import Dinov2Model

from pipeline.config import RenderConfig
from pipeline.metrics.feature_stats import ScoreHistogram
from pipeline.model.identity import IdentityScorer
from pipeline.model.presets import dinov2_config
from pipeline.rows import variant_seeds
from pipeline.sample_catalog import product, scene
from pipeline.schema import CARRIED_COLUMNS, PREV, RENDER, REUSE, state_schema
from pipeline.stages.scene_stage import GROUP, SCENE_CONTEXT, SCENE_REST, SceneConfig, _unpack, plan_scene

# -- the scene plan ----------------------------------------------------------------------------


def _group(steps, *, reused=(), digests=None, codes=None, contexts=None, scene="room-1") -> pa.Table:
    """A scene group as the resume stage hands it over: rows in any order, `reused` steps done
    with the given (context_digest, pixels_digest) pairs."""
    n = len(steps)
    digests = digests or {}
    prev = {c: [None] * n for c in CARRIED_COLUMNS}
    for i, step in enumerate(steps):
        if step in reused:
            prev["status"][i] = "ok"
            prev["context_digest"][i], prev["pixels_digest"][i] = digests.get(step, (f"c{step}", f"p{step}"))
    types = state_schema()
    columns = {
        "pair_id": pa.array([f"{scene}-{s}-{i}" for i, s in enumerate(steps)], pa.string()),
        "scene_id": pa.array([scene] * n, pa.string()),
        "step": pa.array(steps, pa.int64()),
        "context_uri": pa.array(contexts or ["photo.jpg" if s == 1 else None for s in steps], pa.string()),
        "product_uri": pa.array(["p.png"] * n, pa.string()),
        "bbox": pa.array([[1.0, 1.0, 20.0, 20.0]] * n, pa.list_(pa.float64())),
        "error_code": pa.array(codes or [""] * n, pa.string()),
        "error_message": pa.array([""] * n, pa.string()),
        "action": pa.array([REUSE if s in reused else RENDER for s in steps], pa.string()),
        **{PREV + c: pa.array(v, types.field(c).type) for c, v in prev.items()},
        GROUP: pa.array([scene] * n, pa.string()),
    }
    return pa.table(columns)


def _plan(group: pa.Table, **kwargs) -> list[dict]:
    return plan_scene(group, config=SceneConfig("/out", **kwargs)).to_pylist()


def test_a_new_scene_travels_as_its_first_step_with_the_rest_packed_in_order():
    rows = _plan(_group([3, 1, 2]))
    assert [r["step"] for r in rows] == [1]
    lead = rows[0]
    assert lead["action"] == RENDER and lead[SCENE_CONTEXT] is None and not lead["error_code"]
    rest = _unpack(lead[SCENE_REST]).to_pylist()
    assert [r["step"] for r in rest] == [2, 3]
    assert {r["context_uri"] for r in rest} == {"photo.jpg"}  # later steps name the photo they decorate


@pytest.mark.parametrize(
    "steps, why",
    [([1, 3], "gap: missing [2]"), ([1, 2, 2], "[2] given more than once"), (list(range(1, 10)), "9 steps, over")],
)
def test_gaps_repeats_and_overlong_scenes_fail_every_row(steps, why):
    rows = _plan(_group(steps))
    assert len(rows) == len(steps)
    assert {r["error_code"] for r in rows} == {"scene_invalid"}
    assert all(why in r["error_message"] for r in rows), rows[0]["error_message"]
    assert all(r[SCENE_REST] is None for r in rows)


def test_max_scene_steps_is_the_limit():
    assert {r["error_code"] for r in _plan(_group([1, 2, 3]), max_scene_steps=2)} == {"scene_invalid"}
    assert _plan(_group([1, 2, 3]), max_scene_steps=3)[0]["error_code"] == ""


def test_a_later_step_with_another_context_is_refused():
    rows = _plan(_group([1, 2], contexts=["photo.jpg", "other.jpg"]))
    assert {r["error_code"] for r in rows} == {"scene_invalid"}
    assert "step 2's context_uri is not step 1's" in rows[0]["error_message"]


def test_done_steps_with_an_intact_chain_are_reused_and_the_next_renders_into_the_last_ones_pixels():
    group = _group([1, 2, 3], reused=(1, 2), digests={1: ("c1", "p1"), 2: ("p1", "p2")})
    rows = {r["step"]: r for r in _plan(group)}
    assert rows[1]["action"] == rows[2]["action"] == REUSE
    assert rows[3]["action"] == RENDER and rows[3][SCENE_REST] is None
    assert rows[3][SCENE_CONTEXT] == "/out/scenes/room-1/room-1-2-1.png"


def test_a_step_rendered_into_pixels_that_changed_is_stale_and_so_is_every_later_step():
    # step 2 was rendered into pixels ("old") that are no longer step 1's output ("p1")
    group = _group([1, 2, 3], reused=(1, 2, 3), digests={1: ("c1", "p1"), 2: ("old", "p2"), 3: ("p2", "p3")})
    rows = {r["step"]: r for r in _plan(group)}
    assert rows[1]["action"] == REUSE
    assert set(rows) == {1, 2}  # step 3 travels packed behind step 2
    assert rows[2]["action"] == RENDER and rows[2][SCENE_CONTEXT] == "/out/scenes/room-1/room-1-1-0.png"
    packed = _unpack(rows[2][SCENE_REST]).to_pylist()
    assert [(r["step"], r["action"]) for r in packed] == [(3, RENDER)]  # done before, but stale now


def test_a_failed_step_fails_every_later_one_upstream_naming_it():
    rows = {r["step"]: r for r in _plan(_group([1, 2, 3], codes=["", "missing_uri", ""]))}
    assert rows[1]["error_code"] == "" and rows[1][SCENE_REST] is None  # rendered alone
    assert rows[2]["error_code"] == "missing_uri"
    assert rows[3]["error_code"] == "upstream_failed"
    assert "step 2 (room-1-2-1) of scene 'room-1' failed" in rows[3]["error_message"]


def test_rows_outside_scenes_pass_untouched():
    group = _group([1, 1], scene="x").set_column(
        _group([1, 1]).schema.get_field_index(GROUP), GROUP, pa.array(["#7", "#7"])
    )
    rows = _plan(group)
    assert [r["pair_id"] for r in rows] == ["x-1-0", "x-1-1"] and all(r[SCENE_REST] is None for r in rows)


# -- variants and the identity score ---------------------------------------------------------------


def test_variant_seeds_start_with_the_pairs_seed_and_are_distinct_and_stable():
    seeds = variant_seeds(12345, 4)
    assert seeds[0] == 12345 and len(set(seeds)) == 4 and seeds == variant_seeds(12345, 4)
    assert variant_seeds(12345, 2) == seeds[:2] and all(0 <= s < 2**63 for s in seeds)


@pytest.fixture(scope="module")
def scorer() -> IdentityScorer:
    torch.manual_seed(0)
    return IdentityScorer(Dinov2Model(dinov2_config("tiny")).eval(), size=224, device="cpu")


def test_identity_score_is_high_for_the_product_in_its_region_low_for_another_image(scorer):
    rng = np.random.default_rng(0)
    good = product(96, rng)[..., :3]
    other = scene(96, 96, rng)
    window = np.full((128, 128, 3), 127, np.uint8)
    hole = np.zeros((128, 128), bool)
    hole[16:112, 16:112] = True
    pasted, unrelated = window.copy(), window.copy()
    pasted[16:112, 16:112], unrelated[16:112, 16:112] = good, other
    scores = scorer.score(np.stack([pasted, unrelated]), np.stack([hole, hole]), np.stack([good]))
    again = scorer.score(np.stack([pasted, unrelated]), np.stack([hole, hole]), np.stack([good]))
    assert np.array_equal(scores, again)  # deterministic
    assert scores[0] > 99.9  # the product itself
    assert scores[0] - scores[1] > 20, scores


def test_score_histogram_percentiles_agree_with_numpy_to_its_bin_width():
    values = np.random.default_rng(1).normal(60, 15, 5000).clip(-100, 100)
    hist = ScoreHistogram()
    hist.add(list(values[:2000]))
    hist.add(list(values[2000:]) + [None])
    summary = hist.summary()
    assert summary["n"] == 5000 and abs(summary["mean"] - values.mean()) <= 0.005  # to 0.01
    for q in (10, 50, 90):
        assert abs(summary[f"p{q}"] - np.percentile(values, q)) <= 0.1 + 1e-9


def test_variants_and_selection_are_in_the_settings_digest_and_one_variant_keeps_old_digests():
    def digest(**kw) -> str:
        return RenderConfig(manifest="m", output="o", model="x", **kw).settings_digest(128)

    one = digest()
    assert digest(select="clip") == one  # nothing is selected from one render
    assert "variants" not in RenderConfig().settings(128)
    four = digest(variants=4)
    assert len({one, four, digest(variants=2), digest(variants=4, select="clip")}) == 4
    assert digest(variants=4, keep_variants=True, min_identity_score=50.0) == four  # no effect on pixels


def test_a_huge_step_number_is_a_bounded_gap_message():
    rows = _plan(_group([1, 10**12]))
    assert {r["error_code"] for r in rows} == {"scene_invalid"}
    assert len(rows[0]["error_message"]) < 200 and "missing [2]" in rows[0]["error_message"]


def test_steps_rendered_before_as_plain_pairs_have_no_digests_and_are_not_reused():
    group = _group([1, 2], reused=(1, 2), digests={1: (None, None), 2: (None, None)})
    rows = _plan(group)
    assert [r["step"] for r in rows] == [1] and rows[0]["action"] == RENDER and rows[0][SCENE_CONTEXT] is None
    assert [r["step"] for r in _unpack(rows[0][SCENE_REST]).to_pylist()] == [2]


def test_a_backfills_superseded_copy_of_a_scene_passes_and_the_latest_renders():
    group = pa.concat_tables([_group([1, 2]), _group([1, 2], codes=["superseded", "superseded"])])
    rows = _plan(group)
    assert sorted(r["error_code"] for r in rows) == ["", "superseded", "superseded"]  # the lead + 2 passed
    lead = next(r for r in rows if not r["error_code"])
    assert [r["step"] for r in _unpack(lead[SCENE_REST]).to_pylist()] == [2]


def test_a_later_step_without_a_context_is_still_checked_and_a_blank_scene_id_is_no_scene(tmp_path):
    from pipeline.rows import validate_rows

    table = pa.table(
        {
            "pair_id": ["s-1", "s-2", "s-3", "plain"],
            "scene_id": ["s", "s", "s", "  "],
            "step": pa.array([1, 2, 3, None], pa.int64()),
            "context_uri": ["photo.jpg", None, None, "photo.jpg"],
            "product_uri": ["p.png"] * 4,
            "bbox": pa.array([[1.0, 1.0, 9.0, 9.0]] * 4, pa.list_(pa.float64())),
            "shard": ["a", "x/../../evil", "a", "a"],
        }
    )
    out = validate_rows(table, str(tmp_path)).to_pylist()
    assert [r["error_code"] for r in out] == ["", "invalid_shard", "", ""]
    assert out[3]["scene_id"] is None


def test_a_scenes_failures_are_judged_again_every_run_other_failures_are_carried():
    from pipeline.resume import reusable_state

    codes = ["scene_invalid", "upstream_failed", "bad_bbox"]
    state = pa.Table.from_pylist(
        [
            {"pair_id": f"p{i}", "status": "failed", "error_code": c, "model_digest": "m", "settings_digest": "s"}
            for i, c in enumerate(codes)
        ],
        schema=state_schema(),
    )
    kept = reusable_state(state, "m", "s", None, retry_failed=False)
    assert kept["error_code"].to_pylist() == ["bad_bbox"]  # a fixed scene renders without --retry-failed
