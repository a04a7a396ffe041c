"""Scenes (iterative decoration): a scene's steps planned together, then rendered in order.

    resume_stage ─▶ (group by scene: Ray Data hash shuffle) plan_scene ─▶ prepare ─▶ render ─▶ finish

A manifest with `scene_id` / `step` columns gets one more group-by after the resume stage, on
`GROUP` (the scene_id, or "#<state bucket>" for rows outside scenes, which pass untouched), so
that all rows of a scene meet whatever files they sit in. `plan_scene` then:

1. checks the scene: steps 1..n, no gap, no repeat, n <= `max_scene_steps`, and every later
   step's `context_uri` empty or step 1's; a bad scene fails every row `scene_invalid`;
2. decides what to render: a step is reused only if it is done *and* its `context_digest` equals
   its predecessor's `pixels_digest` (what that step's output is now), and every earlier step
   is reused too; from the first step that is not, every later step renders. A failed step
   fails every later one `upstream_failed`, naming it;
3. packs the steps that render into their first one's row (`SCENE_REST`: the others' rows as
   Arrow IPC), so that a scene travels through prepare and into the model actor as one row,
   never split across blocks. A first step after reused ones is rendered into the previous
   step's lossless pixels (`SCENE_CONTEXT`: `scenes/<scene_id>/<pair_id>.png`, written by the
   finish stage).

The prepare stage fetches and checks the later steps' products and masks (`prepare_rest`). The
render stage renders every block's plain rows and first steps in one model call, then
`unroll`s the scenes: each next step is cut from the previous step's pixels (pasted back as the
finish stage does, no encode between) and all of the block's next steps go in one model call,
a wave per step. The later steps leave as rows of their own.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import compose, storage
from pipeline.config import RENDER_DEFAULTS
from pipeline.output.layout import Layout
from pipeline.payload import RENDERED, Sizes, unpack_photo
from pipeline.schema import NAME_RULE, PREV, RENDER, REUSE, RowError, conform, is_safe_name, set_columns, show

__all__ = [
    "GROUP",
    "SCENE_REST",
    "SCENE_CONTEXT",
    "SceneConfig",
    "group_keys",
    "plan_scene",
    "prepare_rest",
    "unroll",
    "pixels_digest",
    "read_scene_context",
]

GROUP = "_group"  # the scene group-by's key: scene_id, or "#<bucket>" outside scenes
SCENE_REST = "scene_rest"  # binary: Arrow IPC of the steps rendered after this row, into its result
SCENE_CONTEXT = "scene_context"  # string: the pixels this step is rendered into (null: its context_uri)
_FETCHED = ("scene_product", "scene_mask")  # a later step's inputs, fetched by the prepare stage


@dataclass(frozen=True)
class SceneConfig:
    output: str  # the run's --output (the scene pixels under it)
    max_scene_steps: int = RENDER_DEFAULTS.max_scene_steps
    num_cpus: float = RENDER_DEFAULTS.cpu_stage_cpus

    def map_options(self) -> dict:
        return {"num_cpus": self.num_cpus}


def pixels_digest(pixels: np.ndarray) -> str:
    """sha256 of an H x W x 3 uint8 image's pixels and size: a step's `context_digest` is its
    predecessor's `pixels_digest` as long as that step's output has not changed."""
    h, w = pixels.shape[:2]
    return hashlib.sha256(f"{h}x{w}:".encode() + np.ascontiguousarray(pixels).tobytes()).hexdigest()


def group_keys(scene_ids: pa.ChunkedArray | pa.Array, buckets: pa.ChunkedArray | pa.Array) -> pa.Array:
    """scene_id, or "#<bucket>" ("#" is outside the name rule, so no scene_id can equal it)."""
    outside = pc.binary_join_element_wise("#", pc.cast(buckets, pa.string()), "")
    scene_ids = pc.cast(scene_ids, pa.string())
    return pc.if_else(pc.is_null(scene_ids), outside, scene_ids).combine_chunks()


def _pack(rows: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, rows.schema) as writer:
        writer.write_table(rows)
    return sink.getvalue().to_pybytes()


def _unpack(blob: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(blob)).read_all()


def plan_scene(rows: pa.Table, *, config: SceneConfig) -> pa.Table:
    """The stage (a `map_groups` function; a group = one scene's rows, or a bucket's plain rows)."""
    key = rows[GROUP][0].as_py()
    rows = rows.drop_columns([GROUP])
    if key.startswith("#"):
        return _with_scene_columns(rows)
    # a backfill's superseded rows are another partition's copy of the scene: they pass as they are
    superseded = pc.equal(rows["error_code"].fill_null(""), "superseded")
    passed = _with_scene_columns(rows.filter(superseded))
    rows = rows.filter(pc.invert(superseded))
    if rows.num_rows == 0:
        return passed
    planned = _plan_steps(rows, key, config)
    return pa.concat_tables([planned, passed.cast(planned.schema)]) if passed.num_rows else planned


def _with_scene_columns(rows: pa.Table) -> pa.Table:
    n = rows.num_rows
    return rows.append_column(SCENE_REST, pa.nulls(n, pa.large_binary())).append_column(
        SCENE_CONTEXT, pa.nulls(n, pa.string())
    )


def _plan_steps(rows: pa.Table, key: str, config: SceneConfig) -> pa.Table:
    """One scene's rows (superseded ones set aside): steps 1-3 of the module docstring."""
    n = rows.num_rows
    rows = rows.sort_by("step")
    col = {c: rows[c].to_pylist() for c in ("pair_id", "step", "context_uri", "action", "error_code", "error_message")}
    prev = {c: rows[PREV + c].to_pylist() for c in ("status", "error_code", "context_digest", "pixels_digest")}
    codes, messages, action = col["error_code"], col["error_message"], col["action"]
    if problem := _scene_problem(key, col["step"], col["context_uri"], config.max_scene_steps):
        for i in range(n):
            if codes[i] not in ("invalid_pair_id", "duplicate_pair_id"):
                codes[i], messages[i], action[i] = "scene_invalid", f"scene {key!r}: {problem}", RENDER
        return _with(rows, codes, messages, action, [None] * n, [None] * n)
    first_render, failed = None, None
    for i in range(n):
        if failed is not None:  # an earlier step failed: nothing to render this one into
            if not (action[i] == REUSE and prev["error_code"][i] == "upstream_failed"):
                codes[i], action[i] = "upstream_failed", RENDER
                messages[i] = f"step {col['step'][failed]} ({col['pair_id'][failed]}) of scene {key!r} failed"
            continue
        if first_render is None:
            # a step is done only if it was rendered as a scene step, into its predecessor's
            # current pixels (a pair rendered before as a plain row has no digests)
            chained = prev["pixels_digest"][i] is not None and (
                i == 0
                or (
                    prev["context_digest"][i] is not None and prev["context_digest"][i] == prev["pixels_digest"][i - 1]
                )
            )
            if action[i] == REUSE and prev["status"][i] != "ok":
                chained = True  # a carried failure has no pixels: it stays carried (--retry-failed)
            if action[i] == REUSE and chained:
                failed = i if prev["status"][i] != "ok" else None  # a carried failure
                continue
            first_render = i
        action[i] = RENDER
        if codes[i]:
            failed = i
    # a later step's row names the photo it decorates (its own context_uri may be empty)
    rows = set_columns(rows, {"context_uri": pa.array([col["context_uri"][0]] * n, pa.string())})
    rest, context = [None] * n, [None] * n
    lead = first_render
    if lead is not None and not codes[lead]:
        stop = next((i for i in range(lead + 1, n) if codes[i]), n)
        if stop > lead + 1:  # the later steps as this plan leaves them (to render, every one)
            planned = _with(rows, codes, messages, action, rest, context).slice(lead + 1, stop - lead - 1)
            rest[lead] = _pack(planned)
        if lead > 0:
            context[lead] = Layout(config.output).scene_pixels(key, col["pair_id"][lead - 1])
        keep = [i for i in range(n) if not lead < i < stop]
    else:
        keep = list(range(n))
    table = _with(rows, codes, messages, action, rest, context)
    return table.take(pa.array(keep, pa.int64()))


def _scene_problem(key: str, steps: list, contexts: list, max_steps: int) -> str | None:
    if not is_safe_name(key):
        return f"scene_id {show(key)} must be {NAME_RULE}"
    if any(s is None or s < 1 for s in steps):
        return "every row of a scene needs a step >= 1"
    if len(steps) > max_steps:
        return f"{len(steps)} steps, over --max-scene-steps {max_steps}"
    if len(set(steps)) < len(steps):
        repeated = sorted({s for s in steps if steps.count(s) > 1})
        return f"step(s) {repeated} given more than once"
    if steps != list(range(1, len(steps) + 1)):
        missing = sorted(set(range(1, len(steps) + 1)) - set(steps))  # bounded: len <= max_steps
        return f"steps {[min(s, 10**9) for s in steps]} have a gap: missing {missing}"
    for step, uri in zip(steps[1:], contexts[1:]):
        if uri is not None and uri != contexts[0]:
            return f"step {step}'s context_uri is not step 1's (a later step is rendered into the previous one)"
    return None


def _with(rows: pa.Table, codes, messages, action, rest, context) -> pa.Table:
    return set_columns(
        rows,
        {
            "error_code": pa.array(codes, pa.string()),
            "error_message": pa.array(messages, pa.string()),
            "action": pa.array(action, pa.string()),
            SCENE_REST: pa.array(rest, pa.large_binary()),
            SCENE_CONTEXT: pa.array(context, pa.string()),
        },
    )


def prepare_rest(blob: bytes, photo: np.ndarray, check: Callable, fetch: Callable) -> bytes:
    """The prepare stage's part: each later step's product and mask fetched (`fetch(uri)`) and
    checked against the photo's size (`check(photo, product, mask, bbox)` raises RowError)."""
    rest = _unpack(blob)
    col = {c: rest[c].to_pylist() for c in ("product_uri", "mask_uri", "bbox", "error_code", "error_message")}
    fetched = {c: [None] * rest.num_rows for c in _FETCHED}
    for i in range(rest.num_rows):
        try:
            product = fetch(col["product_uri"][i])
            mask = None if col["mask_uri"][i] is None else fetch(col["mask_uri"][i])
            check(photo, product, mask, col["bbox"][i])
        except RowError as e:
            col["error_code"][i], col["error_message"][i] = e.code, e.message
            continue
        except Exception as e:  # noqa: BLE001 - an input no check foresaw fails its own step, not the scene's first
            col["error_code"][i], col["error_message"][i] = "prepare_failed", f"{type(e).__name__}: {e}"[:500]
            continue
        fetched["scene_product"][i], fetched["scene_mask"][i] = product, mask
    columns = {c: pa.array(v, pa.large_binary()) for c, v in fetched.items()}
    columns |= {c: pa.array(col[c], pa.string()) for c in ("error_code", "error_message")}
    return _pack(set_columns(rest, columns))


def unroll(
    out: pa.Table, render: Callable[[pa.Table], pa.Table], cut: Callable, feather_px: int, resolution: int
) -> pa.Table:
    """The render stage's part. `out`: the rendered block (plain rows, scenes' first steps with
    their `SCENE_REST`); `render(block)`: the stage's own block rendering; `cut(photo, product,
    mask, bbox)` -> the step's payload columns (raises RowError); `feather_px`: the paste-back's,
    as the finish stage will paste; `resolution`: the renders' R. Returns every row, the later
    steps appended, without the scene columns."""
    blocks, wave = [out], out
    while wave is not None and SCENE_REST in wave.column_names:
        nexts, waiting = [], []
        rests = wave[SCENE_REST].to_pylist()
        for i in (i for i, blob in enumerate(rests) if blob is not None):
            rest = _unpack(rests[i])
            step, later = _next_step(wave, i, rest.slice(0, 1), cut, feather_px, resolution)
            if later is not None and rest.num_rows > 1:
                step = set_columns(step, {SCENE_REST: pa.array([_pack(rest.slice(1))], pa.large_binary())})
            elif rest.num_rows > 1:  # this step failed: the ones after it fail upstream
                blocks.append(_upstream_failed(rest.slice(1), step, out.schema))
            (nexts if later is not None else waiting).append(step)
        blocks += [conform(w, out.schema) for w in waiting]
        wave = render(pa.concat_tables([conform(s, _input_schema(out.schema, s)) for s in nexts])) if nexts else None
        if wave is not None:
            blocks.append(wave)
    drop = [c for c in (SCENE_REST, SCENE_CONTEXT, *_FETCHED) if c in out.column_names]
    return pa.concat_tables([conform(b, out.schema) for b in blocks]).drop_columns(drop)


def _input_schema(out_schema: pa.Schema, step: pa.Table) -> pa.Schema:
    """A wave's input block: the step's columns as the rendered block types them."""
    types = {f.name: f.type for f in out_schema}
    return pa.schema([pa.field(f.name, types.get(f.name, f.type)) for f in step.schema])


def _next_step(
    wave: pa.Table, i: int, step: pa.Table, cut: Callable, feather_px: int, resolution: int
) -> tuple[pa.Table, bool | None]:
    """Step row `step` cut from wave row i's result: (the row, True) to render, or (the failed
    row, None)."""
    code = wave["error_code"][i].as_py()
    name = f"step {wave['step'][i].as_py()} ({wave['pair_id'][i].as_py()})"
    if code:
        return _fail(step, "upstream_failed", f"{name} of scene {wave['scene_id'][i].as_py()!r} failed"), None
    if step["error_code"][0].as_py():  # its product or mask failed in the prepare stage
        return step, None
    photo = _pasted(wave, i, feather_px, resolution)
    try:
        columns = cut(photo, step["scene_product"][0].as_py(), step["scene_mask"][0].as_py(), step["bbox"][0].as_py())
    except RowError as e:
        return _fail(step, e.code, e.message), None
    except Exception as e:  # noqa: BLE001 - a step no check foresaw fails alone, not the actor's block
        return _fail(step, "prepare_failed", f"{type(e).__name__}: {e}"[:500]), None
    return set_columns(step.drop_columns(list(_FETCHED)), columns), True


def _pasted(wave: pa.Table, i: int, feather_px: int, resolution: int) -> np.ndarray:
    """Wave row i's render pasted into the pixels it was rendered into, as the finish stage does."""
    context, hole = unpack_photo(wave, i)
    rendered = RENDERED.unpack(wave[RENDERED.name][i].as_buffer(), Sizes(resolution=resolution))
    box = tuple(wave["crop_box"][i].as_py())
    return np.asarray(compose.postprocess(context, rendered, hole, box, feather_px))


def _fail(rows: pa.Table, code: str, message: str) -> pa.Table:
    n = rows.num_rows
    return set_columns(
        rows, {"error_code": pa.array([code] * n, pa.string()), "error_message": pa.array([message] * n, pa.string())}
    )


def _upstream_failed(rest: pa.Table, failed: pa.Table, schema: pa.Schema) -> pa.Table:
    """The steps after a failed one; the message names the step that failed first."""
    if failed["error_code"][0].as_py() == "upstream_failed":
        message = failed["error_message"][0].as_py()
    else:
        name = f"step {failed['step'][0].as_py()} ({failed['pair_id'][0].as_py()})"
        message = f"{name} of scene {failed['scene_id'][0].as_py()!r} failed"
    return conform(_fail(rest, "upstream_failed", message), schema)


def read_scene_context(uri: str) -> bytes:
    """The lossless pixels of a reused previous step; a missing one fails the step image_missing."""
    try:
        return storage.read_bytes(uri)
    except FileNotFoundError as e:
        raise RowError(
            "image_missing", f"the previous step's pixels {uri} are gone: --force re-renders the scene"
        ) from e
