"""Training rows: the render job's read, validation and preparation, run by the store's parts.

    manifest rows ─▶ read (read_stage.planned_batches: rows.validate_rows) ─▶ prepare (prepare_pair) ─▶ a store part

The same code as rendering, not a copy: `read_stage.planned_batches` validates each row
(`rows.validate_rows`, same error codes, same pair_id rule and duplicate check) and
`prepare_stage.prepare_pair` fetches under the same allowlist, decodes and cuts the model's
inputs (`compose.preprocess`: window, hole, product on grey and the hint, built from the product
at working resolution). A bad row keeps its error code and is skipped by training, counted.

Training needs one thing rendering does not: the hole as the mask's bounding box (DTC_MODEL.md
"Training": the hole is the fine mask or its bbox, p = 0.5 each) and the hint for that hole. A
mask row is therefore prepared twice by `prepare_pair`: with its mask, and with `bbox` = the
mask's bounding box in photo pixels. The crop window depends on the region's bounding box
only (`regions.crop_window`), so both give the same window and context pixels (checked), and
the second hint is the inference hint builder's own for the box hole. A bbox row's box variant
is the row itself (its payloads are left empty).

Driver-side: no torch (the prepare tasks import it inside the resize kernels). `train.store` runs
these functions in its Ray Data job, one part (a manifest file's row range) per task.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import manifest, regions
from pipeline.config import ConfigError
from pipeline.payload import BOX_SPECS, PAYLOAD_TYPE
from pipeline.schema import RowError, set_columns
from pipeline.stages.prepare_stage import PrepareConfig, prepare_pair
from pipeline.stages.read_stage import planned_batches
from pipeline.train.config import SPLITS

__all__ = ["TRAIN_PAYLOADS", "check_splits", "read_training_files", "prepare_training_batch", "RowCounts"]

# Payloads per row (`pipeline.payload`'s specs): the render job's `model_*` columns of the
# fine-mask preparation, and `box_*` of the bounding-box one (empty for bbox rows).
TRAIN_PAYLOADS = (
    "model_context",
    "model_hole",
    "model_product",
    "model_hint",
    "model_hint_mask",
    *(c.name for c in BOX_SPECS),
)
ROW_COLUMNS = ("pair_id", "context_uri", "product_uri", "mask_uri", "bbox", "split", "error_code", "error_message")


def check_splits(plan: manifest.ManifestPlan) -> None:
    """A `split` column, when there is one, is a string of `train` | `val` (empty = train):
    anything else refuses the manifest (ConfigError, exit 2) before any row is fetched."""
    if "split" not in plan.schema.names:
        return
    kind = plan.schema.field("split").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
        raise ConfigError(f"manifest {plan.uri}: column split must be a string (train|val), got {kind}")
    for batch in manifest.iter_columns(plan, ["split"]):
        values = set(pc.unique(batch.column("split")).to_pylist()) - {None, "", *SPLITS}
        if values:
            raise ConfigError(f"manifest {plan.uri}: split must be train or val (or empty), got {sorted(values)[:5]}")


def read_training_files(
    files: dict,
    *,
    plan: manifest.ManifestPlan,
    conflicts_ref: list,
    batch_rows: int = 64,
    row_range: tuple[int, int] | None = None,
):
    """The read stage (a generator over `{"file_index": [i, ...]}`): the render job's validated
    rows, with `split` normalised (empty -> train); `row_range`: only those rows of each file."""
    import ray

    conflicts = ray.get(conflicts_ref[0]) if conflicts_ref else manifest.PairIdConflicts()
    for i in files["file_index"]:
        for batch in planned_batches(plan, int(i), conflicts, None, batch_rows, row_range=row_range):
            split = batch["split"] if "split" in batch.column_names else pa.nulls(batch.num_rows, pa.string())
            split = pc.if_else(pc.or_kleene(pc.is_null(split), pc.equal(split, "")), "train", split.cast(pa.string()))
            batch = set_columns(batch, {"split": split})
            yield batch.select(list(ROW_COLUMNS))


def _box_variant(pair, config: PrepareConfig) -> dict:
    """The same photo and product prepared with the mask's bounding box as the region."""
    x0, y0, x1, y1 = regions.bounding_box(pair.hole)
    context_bytes, product_bytes, _ = pair.sources
    box = prepare_pair(context_bytes, product_bytes, None, [float(x0), float(y0), float(x1), float(y1)], config)
    if box.model["crop_box"] != pair.model["crop_box"] or not np.array_equal(
        box.model["context"], pair.model["context"]
    ):
        raise RowError("prepare_failed", "the bounding-box region gave another crop window than the mask")
    return box.model


def _prepare_row(row: dict, config: PrepareConfig) -> dict[str, bytes]:
    pair = prepare_pair(row["context_uri"], row["product_uri"], row["mask_uri"], row["bbox"], config)
    rendered = pair.payloads()  # the render job's own payload encoding
    out = {c: bytes(rendered[c]) for c in TRAIN_PAYLOADS if c.startswith("model_")}
    if row["mask_uri"] is not None:
        box = _box_variant(pair, config)
        out.update({c.name: bytes(c.pack(box[c.key])) for c in BOX_SPECS})
    return out


def prepare_training_batch(batch: pa.Table, *, config: PrepareConfig) -> pa.Table:
    """The prepare stage (a `map_batches` function): payloads for every good row, or its error."""
    rows = batch.to_pylist()
    payload: dict[str, list] = {c: [b""] * len(rows) for c in TRAIN_PAYLOADS}
    codes, messages = batch["error_code"].to_pylist(), batch["error_message"].to_pylist()
    for i, row in enumerate(rows):
        if codes[i]:
            continue
        try:
            prepared = _prepare_row(row, config)
        except RowError as e:
            codes[i], messages[i] = e.code, e.message
            continue
        except Exception as e:  # noqa: BLE001 - as the render job: a file no check foresaw skips its row
            codes[i], messages[i] = "prepare_failed", f"{type(e).__name__}: {e}"[:500]
            continue
        for c, value in prepared.items():
            payload[c][i] = value
    columns = {c: pa.array(v, PAYLOAD_TYPE) for c, v in payload.items()}
    columns.update(error_code=pa.array(codes, pa.string()), error_message=pa.array(messages, pa.string()))
    keep = ("pair_id", "split", "error_code", "error_message")
    return set_columns(batch.select(list(keep)), columns)


@dataclasses.dataclass
class RowCounts:
    """Rows per split: usable, and skipped by error code."""

    usable: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    skipped: dict[str, collections.Counter] = dataclasses.field(
        default_factory=lambda: {s: collections.Counter() for s in SPLITS}
    )
    examples: dict[str, str] = dataclasses.field(default_factory=dict)  # error code -> one "pair_id: message"

    @property
    def total(self) -> int:
        return sum(self.usable.values()) + sum(sum(c.values()) for c in self.skipped.values())

    def skipped_by_code(self) -> dict[str, int]:
        total = collections.Counter()
        for counter in self.skipped.values():
            total.update(counter)
        return dict(total.most_common())

    def to_record(self) -> dict:
        return {
            "usable": self.usable,
            "skipped": {s: dict(c) for s, c in self.skipped.items()},
            "examples": self.examples,
        }

    @classmethod
    def from_record(cls, record: dict) -> RowCounts:
        return cls(
            usable={s: int(record["usable"].get(s, 0)) for s in SPLITS},
            skipped={s: collections.Counter(record["skipped"].get(s, {})) for s in SPLITS},
            examples=dict(record.get("examples", {})),
        )

    def add(self, pair_ids: list, splits: list, codes: list, messages: list) -> None:
        """Count rows of the prepared columns (a good row has no error code)."""
        for pair_id, split, code, message in zip(pair_ids, splits, codes, messages, strict=True):
            if code:
                self.skipped[split][code] += 1
                self.examples.setdefault(code, f"{pair_id}: {message}")
            else:
                self.usable[split] += 1
