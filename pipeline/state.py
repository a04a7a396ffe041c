"""Run state under `--output`: the `_lock`, the done index, and the output key layout.

Driver-side (no torch). See DESIGN.md "Resume, staleness, concurrency":

- `OutputLock`: one run per output. `_lock` holds run id, host, pid and a heartbeat that a
  thread refreshes; a fresh lock held by another run refuses the start (exit 2, naming it), a
  stale one is taken over with a warning.
- `load_state()`: the latest row per pair_id, from `state/done.parquet` plus the manifests of
  runs that are not compacted into it yet (a killed run's part files count: that is how a
  re-run finishes the remainder without rendering done pairs again).
- `compact_state()`: rewrite `state/done.parquet` at the end of a run.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage

__all__ = ["LockHeld", "OutputLock", "Layout", "load_state", "compact_state", "STATE_COLUMNS"]

log = logging.getLogger(__name__)

# What a later run needs to skip a pair and still write its row (copied from the latest row).
STATE_COLUMNS = [
    "pair_id", "status", "error_code", "error_message", "output_uri", "width", "height", "crop_box",
    "seed", "model_digest", "settings_digest", "clip_score", "render_ms", "finished_at", "run_id",
]


class LockHeld(RuntimeError):
    """Another run holds the output (exit code 2)."""


class Layout:
    """Every key a run writes, built from validated names only (nothing escapes the prefix)."""

    def __init__(self, output: str):
        self.output = output

    def image(self, pair_id: str, ext: str) -> str:
        return storage.join(self.output, "images", f"{pair_id}.{ext}")

    def manifest_dir(self, run_id: str) -> str:
        return storage.join(self.output, "manifest", run_id)

    def manifest_part(self, run_id: str, index: int) -> str:
        return storage.join(self.output, "manifest", run_id, f"part-{index:05d}.parquet")

    @property
    def state(self) -> str:
        return storage.join(self.output, "state", "done.parquet")

    @property
    def state_meta(self) -> str:
        return storage.join(self.output, "state", "done.json")

    def run_record(self, run_id: str) -> str:
        return storage.join(self.output, "runs", f"{run_id}.json")

    @property
    def lock(self) -> str:
        return storage.join(self.output, "_lock")

    def metrics_dir(self, run_id: str) -> str:
        return storage.join(self.output, "metrics", run_id)

    def report(self, run_id: str) -> str:
        return storage.join(self.output, "report", run_id, "index.html")


class OutputLock:
    """`_lock` with a heartbeat thread. Use as a context manager."""

    def __init__(self, layout: Layout, run_id: str, stale_after_s: float = 300.0, heartbeat_s: float | None = None):
        self.layout, self.run_id, self.stale_after_s = layout, run_id, stale_after_s
        self.heartbeat_s = heartbeat_s or max(1.0, min(30.0, stale_after_s / 4))
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        return json.dumps(
            {"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(), "token": self.token, "heartbeat": time.time()}
        ).encode()

    def holder(self) -> dict | None:
        try:
            return json.loads(storage.read_bytes(self.layout.lock))
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):
            return {"run_id": "?", "heartbeat": 0}  # unreadable lock: treat as stale

    def acquire(self) -> None:
        current = self.holder()
        if current is not None:
            age = time.time() - float(current.get("heartbeat", 0))
            if age < self.stale_after_s:
                raise LockHeld(
                    f"output {self.layout.output} is locked by run {current.get('run_id')} on host "
                    f"{current.get('host')} (pid {current.get('pid')}), heartbeat {age:.0f}s ago; "
                    f"it is taken over once the heartbeat is {self.stale_after_s:.0f}s old"
                )
            log.warning("taking over a stale lock of run %s (heartbeat %.0fs ago)", current.get("run_id"), age)
        storage.write_bytes(self.layout.lock, self._record())
        # Two runs starting in the same instant: the last writer wins, the other sees it here.
        time.sleep(0.2)
        if (self.holder() or {}).get("token") != self.token:
            raise LockHeld(f"output {self.layout.output} was locked by another run starting at the same time")
        self._thread = threading.Thread(target=self._beat, name="dtc-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                storage.write_bytes(self.layout.lock, self._record())
            except Exception as e:  # noqa: BLE001 - a missed beat must not kill the run
                log.warning("lock heartbeat failed: %s", e)

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        if (self.holder() or {}).get("token") == self.token:
            storage.delete(self.layout.lock)

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = storage.filesystem(uri)
    # Single-threaded: many small files, and per-thread arena growth would make the driver's
    # memory scale with the number of parts read.
    return storage.retry_transient(lambda: pq.read_table(path, filesystem=fs, columns=columns, use_threads=False))


def _compacted_runs(layout: Layout) -> list[str]:
    try:
        return json.loads(storage.read_bytes(layout.state_meta))["compacted_runs"]
    except FileNotFoundError:
        return []


def _run_dirs(layout: Layout) -> list[str]:
    runs = {rel.split("/")[0] for rel, _, _ in storage.list_files(storage.join(layout.output, "manifest")) if rel.endswith(".parquet")}
    return sorted(runs)


def _latest(table: pa.Table) -> pa.Table:
    """The latest row per pair_id (by finished_at)."""
    if table.num_rows == 0:
        return table
    table = table.sort_by([("pair_id", "ascending"), ("finished_at", "descending")])
    pair = table.column("pair_id")
    keep = pc.invert(pc.equal(pair.slice(1), pair.slice(0, len(pair) - 1)).fill_null(False)) if len(pair) > 1 else None
    if keep is None:
        return table
    mask = pa.concat_arrays([pa.array([True]), keep.combine_chunks()])
    return table.filter(mask)


def load_state(layout: Layout, exclude_run: str | None = None) -> pa.Table:
    """Latest row per pair across the compacted index and every uncompacted run's manifest."""
    parts: list[pa.Table] = []
    if storage.exists(layout.state):
        parts.append(_read_parquet(layout.state, STATE_COLUMNS))
    compacted = set(_compacted_runs(layout))
    for run in _run_dirs(layout):
        if run in compacted or run == exclude_run:
            continue
        for rel, _, _ in storage.list_files(layout.manifest_dir(run)):
            if rel.endswith(".parquet"):
                table = _read_parquet(storage.join(layout.manifest_dir(run), rel), STATE_COLUMNS)
                parts.append(table.cast(_state_schema()))
    # duplicate_pair_id rows are not state: those pair_ids name several inputs at once
    tables = [t.filter(pc.not_equal(t.column("error_code").fill_null(""), "duplicate_pair_id")) for t in parts]
    if not tables:
        return _state_schema().empty_table()
    return _latest(pa.concat_tables([t.cast(_state_schema()) for t in tables]))


def _state_schema() -> pa.Schema:
    return pa.schema(
        [
            ("pair_id", pa.string()), ("status", pa.string()), ("error_code", pa.string()), ("error_message", pa.string()),
            ("output_uri", pa.string()), ("width", pa.int64()), ("height", pa.int64()), ("crop_box", pa.list_(pa.int64())),
            ("seed", pa.int64()), ("model_digest", pa.string()), ("settings_digest", pa.string()),
            ("clip_score", pa.float64()), ("render_ms", pa.float64()), ("finished_at", pa.string()), ("run_id", pa.string()),
        ]
    )


def compact_state(layout: Layout) -> int:
    """Fold every run's manifest into `state/done.parquet`; returns the number of pairs in it."""
    state = load_state(layout)
    fs, path = storage.filesystem(layout.state)
    if not storage.is_s3(layout.state):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:6]}" if not storage.is_s3(layout.state) else path
    storage.retry_transient(lambda: pq.write_table(state, tmp, filesystem=fs))
    if tmp != path:
        os.replace(tmp, path)
    # done.json lists the runs folded in; written after done.parquet so a kill in between only
    # means those runs are read again next time (idempotent), never that one is skipped.
    storage.write_bytes(layout.state_meta, json.dumps({"compacted_runs": _run_dirs(layout), "pairs": state.num_rows, "updated_at": time.time()}).encode())
    return state.num_rows
