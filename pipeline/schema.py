"""The contract, in one module: names, bbox, error and exit codes, row actions, block columns.

Everything that more than one module has to agree on lives here, and only here:

- the name rule that `pair_id`, `run_id` and `shard` obey (they name objects under
  `--output`, so nothing may escape it) and the bbox parser;
- the row error codes (a bad row becomes data, never a crash), exit codes and CLI choices;
- what each stage of the Ray Data graph reads and adds (`STAGES`), checked by
  `require_columns` at every stage's door, and the output-manifest and state schemas, both
  derived from `OUTPUT_FIELDS`;
- the block helpers: blocks are pyarrow Tables with explicit types (Arrow keeps a nullable
  list column a list column in every block; numpy batches turn the same column into a tensor
  in one block and objects in the next, which Ray cannot concatenate); the image payloads'
  bytes are `pipeline.payload`'s.

Driver-safe: numpy and pyarrow only.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.payload import CONTEXT_RAW, HOLE_BITS, MODEL_INPUTS, PAYLOAD_COLUMNS, RENDERED, VARIANT_RENDERS

__all__ = [
    "NAME_RULE",
    "is_safe_name",
    "safe_name",
    "name_problem",
    "parse_bbox",
    "normalised_hint",
    "show",
    "is_missing",
    "RowError",
    "ERROR_CODES",
    "OK",
    "FAILED",
    "SKIPPED",
    "EXIT_OK",
    "EXIT_ERROR",
    "EXIT_REFUSED",
    "EXIT_TOO_MANY_FAILED",
    "IMAGE_FORMATS",
    "EXTENSIONS",
    "MEDIA_TYPES",
    "SCHEDULERS",
    "SELECTIONS",
    "FILM_MODES",
    "FUSION_FORMS",
    "DEFAULT_FILM_MODE",
    "PRESETS",
    "RENDER",
    "REUSE",
    "PREV",
    "BUCKET",
    "FILE_INDEX",
    "CARRIED_COLUMNS",
    "StageColumns",
    "STAGES",
    "MissingColumns",
    "require_columns",
    "conform",
    "set_columns",
    "OUTPUT_FIELDS",
    "STATE_COLUMNS",
    "output_schema",
    "state_schema",
]

# -- names ------------------------------------------------------------------------------------

# pair_id, run_id and shard: 1-200 of these characters, no leading dot. `\Z`, not `$`: `$`
# also matches before a trailing newline, so "run1\n" would pass and name a key.
_NAME_RE = re.compile(r"(?!\.)[A-Za-z0-9._=-]{1,200}\Z")
NAME_RULE = "1-200 characters of [A-Za-z0-9._=-], not starting with '.'"


def is_safe_name(value: object) -> bool:
    """True when `value` may name an object under --output (pair_id, run_id, shard)."""
    return isinstance(value, str) and _NAME_RE.match(value) is not None


def name_problem(kind: str, value: object) -> str | None:
    """None for a safe name, else the message that names the bad value: "run_id 'a/b' must be ..."."""
    if is_safe_name(value):
        return None
    return f"{kind} {show(value)} must be {NAME_RULE}"


def safe_name(text: str, fallback: str) -> str:
    """`text` made to obey the name rule (other characters become `_`, no leading dot, at most
    200): for names the project derives itself (a file's default shard), never for names users
    give, which are refused instead."""
    name = re.sub(r"[^A-Za-z0-9._=-]", "_", text).lstrip(".")[:200]
    return name or fallback


def show(value: object) -> str:
    """A value for an error message: repr'd (a newline shows as \\n), long ones cut."""
    if value is None:
        return "(null)"
    text = value if isinstance(value, str) else str(value)
    return repr(text if len(text) <= 60 else text[:57] + "...")


# -- bbox -------------------------------------------------------------------------------------


def is_missing(value: Any) -> bool:
    """None, NaN (pandas/numpy nulls) and pandas.NA."""
    if value is None:
        return True
    if isinstance(value, (float, np.floating)):
        return math.isnan(value)
    return type(value).__name__ == "NAType"


def parse_bbox(value: Any) -> tuple[list[float] | None, str | None]:
    """(bbox, None) or (None, why it is bad) for a sequence of 4 numbers or a JSON array string.

    Checks what can be known without the photo: 4 finite numbers, none negative, x0 < x1 and
    y0 < y1. Whether the box lies inside the photo is `regions.region_from_bbox`'s question."""
    raw = value
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None, f"bbox {show(raw)} is not a JSON array [x0, y0, x1, y1]"
    try:
        values = list(value)
    except TypeError:
        return None, f"bbox {show(str(raw))} is not a list [x0, y0, x1, y1]"
    if len(values) != 4 or any(isinstance(v, (bool, np.bool_, str)) or is_missing(v) for v in values):
        return None, f"bbox {show(str(raw))} must be 4 numbers [x0, y0, x1, y1]"
    try:
        x0, y0, x1, y1 = (float(v) for v in values)
    except (TypeError, ValueError):
        return None, f"bbox {show(str(raw))} must be 4 numbers [x0, y0, x1, y1]"
    box = [x0, y0, x1, y1]
    if not all(math.isfinite(v) for v in box):
        return None, f"bbox {box} has a value that is not finite"
    if min(box) < 0:
        return None, f"bbox {box} has a negative coordinate"
    if x1 <= x0 or y1 <= y0:
        return None, f"bbox {box} is empty or inverted: need x0 < x1 and y0 < y1" + normalised_hint(box)
    return box, None


def normalised_hint(box: list[float]) -> str:
    """A bbox problem's hint when the box looks normalised (every value in [0, 1]), else ''."""
    if all(0.0 <= v <= 1.0 for v in box):
        return "; bbox is in pixels of the displayed photo, and this one looks normalised to [0, 1]"
    return ""


# -- row errors and exit codes --------------------------------------------------------------------


class RowError(Exception):
    """A row-level problem: becomes `status=failed`, `error_code`, `error_message`, never a crash."""

    def __init__(self, code: str, message: str):
        if code not in ERROR_CODES:
            raise ValueError(f"unknown row error code {code!r}; add it to schema.ERROR_CODES")
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


# Every error_code an output-manifest row can carry, with what it means.
ERROR_CODES = {
    "invalid_pair_id": "pair_id breaks the name rule",
    "duplicate_pair_id": "the pair_id occurs more than once in the manifest",
    "missing_uri": "context_uri or product_uri is empty",
    "region_missing": "neither mask_uri nor bbox given",
    "region_ambiguous": "both mask_uri and bbox given",
    "bad_bbox": "bbox is not 4 finite, non-negative, ordered numbers inside the photo",
    "invalid_shard": "shard breaks the name rule",
    "uri_not_allowed": "an input URI outside the allowlist (never fetched)",
    "image_missing": "an input object does not exist",
    "image_unreadable": "not a readable image (broken, empty, truncated, unsupported)",
    "fetch_failed": "storage did not answer for an input",
    "too_large": "an image over the pixel limit (checked before decoding)",
    "mask_size_mismatch": "the mask is not the photo's displayed size",
    "region_empty": "the mask has no white pixel",
    "region_too_small": "the region is under 8 px on a side",
    "product_transparent": "the product has no opaque pixel",
    "prepare_failed": "an input no check foresaw failed to prepare",
    "oom": "the pair does not fit in GPU memory even alone",
    "worker_crash": "rendering the pair killed its worker three times",
    "superseded": "a backfill row whose pair_id is also in a later partition of the range (status skipped)",
    "scene_invalid": "a scene with a gap, a repeated step or too many steps, or a step with its own other context",
    "upstream_failed": "an earlier step of the row's scene failed, so there is nothing to render it into",
}
# A row's status: rendered, failed, or skipped (a backfill row superseded by a later partition's).
OK, FAILED, SKIPPED = "ok", "failed", "skipped"

EXIT_OK = 0  # finished; every row accounted for
EXIT_ERROR = 1  # anything else (storage down, a crash): see the run record
EXIT_REFUSED = 2  # refused before any work (usage, config, manifest, model, lock): nothing written
EXIT_TOO_MANY_FAILED = 3  # finished, but the failed fraction is over --max-failed-fraction

# -- CLI choices ------------------------------------------------------------------------------------

IMAGE_FORMATS = ("jpeg", "png", "webp")
EXTENSIONS = {"jpeg": "jpg", "png": "png", "webp": "webp"}
MEDIA_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
SCHEDULERS = ("ddim", "dpmpp")
SELECTIONS = ("identity", "clip")  # --select: how the best of --variants is chosen
FILM_MODES = ("spatial", "channel")
# The hint branch's fusion forms (a model folder records its form as the hint encoder's `film_mode`):
# the two FiLM modes, additive residuals (ControlNet), cross-attention (TryOnDiffusion), no hint branch.
FUSION_FORMS = (*FILM_MODES, "add", "xattn", "off")
# FiLM per pixel: the form that carries fine, spatial detail (the fusion table on the detail catalog,
# bench/RESULTS.md section detail; README "What the toy proves"). Channel FiLM, the default before,
# pools the hint into one gamma/beta per channel and cannot say where anything is; folders record
# their form, so channel models keep loading as channel.
DEFAULT_FILM_MODE = "spatial"
PRESETS = ("tiny", "sd15")

# -- block columns, stage by stage --------------------------------------------------------------------

RENDER, REUSE = "render", "reuse"  # a row's `action`: render it, or carry an earlier run's result over
PREV = "prev_"  # prefix of the carried-over result columns of a reused row
# The read stage tags each row with its pair's state bucket (output/state.py bucket_of) and its
# manifest file (plan.files[i]); the resume stage groups on the first and drops both.
BUCKET, FILE_INDEX = "_bucket", "_file_index"


@dataclass(frozen=True)
class StageColumns:
    """What a stage needs in a block (`requires`) and what it adds (`adds`) or takes away (`drops`)."""

    requires: tuple[str, ...]
    adds: tuple[str, ...] = ()
    drops: tuple[str, ...] = ()


# The output manifest's own columns (DESIGN.md "Output layout"), after the input columns.
OUTPUT_FIELDS = (
    pa.field("status", pa.string()),
    pa.field("error_code", pa.string()),
    pa.field("error_message", pa.string()),
    pa.field("output_uri", pa.string()),
    pa.field("width", pa.int64()),
    pa.field("height", pa.int64()),
    pa.field("crop_box", pa.list_(pa.int64())),
    pa.field("seed", pa.int64()),
    pa.field("model_digest", pa.string()),
    pa.field("settings_digest", pa.string()),
    pa.field("steps", pa.int64()),
    pa.field("guidance_scale", pa.float64()),
    pa.field("scheduler", pa.string()),
    pa.field("clip_score", pa.float64()),
    pa.field("identity_score", pa.float64()),
    pa.field("needs_review", pa.bool_()),
    pa.field("variant_seeds", pa.list_(pa.int64())),
    pa.field("variant_scores", pa.list_(pa.float64())),
    pa.field("chosen_variant", pa.int64()),
    pa.field("context_digest", pa.string()),
    pa.field("pixels_digest", pa.string()),
    # what the row was rendered from: its input columns (resume.inputs_digest) and, for ok rows,
    # the input files' versions (storage.version: size + mtime, an S3 ETag), for --verify-inputs
    pa.field("inputs_digest", pa.string()),
    pa.field("inputs_version", pa.string()),
    pa.field("run_id", pa.string()),
    pa.field("attempt", pa.int64()),
    pa.field("render_ms", pa.float64()),
    pa.field("finished_at", pa.string()),
)
# What a later run needs to skip a pair and still write its row: a subset of OUTPUT_FIELDS.
STATE_COLUMNS = (
    "pair_id",
    "status",
    "error_code",
    "error_message",
    "output_uri",
    "width",
    "height",
    "crop_box",
    "seed",
    "model_digest",
    "settings_digest",
    "clip_score",
    "identity_score",
    "variant_seeds",
    "variant_scores",
    "chosen_variant",
    "context_digest",
    "pixels_digest",
    "inputs_digest",
    "inputs_version",
    "render_ms",
    "finished_at",
    "run_id",
)
# Results copied from the earlier row into a reused row (as PREV + name); a reused row's
# inputs_digest is its own (equal to the earlier row's, or adopted: resume.py).
CARRIED_COLUMNS = tuple(
    c
    for c in STATE_COLUMNS
    if c not in ("pair_id", "seed", "model_digest", "settings_digest", "run_id", "inputs_digest")
)

_VALIDATED = (
    "pair_id",
    "context_uri",
    "product_uri",
    "mask_uri",
    "bbox",
    "seed",
    "shard",
    "error_code",
    "error_message",
)
_QUALITY = ("feat_gen", "feat_real", "clip_score", "clip_floor")
_IDENTITY = ("identity_score", "variant_seeds", "variant_scores", "chosen_variant", VARIANT_RENDERS.name)

STAGES = {
    "read": StageColumns(requires=(), adds=(BUCKET, FILE_INDEX)),
    "resume": StageColumns(
        requires=("pair_id", BUCKET, FILE_INDEX),
        adds=(*_VALIDATED, "inputs_digest", "action", *(PREV + c for c in CARRIED_COLUMNS)),
        drops=(BUCKET, FILE_INDEX),
    ),
    "prepare": StageColumns(
        requires=(
            "pair_id",
            "context_uri",
            "product_uri",
            "mask_uri",
            "bbox",
            "error_code",
            "error_message",
            "action",
        ),
        adds=(*PAYLOAD_COLUMNS, "width", "height", "crop_box", "prepare_ms"),
    ),
    "render": StageColumns(
        requires=("pair_id", *MODEL_INPUTS, "seed", "error_code", "error_message", "action"),
        adds=(RENDERED.name, "render_attempts", "render_ms", "render_ended_at", *_QUALITY, *_IDENTITY),
        drops=MODEL_INPUTS,
    ),
    "finish": StageColumns(
        requires=(
            "pair_id",
            "action",
            "error_code",
            "error_message",
            "width",
            "height",
            "crop_box",
            "render_ms",
            CONTEXT_RAW.name,
            HOLE_BITS.name,
            RENDERED.name,
            "render_attempts",
            *_IDENTITY,
            *(PREV + c for c in CARRIED_COLUMNS),
        ),
        adds=tuple(f.name for f in OUTPUT_FIELDS if f.name not in ("seed", "inputs_digest")) + ("postprocess_ms",),
        drops=(
            CONTEXT_RAW.name,
            HOLE_BITS.name,
            RENDERED.name,
            VARIANT_RENDERS.name,
            "action",
            "render_attempts",
            *(PREV + c for c in CARRIED_COLUMNS),
        ),
    ),
}


class MissingColumns(KeyError):
    """A stage got a block without a column it needs: a wiring bug, never a bad row."""

    def __str__(self) -> str:
        return str(self.args[0])


def require_columns(stage: str, block: pa.Table) -> None:
    """Raise MissingColumns naming `stage` and every column of `STAGES[stage].requires` the block lacks."""
    missing = [c for c in STAGES[stage].requires if c not in block.column_names]
    if missing:
        raise MissingColumns(f"{stage} stage: the block lacks column(s) {missing} (it has {block.column_names})")


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with exactly `schema`'s columns, in its order and types; columns it lacks as nulls."""
    for f in schema:
        if f.name not in table.column_names:
            table = table.append_column(f.name, pa.nulls(table.num_rows, f.type))
    return table.select(schema.names).cast(schema)


def set_columns(table: pa.Table, columns: dict[str, pa.Array]) -> pa.Table:
    """Replace or append columns by name."""
    for name, values in columns.items():
        index = table.schema.get_field_index(name)
        table = table.set_column(index, name, values) if index >= 0 else table.append_column(name, values)
    return table


# -- output manifest and state schemas ------------------------------------------------------------------

INTERNAL_PREFIX = "_"  # _source_file, _source_row: tracing aids of the read stage, not written


def output_schema(input_schema: pa.Schema) -> pa.Schema:
    """The output manifest's schema: the input columns (bbox normalised to list<double>, `shard`
    always there, internal ones dropped), then OUTPUT_FIELDS."""
    names = {f.name for f in OUTPUT_FIELDS}
    inputs = []
    for f in input_schema:
        if f.name in names or f.name.startswith(INTERNAL_PREFIX):
            continue
        if f.name == "bbox":  # normalised: [x0, y0, x1, y1] floats, whatever the input format
            f = pa.field("bbox", pa.list_(pa.float64()))
        inputs.append(f)
    if "shard" not in {f.name for f in inputs}:
        inputs.append(pa.field("shard", pa.string()))
    return pa.schema(inputs + list(OUTPUT_FIELDS))


def state_schema() -> pa.Schema:
    """`state/done.parquet`: STATE_COLUMNS, typed as in the output manifest."""
    types = {f.name: f.type for f in OUTPUT_FIELDS} | {"pair_id": pa.string()}
    return pa.schema([(name, types[name]) for name in STATE_COLUMNS])
