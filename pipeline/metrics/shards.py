"""Per-shard and per-run quality figures: accumulated on the driver, stored, recomputable. No torch.

During a run, `MetricsAccumulator.add` takes each batch of finished rows (rendered in this run,
status ok): float64 sufficient statistics per shard and side (n, sum, sum of outer products),
CLIP and identity scores, and the raw fp16 features, flushed to `metrics/<run_id>/features/part-*.parquet`.
At the end `finalize` writes, per shard, `shard=<s>.json` (FID@N labelled with N, KID mean ±
std, CLIP and identity_score mean/p10/p50/p90, lowest-scoring pairs, the protocol), `shard=<s>.real.npz` /
`shard=<s>.gen.npz` (the statistics) and `shard=<s>.features.parquet` (raw features, which KID
needs), then `summary.json`: the global FID from merged statistics, the global KID from
subsets drawn across shards, CLIP, and the per-shard table.

`recompute(layout, run_ids)` rebuilds the same figures from those files alone (`jobs.metrics`),
merging several runs shard by shard.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.metrics.feature_stats import ClipStats, FeatureStats, fid_from_stats, kid
from pipeline.output.layout import Layout

__all__ = [
    "MetricsAccumulator",
    "compute_summary",
    "recompute",
    "metrics_protocol",
    "feature_figures",
    "FEATURE_DIM",
    "FEATURE_SCHEMA",
    "PROTOCOL_KEYS",
]

FEATURE_DIM = 2048
KID_SUBSETS = 100
KID_MAX_SUBSET = 1000
KID_MAX_ROWS = 10_000  # features read back per KID estimate (per shard, and across shards)
LOWEST = 10
FEATURE_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("shard", pa.string()),
        ("feat_real", pa.binary()),
        ("feat_gen", pa.binary()),
        ("clip_score", pa.float64()),
        ("clip_floor", pa.float64()),
        ("identity_score", pa.float64()),
    ]
)


def _features(column: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(column), dtype=np.float16).reshape(len(column), FEATURE_DIM).astype(np.float64)


def metrics_protocol(cfg, resolution: int) -> dict | None:
    """What every metrics file records (METRICS.md), or None when metrics are skipped.
    `cfg` is the run's RenderConfig; reads the Inception weights once for their sha256."""
    from pipeline.model.checkpoint import model_digest
    from pipeline.record import versions

    if cfg.no_metrics or not (cfg.inception_weights or cfg.clip_model):
        return None
    weights = cfg.inception_weights
    return {
        "extractor": "FID Inception v3 (pt_inception-2015-12-05), pool3 2048-d" if weights else None,
        "inception_weights": weights,
        "inception_sha256": hashlib.sha256(storage.read_bytes(weights)).hexdigest() if weights else None,
        "resize": "TF1-compatible bilinear to 299",
        "dtype": "float32, TF32 off; features stored as float16, statistics as float64",
        "features_from": f"decoded output window at {resolution}x{resolution} (uint8, before image encoding)",
        "real_side": "the shard's own context photos, same crop window as the render",
        "image_format": cfg.image_format,
        "clip_backbone": cfg.clip_model,
        "clip_backbone_sha256": model_digest(cfg.clip_model) if cfg.clip_model else None,
        "clip_preprocessing": "output cropped to the region's bbox, padded square (grey); product padded square; "
        "bicubic 224, CLIP mean/std; score = 100 * cosine",
        "clip_floor": "product vs the next pair's product in the model batch",
        "kid": {
            "kernel": "(x.y/d + 1)^3",
            "subsets": KID_SUBSETS,
            "max_subset_size": KID_MAX_SUBSET,
            "estimator": "unbiased MMD^2",
        },
        "reference": "none (real side = context crops)",
        "random_weights": cfg.metrics_random_weights,
        "versions": versions(),
    }


def _sum(a: FeatureStats | None, b: FeatureStats | None) -> FeatureStats | None:
    return b if a is None else a if b is None else a + b


class _Shard:
    """A shard's accumulated figures (or a run's: shards merged)."""

    def __init__(self):
        self.real: FeatureStats | None = None
        self.gen: FeatureStats | None = None
        self.clip = ClipStats()
        self.floor = ClipStats()
        self.identity = ClipStats()  # identity_score (model.identity): the same kind of figure
        self.lowest: list[tuple[float, str]] = []

    def add(
        self,
        real: np.ndarray | None,
        gen: np.ndarray | None,
        clip: list,
        floor: list,
        pair_ids: list[str],
        identity: list | None = None,
    ) -> None:
        scores = [s for s in identity or () if s is not None and math.isfinite(s)]
        if scores:
            self.identity = self.identity + ClipStats.from_scores(scores)
        if real is not None and len(real):
            self.real = _sum(self.real, FeatureStats.from_features(real))
            self.gen = _sum(self.gen, FeatureStats.from_features(gen))
        scored = [(s, p) for s, p in zip(clip, pair_ids) if s is not None]
        if scored:
            self.clip = self.clip + ClipStats.from_scores([s for s, _ in scored])
            self.lowest = sorted(self.lowest + scored)[:LOWEST]
        floors = [f for f in floor if f is not None]
        if floors:
            self.floor = self.floor + ClipStats.from_scores(floors)

    def merged(self, other: _Shard) -> _Shard:
        """Both shards' figures as one (statistics and CLIP values added, lowest pairs pooled)."""
        out = _Shard()
        out.real, out.gen = _sum(self.real, other.real), _sum(self.gen, other.gen)
        out.clip, out.floor = self.clip + other.clip, self.floor + other.floor
        out.identity = self.identity + other.identity
        out.lowest = sorted(self.lowest + other.lowest)[:LOWEST]
        return out


class MetricsAccumulator:
    def __init__(self, layout: Layout, run_id: str, part_rows: int = 2000):
        self.layout, self.run_id, self.part_rows = layout, run_id, part_rows
        self.shards: dict[str, _Shard] = collections.defaultdict(_Shard)
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.parts = 0

    def add(self, batch: pa.Table) -> None:
        """Rows rendered in this run with status ok; the others carry no features."""
        if "feat_gen" not in batch.column_names and "clip_score" not in batch.column_names:
            return
        rows = batch.filter(pc.and_(pc.equal(batch["status"], "ok"), pc.greater(batch["attempt"], 0)))
        if rows.num_rows == 0:
            return
        columns = {
            f.name: rows[f.name] if f.name in rows.column_names else pa.nulls(rows.num_rows, f.type)
            for f in FEATURE_SCHEMA
        }
        table = pa.table(columns).cast(FEATURE_SCHEMA)
        for shard in set(table["shard"].to_pylist()):
            part = table.filter(pc.equal(table["shard"], shard))
            has_features = part["feat_gen"].null_count == 0
            real = _features(part["feat_real"].to_pylist()) if has_features else None
            gen = _features(part["feat_gen"].to_pylist()) if has_features else None
            columns = ("clip_score", "clip_floor", "pair_id", "identity_score")
            clip, floor, pair_ids, identity = (part[c].to_pylist() for c in columns)
            self.shards[shard].add(real, gen, clip, floor, pair_ids, identity)
        self.pending.append(table)
        self.pending_rows += table.num_rows
        if self.pending_rows >= self.part_rows:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        part = storage.join(self.layout.metrics_dir(self.run_id), "features", f"part-{self.parts:05d}.parquet")
        storage.write_parquet(part, pa.concat_tables(self.pending))
        self.parts += 1
        self.pending, self.pending_rows = [], 0

    def finalize(self, counts: dict[str, dict], protocol: dict) -> dict:
        """Write the shard files and summary.json; returns the summary. A run with no ok row
        (every pair failed) still gets a summary: its shards with their counts and no figures."""
        self.flush()
        metrics_dir = self.layout.metrics_dir(self.run_id)
        features_dir = storage.join(metrics_dir, "features")
        parts = [storage.join(features_dir, rel) for rel, _, _ in storage.list_files(features_dir)]
        features = pa.concat_tables(
            [FEATURE_SCHEMA.empty_table(), *(storage.read_parquet(p, schema=FEATURE_SCHEMA) for p in parts)]
        )
        for shard, acc in self.shards.items():
            base = storage.join(metrics_dir, f"shard={shard}")
            if acc.real is not None:
                storage.write_bytes(f"{base}.real.npz", acc.real.to_npz_bytes())
                storage.write_bytes(f"{base}.gen.npz", acc.gen.to_npz_bytes())
            storage.write_parquet(f"{base}.features.parquet", features.filter(pc.equal(features["shard"], shard)))
        for p in parts:  # now held per shard
            storage.delete(p)
        summary = compute_summary(self.run_id, dict(self.shards), features, counts, protocol)
        _write_summary(self.layout, self.run_id, summary)
        return summary


def _kid(features: pa.Table, seed: int = 0) -> tuple[float | None, float | None, int | None]:
    rows = features.filter(pc.is_valid(features["feat_gen"]))
    # KID draws random subsets by row index: fix the row order (by pair_id) so the figure
    # does not depend on the order rows arrived in or shard files were read back.
    rows = rows.take(pc.sort_indices(rows, sort_keys=[("pair_id", "ascending")]))
    if rows.num_rows < 2:
        return None, None, None
    if rows.num_rows > KID_MAX_ROWS:
        rng = np.random.default_rng(seed)
        rows = rows.take(pa.array(np.sort(rng.choice(rows.num_rows, KID_MAX_ROWS, replace=False))))
    real, gen = _features(rows["feat_real"].to_pylist()), _features(rows["feat_gen"].to_pylist())
    # Half the rows per subset (up to 1000): subsets of all n rows would all be the same set
    # and report a std of 0 for a small shard.
    size = min(KID_MAX_SUBSET, max(2, rows.num_rows // 2))
    mean, std = kid(real, gen, subset_size=size, subsets=KID_SUBSETS, seed=seed)
    return mean, std, size


def feature_figures(features: pa.Table, chunk_rows: int = 8192) -> dict:
    """FID (one pass over the rows, statistics summed chunk by chunk) and KID of raw feature rows
    (FEATURE_SCHEMA; rows without feat_gen left out), as a run's own figures are made: jobs.compare
    measures each run on the pairs the runs share with it."""
    rows = features.filter(pc.is_valid(features["feat_gen"]))
    real = gen = None
    for start in range(0, rows.num_rows, chunk_rows):
        part = rows.slice(start, chunk_rows)
        real = _sum(real, FeatureStats.from_features(_features(part["feat_real"].to_pylist())))
        gen = _sum(gen, FeatureStats.from_features(_features(part["feat_gen"].to_pylist())))
    kid_mean, kid_std, kid_size = _kid(rows)
    return {
        "n": rows.num_rows,
        "fid": _fid(real, gen),
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "kid_subset_size": kid_size,
        "kid_subsets": KID_SUBSETS if kid_size else None,
    }


def _fid(real: FeatureStats | None, gen: FeatureStats | None) -> float | None:
    if real is None or real.n < 2 or gen.n < 2:
        return None
    return fid_from_stats(real, gen)


def _figures(acc: _Shard, features: pa.Table) -> dict:
    """FID@N, KID, CLIP and the lowest pairs of one shard (or of the run): None where a figure
    has too few rows (no ok row at all included)."""
    kid_mean, kid_std, kid_size = _kid(features)
    n = 0 if acc.real is None else acc.real.n
    return {
        "n": n,
        "fid": _fid(acc.real, acc.gen),
        "fid_label": f"FID@{n}",
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "kid_subset_size": kid_size,
        "kid_subsets": KID_SUBSETS if kid_size else None,
        "clip": acc.clip.summary(),
        "clip_floor": acc.floor.summary()["mean"],
        "identity_score": acc.identity.summary(),
        "lowest": [{"pair_id": p, "clip_score": s} for s, p in acc.lowest],
    }


def compute_summary(run_id: str, shards: dict, features: pa.Table, counts: dict[str, dict], protocol: dict) -> dict:
    """The figures of summary.json from per-shard accumulators and the raw feature table; a
    shard in `counts` with no accumulator (none of its rows ok) gets its counts and no figures."""
    table, total = [], _Shard()
    for shard in sorted(set(shards) | set(counts)):
        acc = shards.get(shard, _Shard())
        shard_counts = counts.get(shard, {})
        row = {"shard": shard, "ok": shard_counts.get("ok", 0), "failed": shard_counts.get("failed", 0)}
        table.append({**row, **_figures(acc, features.filter(pc.equal(features["shard"], shard)))})
        total = total.merged(acc)
    return {
        "run_id": run_id,
        "created_at": time.time(),
        "protocol": protocol,
        "global": {**_figures(total, features), "fid_note": "global FID from merged per-shard float64 statistics"},
        "shards": table,
    }


def _write_summary(layout: Layout, run_id: str, summary: dict) -> None:
    metrics_dir = layout.metrics_dir(run_id)
    for row in summary["shards"]:
        record = json.dumps({**row, "run_id": run_id, "protocol": summary["protocol"]}, indent=1)
        storage.write_bytes(storage.join(metrics_dir, f"shard={row['shard']}.json"), record.encode())
    storage.write_bytes(storage.join(metrics_dir, "summary.json"), json.dumps(summary, indent=1).encode())


def _load_run(layout: Layout, run_id: str) -> tuple[dict[str, _Shard], list[pa.Table], dict]:
    """Per-shard accumulators rebuilt from a run's stored files (no features in memory). A run
    whose pairs all failed has a summary.json and no shard files: no accumulator."""
    metrics_dir = layout.metrics_dir(run_id)
    files = {rel for rel, _, _ in storage.list_files(metrics_dir)}
    if "summary.json" not in files:
        raise FileNotFoundError(f"no metrics under {metrics_dir} (was the run made with metrics?)")
    protocol = json.loads(storage.read_bytes(storage.join(metrics_dir, "summary.json")))["protocol"]
    shards: dict[str, _Shard] = {}
    tables = []
    for rel in sorted(f for f in files if f.startswith("shard=") and f.endswith(".features.parquet")):
        shard = rel[len("shard=") : -len(".features.parquet")]
        acc = shards[shard] = _Shard()
        base = storage.join(metrics_dir, f"shard={shard}")
        if f"shard={shard}.real.npz" in files:
            acc.real = FeatureStats.from_npz_bytes(storage.read_bytes(f"{base}.real.npz"))
            acc.gen = FeatureStats.from_npz_bytes(storage.read_bytes(f"{base}.gen.npz"))
        features = storage.read_parquet(f"{base}.features.parquet", schema=FEATURE_SCHEMA)
        columns = ("clip_score", "clip_floor", "pair_id", "identity_score")
        acc.add(None, None, *(features[c].to_pylist() for c in columns))
        tables.append(features)
    return shards, tables, protocol


# What must agree for figures to merge; `random_weights` is carried instead (any run's warning holds).
PROTOCOL_KEYS = ("extractor", "inception_sha256", "resize", "dtype", "clip_backbone_sha256", "clip_preprocessing")


def recompute(layout: Layout, run_ids: list[str], out_id: str, counts: dict[str, dict]) -> dict:
    """Figures of one run, or of several merged shard by shard, from stored files only."""
    merged: dict[str, _Shard] = {}
    tables: list[pa.Table] = [FEATURE_SCHEMA.empty_table()]
    protocols = []
    for run_id in run_ids:
        shards, run_tables, protocol = _load_run(layout, run_id)
        protocols.append(protocol)
        tables += run_tables
        for shard, acc in shards.items():
            merged[shard] = merged[shard].merged(acc) if shard in merged else acc
    if len({tuple(p.get(k) for k in PROTOCOL_KEYS) for p in protocols}) > 1:
        raise ValueError(f"runs {run_ids} used different metric protocols; their figures cannot be merged")
    is_merge = len(run_ids) > 1 or out_id != run_ids[0]
    protocol = {**protocols[0], "random_weights": any(p.get("random_weights") for p in protocols)}
    if is_merge:
        protocol["merged_runs"] = run_ids
    summary = compute_summary(out_id, merged, pa.concat_tables(tables), counts, protocol)
    if is_merge:
        # a merge gets its own folder, with the merged statistics beside its figures
        metrics_dir = layout.metrics_dir(out_id)
        for shard, acc in merged.items():
            if acc.real is not None:
                storage.write_bytes(storage.join(metrics_dir, f"shard={shard}.real.npz"), acc.real.to_npz_bytes())
                storage.write_bytes(storage.join(metrics_dir, f"shard={shard}.gen.npz"), acc.gen.to_npz_bytes())
    _write_summary(layout, out_id, summary)
    return summary
