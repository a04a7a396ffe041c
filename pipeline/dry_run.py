"""`--dry-run` (jobs.render, jobs.backfill): what a run would do, counted per shard on the driver,
without Ray and without writing.

What needs no fetch is judged: the rows themselves and the allowlist, not the images (a bbox
outside its photo, an unreadable file, is only found by rendering). A row counts as `skipped`
when a later partition of a backfill's range has its pair_id (`manifest.PairIdConflicts`);
`invalid` when it would fail before any fetch: a bad row (`rows.validate_rows`)
or an input URI the allowlist refuses (`fetch.InputPolicy.check`, the same check the prepare
stage makes); `reuse` when an earlier run's ok result would be reused, `carried` when its
failed one would (`--retry-failed` tries them again); `render` when it would be rendered.
With `--verify-inputs` the input files of every reusable ok row are checked as a run checks them.
"""

from __future__ import annotations

import collections

from pipeline import storage
from pipeline.config import RunSpec
from pipeline.fetch import InputPolicy
from pipeline.manifest import pair_id_conflicts
from pipeline.output.layout import Layout
from pipeline.output.state import load_state
from pipeline.resume import StateIndex, reusable_state
from pipeline.schema import RENDER, RowError

__all__ = ["dry_run_counts"]

KINDS = ("render", "reuse", "carried", "invalid", "skipped")


def _refused(policy: InputPolicy, uris) -> bool:
    for uri in uris:
        if uri:
            try:
                policy.check(uri)
            except (RowError, ValueError):  # ValueError: a path the OS cannot name (a NUL byte)
                return True
    return False


def _reusable(spec: RunSpec):
    """The state rows a run may reuse, on this machine (`--dry-run`): this model and settings,
    ok rows (with --verify-images: whose image exists), failed rows unless --retry-failed
    (`resume.reusable_state`). A render run decides the same on the cluster (resume_stage)."""
    layout = Layout(spec.output)
    existing = None
    if spec.cfg.verify_images:
        existing = {storage.join(layout.images_dir, rel) for rel, _, _ in storage.list_files(layout.images_dir)}
    state = load_state(layout, exclude_run=spec.run_id)
    return reusable_state(state, spec.model_digest, spec.settings_digest, existing, spec.cfg.retry_failed)


def dry_run_counts(spec: RunSpec) -> dict:
    """Prints the per-shard counts; returns them ({"shards": {shard: {kind: n}}, kind: total})."""
    from pipeline.stages.read_stage import planned_batches

    cfg, plan = spec.cfg, spec.plan
    state = None if cfg.force else _reusable(spec)
    index = StateIndex(state) if state is not None and state.num_rows else None
    conflicts = pair_id_conflicts(plan)
    policy = InputPolicy(manifest_dir=plan.base_dir, allow_roots=tuple(cfg.allow_root), allow_http=cfg.allow_http)
    shards: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    reasons: collections.Counter[str] = collections.Counter()  # why rows are invalid
    for i in range(len(plan.files)):
        for batch in planned_batches(plan, i, conflicts, index, 65536, cfg.verify_inputs):
            columns = [batch[c].to_pylist() for c in ("shard", "action", "error_code", "prev_status")]
            uris = zip(*(batch[c].to_pylist() for c in ("context_uri", "product_uri", "mask_uri")))
            for (shard, action, code, prev), row_uris in zip(zip(*columns), uris):
                if code == "superseded":
                    kind = "skipped"
                elif code or (action == RENDER and _refused(policy, row_uris)):
                    kind = "invalid"
                    reasons[code or "uri_not_allowed"] += 1
                else:
                    kind = "render" if action == RENDER else "reuse" if prev == "ok" else "carried"
                shards[shard][kind] += 1
    print(
        f"[dtc] dry run: {plan.num_rows} rows in {len(plan.files)} file(s) under {cfg.manifest}; "
        "nothing is rendered or written"
    )
    print(f"  {'shard':<28}" + "".join(f"{k:>10}" for k in KINDS))
    for shard in sorted(shards):
        print(f"  {shard:<28}" + "".join(f"{shards[shard][k]:>10}" for k in KINDS))
    totals = {k: sum(c[k] for c in shards.values()) for k in KINDS}
    print(f"  {'total':<28}" + "".join(f"{totals[k]:>10}" for k in KINDS), flush=True)
    print(
        "  render: rendered by a run; reuse: done earlier; carried: failed earlier, carried over "
        "(--retry-failed tries them); invalid: would fail before any fetch; skipped: a later partition has the pair",
        flush=True,
    )
    if reasons:
        print("  invalid    " + ", ".join(f"{code} {n}" for code, n in reasons.most_common()), flush=True)
    return {"shards": {s: dict(c) for s, c in shards.items()}, **totals}
