"""Every key a run writes under `--output`, in one place (DESIGN.md "Output layout").

Built from validated names only (`schema.is_safe_name`: pair_id, run_id, shard), so no key
escapes the prefix. Driver-safe.
"""

from __future__ import annotations

from pipeline import storage

__all__ = ["Layout"]


class Layout:
    """Every key a run writes, built from validated names only (nothing escapes the prefix)."""

    def __init__(self, output: str):
        self.output = output

    def image(self, pair_id: str, ext: str) -> str:
        return storage.join(self.output, "images", f"{pair_id}.{ext}")

    def variant_image(self, pair_id: str, k: int, ext: str) -> str:
        """Variant `k` (an index into the row's variant_seeds) not chosen, with --keep-variants."""
        return storage.join(self.output, "variants", pair_id, f"{k}.{ext}")

    def scene_pixels(self, scene_id: str, pair_id: str) -> str:
        """A scene step's pixels, lossless (PNG): what the scene's next step is rendered into,
        in this run or a later one (a re-run after a kill, a step appended later)."""
        return storage.join(self.output, "scenes", scene_id, f"{pair_id}.png")

    def manifest_dir(self, run_id: str) -> str:
        return storage.join(self.output, "manifest", run_id)

    def manifest_part(self, run_id: str, index: int) -> str:
        return storage.join(self.output, "manifest", run_id, f"part-{index:05d}.parquet")

    @property
    def state(self) -> str:  # layout 1 (one file), read and folded into the buckets: output/state.py
        return storage.join(self.output, "state", "done.parquet")

    @property
    def state_buckets_dir(self) -> str:
        return storage.join(self.output, "state", "buckets")

    def state_bucket(self, bucket: int) -> str:
        return storage.join(self.output, "state", "buckets", f"{bucket:04d}.parquet")

    @property
    def state_meta(self) -> str:
        return storage.join(self.output, "state", "done.json")

    def run_record(self, run_id: str) -> str:
        return storage.join(self.output, "runs", f"{run_id}.json")

    @property
    def images_dir(self) -> str:
        return storage.join(self.output, "images")

    def inflight_dir(self, run_id: str) -> str:
        return storage.join(self.output, "state", "inflight", run_id)

    @property
    def lock(self) -> str:
        return storage.join(self.output, "_lock")

    def metrics_dir(self, run_id: str) -> str:
        return storage.join(self.output, "metrics", run_id)

    def report(self, run_id: str) -> str:
        return storage.join(self.output, "report", run_id, "index.html")
