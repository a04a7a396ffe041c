"""Two or more runs side by side, on the pairs they share (`python -m jobs.compare`). No torch.

    runs = [load_run(parse_run_spec("s3://renders/nov:RUN_A")), load_run(parse_run_spec("out:RUN_B"))]
    check_comparable(runs)                        # CompareRefused: the one line jobs.compare prints
    summary, chosen = compare(runs, resamples=2000, seed=0)

The first run is the baseline; every other run is measured against it. The pairs compared are
those whose row is `ok` in every run (joined on pair_id; each run's other rows are counted).
On them, per shard and overall: each run's FID and KID from its stored Inception features
(`metrics/<run_id>/shard=*.features.parquet`, the figures' own code: `shards.feature_figures`),
each run's mean CLIP score (the manifest's `clip_score`: the same `--clip-model` for every run,
checked), and per challenger the paired delta of the CLIP score, its per-pair win rate and, where
both runs scored identity with the same image encoder, the paired identity delta, each with a
paired percentile bootstrap interval (`scipy.stats.bootstrap(paired=True)`: pairs are resampled,
both runs' scores of a pair stay together).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.metrics.report import read_manifest_rows
from pipeline.metrics.shards import FEATURE_SCHEMA, PROTOCOL_KEYS, feature_figures
from pipeline.output.layout import Layout
from pipeline.schema import name_problem

__all__ = [
    "CompareRefused",
    "RunRef",
    "Run",
    "parse_run_spec",
    "load_run",
    "check_comparable",
    "compare",
    "paired_interval",
    "mean_difference",
    "win_rate",
    "identity_comparable",
]

CONFIDENCE = 0.95
# Index cells drawn per bootstrap batch (8 bytes each): bounds the memory of a catalog-sized
# comparison (1M pairs: 10 resamples per batch, 80 MB), the draws are the same either way.
BOOTSTRAP_CELLS = 10_000_000
STRIPS_SHOWN = 6  # pairs per "largest difference" section, each way
SAMPLE_SHOWN = 8  # pairs in the random sample
ROW_COLUMNS = (
    "pair_id",
    "shard",
    "status",
    "clip_score",
    "identity_score",
    "context_uri",
    "product_uri",
    "output_uri",
    "mask_uri",
    "bbox",
)


class CompareRefused(ValueError):
    """The runs cannot be compared; the message is the one line jobs.compare prints (exit 2)."""


@dataclass(frozen=True)
class RunRef:
    output: str  # the run's --output (a folder or s3:// prefix)
    run_id: str

    @property
    def spec(self) -> str:
        return f"{self.output}:{self.run_id}"


@dataclass
class Run:
    ref: RunRef
    label: str  # the run id, or OUTPUT:RUN_ID where two runs share an id
    record: dict  # runs/<run_id>.json
    protocol: dict  # summary.json's protocol
    rows: pa.Table  # the output manifest's ROW_COLUMNS


def parse_run_spec(spec: str) -> RunRef:
    """`OUTPUT:RUN_ID` (split at the last colon: an s3:// OUTPUT has one of its own)."""
    output, sep, run_id = spec.rpartition(":")
    if not sep or not output or output.endswith(":") or output.endswith(":/"):
        raise CompareRefused(f"--run {spec!r} must be OUTPUT:RUN_ID (a folder or s3:// prefix, then the run id)")
    if problem := name_problem("run id", run_id):
        raise CompareRefused(f"--run {spec!r}: {problem}")
    return RunRef(output.rstrip("/"), run_id)


def _labels(refs: list[RunRef]) -> list[str]:
    ids = [r.run_id for r in refs]
    return [r.run_id if ids.count(r.run_id) == 1 else r.spec for r in refs]


def load_run(ref: RunRef, label: str | None = None) -> Run:
    """The run's record, metrics protocol and manifest rows; CompareRefused when one is missing."""
    layout = Layout(ref.output)
    record_uri = layout.run_record(ref.run_id)
    if not storage.exists(record_uri):
        raise CompareRefused(f"run {ref.spec}: no run record {record_uri} (no such run, or it never finished)")
    summary_uri = storage.join(layout.metrics_dir(ref.run_id), "summary.json")
    if not storage.exists(summary_uri):
        raise CompareRefused(
            f"run {ref.spec} has no metrics ({summary_uri} is missing): render it with --inception-weights "
            "and --clip-model"
        )
    record = json.loads(storage.read_bytes(record_uri))
    protocol = json.loads(storage.read_bytes(summary_uri)).get("protocol")
    if not protocol:  # a summary written before the protocol was recorded: its extractors are unknown
        raise CompareRefused(
            f"run {ref.spec}: {summary_uri} names no extractors (no `protocol`), so its figures cannot be "
            "compared; render it again with --inception-weights and --clip-model"
        )
    rows = read_manifest_rows(layout, [ref.run_id], columns=ROW_COLUMNS)
    for name, type_ in (("identity_score", pa.float64()), ("mask_uri", pa.string()), ("bbox", pa.list_(pa.float64()))):
        if name not in rows.column_names:  # an older manifest, or a catalog without masks or boxes
            rows = rows.append_column(name, pa.nulls(rows.num_rows, type_))
    if rows.num_rows == 0:
        raise CompareRefused(f"run {ref.spec}: no output-manifest rows under {layout.manifest_dir(ref.run_id)}")
    return Run(ref, label or ref.run_id, record, protocol, rows)


def load_runs(refs: list[RunRef]) -> list[Run]:
    if len(refs) < 2:
        raise CompareRefused(f"compare needs two or more --run, got {len(refs)}")
    repeated = sorted({r.spec for r in refs if refs.count(r) > 1})
    if repeated:
        raise CompareRefused(f"--run {', '.join(repeated)} given more than once; name each run once")
    return [load_run(ref, label) for ref, label in zip(refs, _labels(refs))]


def _ok_ids(run: Run) -> pa.Array:
    return pc.unique(run.rows.filter(pc.equal(run.rows["status"], "ok"))["pair_id"])


def check_comparable(runs: list[Run]) -> None:
    """CompareRefused naming the first difference of extractors, or when no pair is ok in every run."""
    base = runs[0]
    for run in runs[1:]:
        for key in PROTOCOL_KEYS:
            a, b = base.protocol.get(key), run.protocol.get(key)
            if a != b:
                raise CompareRefused(
                    f"runs {base.label} and {run.label} were measured with different extractors "
                    f"({key}: {str(a)[:40]!r} vs {str(b)[:40]!r}); their figures are not comparable"
                )
    shared = _ok_ids(base)
    for run in runs[1:]:
        shared = pc.filter(shared, pc.is_in(shared, value_set=_ok_ids(run)))
    if len(shared) == 0:
        labels = ", ".join(r.label for r in runs)
        raise CompareRefused(f"runs {labels} share no pair rendered ok in every run (joined on pair_id)")


# -- the paired bootstrap ------------------------------------------------------------------------


def mean_difference(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    """Mean of b - a: how much the challenger (b) scores above the baseline (a)."""
    return np.mean(b - a, axis=axis)


def win_rate(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    """Share of pairs where b scores above a; a tie counts half."""
    return np.mean((b > a) + 0.5 * (b == a), axis=axis)


def paired_interval(a: np.ndarray, b: np.ndarray, statistic, *, resamples: int, seed: int) -> dict:
    """statistic(a, b) and its percentile bootstrap interval (CONFIDENCE), pairs resampled
    with both scores of a pair kept together; no interval under 2 pairs."""
    from scipy.stats import bootstrap

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    figure = {"n": int(a.size), "value": float(statistic(a, b)) if a.size else None, "low": None, "high": None}
    if a.size < 2:
        return figure
    result = bootstrap(
        (a, b),
        statistic,
        paired=True,
        vectorized=True,
        n_resamples=resamples,
        batch=max(1, min(resamples, BOOTSTRAP_CELLS // a.size)),
        method="percentile",
        confidence_level=CONFIDENCE,
        rng=np.random.default_rng(seed),
    )
    interval = result.confidence_interval
    return {**figure, "low": float(interval.low), "high": float(interval.high)}


# -- figures -------------------------------------------------------------------------------------


def identity_comparable(base: Run, run: Run) -> str | None:
    """None when the runs' identity scores compare (one model, so one image encoder), else why not."""
    a, b = ((r.record.get("model") or {}).get("digest") for r in (base, run))
    if a and a == b:
        return None
    return (
        f"n/a: {base.label} and {run.label} are different models (digest {str(a)[:12]} vs {str(b)[:12]}); "
        "identity_score is each model's own image encoder, not comparable across models (the CLIP score is)"
    )


def _features(run: Run, pair_ids: pa.Array) -> pa.Table:
    """The run's stored feature rows of `pair_ids` (one per pair rendered in the run with metrics)."""
    metrics_dir = Layout(run.ref.output).metrics_dir(run.ref.run_id)
    parts = [FEATURE_SCHEMA.empty_table()]
    for rel, _, _ in storage.list_files(metrics_dir):
        if rel.startswith("shard=") and rel.endswith(".features.parquet"):
            part = storage.read_parquet(storage.join(metrics_dir, rel), schema=FEATURE_SCHEMA)
            parts.append(part.filter(pc.is_in(part["pair_id"], value_set=pair_ids)))
    return pa.concat_tables(parts)


def _scores(joined: pa.Table, column: str, runs: int) -> np.ndarray:
    """[runs, pairs] float64 of `column_k`, NaN where a run has no score."""
    return np.stack(
        [pc.fill_null(joined[f"{column}_{k}"], np.nan).to_numpy(zero_copy_only=False) for k in range(runs)]
    ).astype(np.float64)


def _figures(runs: list[Run], joined: pa.Table, features: list[pa.Table], resamples: int, seed: int) -> dict:
    """Each run's FID/KID and mean CLIP score on the `joined` pairs, and every challenger's deltas."""
    pair_ids = joined["pair_id"].combine_chunks()
    with_features = pair_ids  # FID/KID: the pairs every run holds features of (a reused row has none)
    for table in features:
        with_features = pc.filter(with_features, pc.is_in(with_features, value_set=table["pair_id"]))
    clip, identity = _scores(joined, "clip", len(runs)), _scores(joined, "identity", len(runs))
    scored = np.isfinite(clip).all(axis=0)
    per_run = []
    for k, run in enumerate(runs):
        table = features[k].filter(pc.is_in(features[k]["pair_id"], value_set=with_features))
        fid = feature_figures(table)
        ids = np.isfinite(identity[k])
        per_run.append(
            {
                "label": run.label,
                "fid": fid["fid"],
                "fid_n": fid["n"],
                "kid_mean": fid["kid_mean"],
                "kid_std": fid["kid_std"],
                "kid_subset_size": fid["kid_subset_size"],
                "clip_n": int(scored.sum()),
                "clip_mean": float(clip[k][scored].mean()) if scored.any() else None,
                "identity_n": int(ids.sum()),
                "identity_mean": float(identity[k][ids].mean()) if ids.any() else None,
            }
        )
    deltas = []
    for k, run in enumerate(runs[1:], start=1):
        base, other = clip[0][scored], clip[k][scored]
        note = identity_comparable(runs[0], run)
        both = np.isfinite(identity[0]) & np.isfinite(identity[k])
        delta = None
        if note is None:
            delta = paired_interval(
                identity[0][both], identity[k][both], mean_difference, resamples=resamples, seed=seed
            )
        deltas.append(
            {
                "label": run.label,
                "vs": runs[0].label,
                "clip": paired_interval(base, other, mean_difference, resamples=resamples, seed=seed),
                "win_rate": paired_interval(base, other, win_rate, resamples=resamples, seed=seed),
                "identity": delta,
                "identity_note": note,
            }
        )
    return {"pairs": joined.num_rows, "runs": per_run, "deltas": deltas}


def _joined(runs: list[Run]) -> pa.Table:
    """pair_id, shard (the baseline's), clip_k and identity_k per run: the pairs ok in every run,
    by pair_id."""
    joined = None
    for k, run in enumerate(runs):
        ok = run.rows.filter(pc.equal(run.rows["status"], "ok"))
        columns = {"pair_id": ok["pair_id"], f"clip_{k}": ok["clip_score"], f"identity_{k}": ok["identity_score"]}
        if k == 0:
            columns["shard"] = ok["shard"]
        table = pa.table(columns)
        joined = table if joined is None else joined.join(table, keys="pair_id", join_type="inner")
    return joined.sort_by("pair_id")


def _counts(run: Run, shared: int) -> dict:
    statuses = dict(zip(*(c.to_pylist() for c in pc.value_counts(run.rows["status"]).flatten())))  # {status: rows}
    ok = statuses.get("ok", 0)
    return {"rows": run.rows.num_rows, **statuses, "shared": shared, "ok_not_shared": ok - shared}


def _chosen(runs: list[Run], joined: pa.Table, seed: int) -> dict:
    """The pair ids the page shows: per challenger the largest CLIP differences each way, and a
    random sample of the shared pairs (fixed seed)."""
    clip = _scores(joined, "clip", len(runs))
    ids = np.asarray(joined["pair_id"].to_pylist(), dtype=object)
    better, worse = {}, {}
    for k, run in enumerate(runs[1:], start=1):
        delta = clip[k] - clip[0]
        finite = np.isfinite(delta)
        order = np.lexsort((ids[finite], delta[finite]))  # by delta, then pair_id: ties in a fixed order
        ranked = ids[finite][order]
        ascending_delta = delta[finite][order]
        better[run.label] = [p for p, d in zip(ranked[::-1], ascending_delta[::-1]) if d > 0][:STRIPS_SHOWN]
        worse[run.label] = [p for p, d in zip(ranked, ascending_delta) if d < 0][:STRIPS_SHOWN]
    sample = sorted(random.Random(seed).sample(list(ids), min(SAMPLE_SHOWN, len(ids))))
    return {"better": better, "worse": worse, "sample": sample}


def _unsharded(shards: list[dict]) -> dict:
    return {k: v for k, v in shards[0].items() if k != "shard"}


def compare(runs: list[Run], *, resamples: int, seed: int) -> tuple[dict, pa.Table]:
    """The comparison's summary (summary.json's content but its page) and the joined pairs."""
    joined = _joined(runs)
    features = [_features(run, joined["pair_id"].combine_chunks()) for run in runs]
    shards = []
    for shard in sorted(set(joined["shard"].to_pylist()), key=str):
        mask = pc.equal(joined["shard"], shard) if shard is not None else pc.is_null(joined["shard"])
        part = joined.filter(mask)
        shard_features = [f.filter(pc.is_in(f["pair_id"], value_set=part["pair_id"])) for f in features]
        shards.append({"shard": shard, **_figures(runs, part, shard_features, resamples, seed)})
    random_weights = any(r.protocol.get("random_weights") for r in runs)
    summary = {
        "created_at": time.time(),
        "baseline": runs[0].label,
        "runs": [
            {
                "label": run.label,
                "output": run.ref.output,
                "run_id": run.ref.run_id,
                "model": run.record.get("model"),
                "settings": run.record.get("settings"),
                "settings_digest": run.record.get("settings_digest"),
                "counts": _counts(run, joined.num_rows),
                "random_weights": bool(run.protocol.get("random_weights")),
            }
            for run in runs
        ],
        "protocol": {**{k: runs[0].protocol.get(k) for k in PROTOCOL_KEYS}, "random_weights": random_weights},
        "bootstrap": {
            "library": "scipy.stats.bootstrap(paired=True)",
            "method": "percentile",
            "confidence_level": CONFIDENCE,
            "resamples": resamples,
            "seed": seed,
            "unit": "pair",
        },
        "shared_pairs": joined.num_rows,
        # one shard: the run's figures are that shard's (each FID is two 2048-d eigendecompositions)
        "global": _figures(runs, joined, features, resamples, seed) if len(shards) > 1 else _unsharded(shards),
        "shards": shards,
        "shown": _chosen(runs, joined, seed),
    }
    return summary, joined


def max_pixels(runs: list[Run], default: int) -> int:
    """The largest --max-pixels the runs decoded with: the page decodes what the runs decoded."""
    found = [(run.record.get("config") or {}).get("max_pixels") for run in runs]
    return max((n for n in found if n), default=default)
