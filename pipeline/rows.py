"""Row validation: each manifest row checked and normalised, a bad row turned into data.

    table = validate_rows(batch, manifest_folder, conflicts, partition)   # a pyarrow Table back

Arrow in, Arrow out: the read stage hands `manifest.iter_batches` batches straight here. A
problem becomes the row's `error_code` and `error_message` (the row is later a `failed` row of
the output manifest); the job carries on. `conflicts` (`manifest.pair_id_conflicts`) says
which pair_ids repeat; `partition` is the batch's file's, for a backfill. Driver-safe.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.manifest import PairIdConflicts
from pipeline.regions import bbox_too_small
from pipeline.schema import is_missing, is_safe_name, name_problem, parse_bbox, set_columns, show

__all__ = ["validate_rows", "sample_problem", "stable_seed", "variant_seeds", "VariantRows", "SAMPLE_ROWS"]

# Rows `sample_problem` validates on the driver before Ray starts (the first ones of the manifest).
SAMPLE_ROWS = 64

VALIDATED_TYPES = {
    "error_code": pa.string(),
    "error_message": pa.string(),
    "context_uri": pa.string(),
    "product_uri": pa.string(),
    "mask_uri": pa.string(),
    "bbox": pa.list_(pa.float64()),
    "seed": pa.int64(),
    "shard": pa.string(),
}


def stable_seed(pair_id: str) -> int:
    """Default seed: the first 8 bytes of sha256(pair_id), big-endian, masked to 63 bits.

    Stable across processes and Python versions (unlike `hash()`), and non-negative int64.
    """
    digest = hashlib.sha256(pair_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def variant_seeds(seed: int, variants: int) -> list[int]:
    """The seeds of a pair's `variants` renders: its own seed first, then
    sha256("<seed>/<k>")'s first 8 bytes masked to 63 bits, as `stable_seed`."""
    derived = [
        int.from_bytes(hashlib.sha256(f"{seed}/{k}".encode()).digest()[:8], "big") & (2**63 - 1)
        for k in range(1, variants)
    ]
    return [int(seed), *derived]


class VariantRows:
    """A model call's rows when each pair renders several variants: pair j's are rows first[j] ..
    first[j+1] - 1, one pair after the other, seeded `variant_seeds(seed, counts[j])`. The render
    stage's pairs all have `--variants` rows; a Serve batch's requests each their own count."""

    def __init__(self, seeds: list[int], counts: list[int]):
        self.counts = np.asarray(counts, dtype=np.int64)
        self.first = np.concatenate([[0], np.cumsum(self.counts)])
        self.pair = np.repeat(np.arange(len(self.counts)), self.counts)  # each row's pair
        self.seeds = np.asarray(
            [s for seed, n in zip(seeds, counts) for s in variant_seeds(seed, n)], dtype=np.int64
        )  # each row's seed

    def __len__(self) -> int:
        return int(self.first[-1])

    def rows(self, pairs) -> np.ndarray:
        """The rows of pair `pairs` (an index, or several: their rows in that order)."""
        spans = [np.arange(self.first[j], self.first[j + 1]) for j in np.atleast_1d(pairs)]
        return np.concatenate(spans) if spans else np.zeros(0, dtype=np.int64)

    def repeat(self, per_pair: np.ndarray) -> np.ndarray:
        """`per_pair` (one entry per pair, stacked) once per row."""
        return np.repeat(per_pair, self.counts, axis=0)


def validate_rows(
    batch: pa.Table | pa.RecordBatch,
    base_dir: str,
    conflicts: PairIdConflicts = PairIdConflicts(),
    partition: str | None = None,
) -> pa.Table:
    """Check each row and normalise the columns later stages rely on. A bad row becomes data.

    Every input column is kept and these are set:
    - `error_code`, `error_message`: "" when the row is fine, else the first problem found:
      `invalid_pair_id`, `superseded` (a backfill row whose pair_id a later partition of the
      range has: `partition` is this batch's, see `manifest.PairIdConflicts`),
      `duplicate_pair_id`, `missing_uri`, `region_missing`, `region_ambiguous`, `bad_bbox`,
      `region_too_small` (a bbox under 8 px a side in any photo, e.g. a normalised one), `invalid_shard`;
    - `context_uri`, `product_uri`, `mask_uri`: relative paths resolved against `base_dir` (the
      manifest file's folder; URIs with a scheme and absolute paths are kept: the allowlist
      judges them later); None when empty;
    - `bbox`: `[x0, y0, x1, y1]` floats or None (whether it lies inside the photo is only known
      after decoding: `regions.region_from_bbox`);
    - `seed`: int64, the given one or `stable_seed(pair_id)`;
    - `shard`: as given (`manifest.iter_batches` already filled the default).
    """
    table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
    absent = [None] * table.num_rows
    column = {
        name: table.column(name).to_pylist() if name in table.column_names else absent
        for name in ("pair_id", "context_uri", "product_uri", "mask_uri", "bbox", "seed", "shard", "scene_id", "step")
    }
    out: dict[str, list] = {name: [] for name in VALIDATED_TYPES}
    # a blank scene_id (an empty CSV cell) is no scene
    scene_ids = [None if is_missing(v) or not str(v).strip() else v for v in column["scene_id"]]
    for i in range(table.num_rows):
        pair_id, shard = _text(column["pair_id"][i]), _text(column["shard"][i])
        uris = [_text(column[name][i]) for name in ("context_uri", "product_uri", "mask_uri")]
        context_uri, product_uri, mask_uri = (_resolve(u, base_dir) if u and u.strip() else None for u in uris)
        raw_bbox = column["bbox"][i]
        bbox_given = not is_missing(raw_bbox) and not (isinstance(raw_bbox, str) and not raw_bbox.strip())
        bbox, bbox_problem = parse_bbox(raw_bbox) if bbox_given else (None, None)
        superseded = pair_id not in conflicts.duplicates and conflicts.superseded(pair_id, partition)
        if superseded and is_safe_name(pair_id):
            code, message = (
                "superseded",
                f"pair_id {pair_id!r} is also in the later partition {conflicts.latest[pair_id]}: "
                "that row is rendered",
            )
        else:
            # a later scene step is rendered into its predecessor: no context of its own to check
            later = _later_step(column["step"][i]) and context_uri is None
            code, message = _check(
                pair_id,
                "(the previous step)" if later else context_uri,
                product_uri,
                mask_uri,
                bbox_given,
                bbox,
                bbox_problem,
                shard,
                conflicts.duplicates,
            )
            scene_problem = _scene_problem(scene_ids[i], column["step"][i])
            if scene_problem and code not in ("invalid_pair_id", "duplicate_pair_id"):
                code, message = "scene_invalid", scene_problem
        for name, value in zip(
            out, (code, message, context_uri, product_uri, mask_uri, bbox, _seed(column["seed"][i], pair_id), shard)
        ):
            out[name].append(value)
    columns = {name: pa.array(values, VALIDATED_TYPES[name]) for name, values in out.items()}
    if "scene_id" in table.column_names:
        columns["scene_id"] = pa.array(scene_ids, pa.string())
    return set_columns(table, columns)


def sample_problem(plan, rows: int = SAMPLE_ROWS) -> str | None:
    """Why the run should not start, or None: the manifest's first `rows` rows (all of them
    when it has fewer) all fail validation with the same code, so a run would fail every row
    after Ray's start-up. Rows failing in different ways, or some good ones, are a run's business."""
    from pipeline import manifest

    batch = next(manifest.iter_batches(plan, batch_size=rows), None)
    if batch is None or batch.num_rows == 0:
        return None
    checked = validate_rows(batch, manifest.file_folder(plan.files[0]))
    codes = set(checked["error_code"].to_pylist())
    if len(codes) != 1 or "" in codes:
        return None
    code, message = codes.pop(), checked["error_message"][0].as_py()
    return (
        f"manifest {plan.uri}: all of its first {checked.num_rows} rows fail with {code} (the first: {message}); "
        "nothing was rendered: fix the manifest"
    )


def _check(
    pair_id, context_uri, product_uri, mask_uri, bbox_given: bool, bbox, bbox_problem, shard, duplicates
) -> tuple[str, str]:
    """(error_code, message) of the row's first problem, ("", "") for a good row."""
    problem = name_problem("pair_id", pair_id)
    if problem:
        return "invalid_pair_id", problem
    if pair_id in duplicates:
        return "duplicate_pair_id", f"pair_id {pair_id!r} occurs more than once in the manifest"
    if context_uri is None or product_uri is None:
        return "missing_uri", f"{'context_uri' if context_uri is None else 'product_uri'} is empty"
    if mask_uri is None and not bbox_given:
        return "region_missing", "neither mask_uri nor bbox is given: one marks the region to repaint"
    if mask_uri is not None and bbox_given:
        return "region_ambiguous", "both mask_uri and bbox are given: give one"
    if bbox_problem:
        return "bad_bbox", bbox_problem
    if bbox is not None and (problem := bbox_too_small(bbox)):  # in any photo: say it before fetching
        return "region_too_small", problem
    problem = name_problem("shard", shard)
    if problem:
        return "invalid_shard", problem
    return "", ""


def _scene_problem(scene_id: Any, step: Any) -> str | None:
    """Why a row's scene columns are unusable (None: no scene, or a good one)."""
    if is_missing(scene_id) and is_missing(step):
        return None
    if is_missing(scene_id) or is_missing(step):
        return "scene_id and step go together: give both or neither"
    if problem := name_problem("scene_id", _text(scene_id)):
        return problem
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 1:
        return f"step must be an integer >= 1, got {show(step)}"
    return None


def _later_step(step: Any) -> bool:
    return isinstance(step, (int, np.integer)) and not isinstance(step, bool) and step > 1


def _text(value: Any) -> str | None:
    if is_missing(value):
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _resolve(uri: str, base: str) -> str:
    """Relative paths join the manifest's folder; anything with a scheme or absolute stays."""
    if "://" in uri or uri.startswith(("file:", "/")):
        return uri
    if storage.is_s3(base):
        bucket_and_key = posixpath.normpath(posixpath.join(base[len("s3://") :], uri))
        return "s3://" + bucket_and_key
    return os.path.normpath(os.path.join(base, uri))


def _seed(value: Any, pair_id: str | None) -> int:
    if is_missing(value):
        return stable_seed(pair_id or "")
    # Ray turns an int64 column with nulls into float64; those are whole numbers.
    return int(value)
