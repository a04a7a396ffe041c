"""A run's statistics, from the blocks that reach the driver: counts, failures, stage times,
throughput. What the progress line, the summary and the run record print. No torch.

    stats = RunStats()
    stats.add(block)            # the finish stage's block (every row has `attempt`)
    stats.rows_per_s()          # the run's rows/s: the progress line's, the summary's, the record's
    stats.steady_rows_per_s()   # rows/s after the first model call, on the model's clock

Each figure has one definition, here (the identity ones in `metrics.feature_stats.ScoreHistogram`);
`record.py` only formats them.
"""

from __future__ import annotations

import collections
import time

import pyarrow as pa

from pipeline.metrics.feature_stats import ScoreHistogram

__all__ = ["RunStats"]

# stage -> the column holding its busy time per row (ms), summed over the rows rendered here
STAGE_TIMES = {"prepare": "prepare_ms", "render": "render_ms", "postprocess": "postprocess_ms"}


class RunStats:
    def __init__(self):
        self.started = time.monotonic()  # the run's clock: rows_per_s counts from here
        self.rows = 0
        self.status: collections.Counter[str] = collections.Counter()
        self.error_codes: collections.Counter[str] = collections.Counter()
        self.reused = 0  # rows carried over from earlier runs (attempt 0, not skipped)
        self.reused_failed = 0  # of which failed: --retry-failed tries them again
        self.shards: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        # identity_score of the ok rows (this run's and reused), per shard and in all; needs_review counts
        self.identity: dict[str, ScoreHistogram] = collections.defaultdict(ScoreHistogram)
        self.identity_all = ScoreHistogram()
        self.needs_review = 0
        self.stage_seconds = {stage: 0.0 for stage in STAGE_TIMES}
        # steady-state throughput on the model's clock (render_ended_at): the rows of the model
        # calls that ended after the first one, over the time from its end to the last one's
        self.first_end: float | None = None
        self.first_rows = 0
        self.last_end: float | None = None
        self.model_rows = 0
        # the same on the driver's clock (block arrivals), for comparison: Ray Data hands the
        # blocks over in bunches, the first one late, which overstates it
        self.first_at: float | None = None
        self.first_at_rows = 0
        self.last_at: float | None = None

    @property
    def ok(self) -> int:
        return self.status.get("ok", 0)

    @property
    def failed(self) -> int:
        return self.status.get("failed", 0)

    @property
    def skipped(self) -> int:
        return self.status.get("skipped", 0)

    @property
    def tried(self) -> int:
        """Rows this run rendered or failed: not reused from earlier runs, not skipped."""
        return self.rows - self.reused - self.skipped

    @property
    def rendered(self) -> int:
        """Rows this run rendered ok (the ok rows not reused)."""
        return self.ok - (self.reused - self.reused_failed)

    def rows_per_s(self) -> float:
        """The run's throughput: `tried` rows over the seconds from the run's start (Ray's
        start and model load included) to the arrival of its last rows; 0.0 for a run that
        tried none. The end's bookkeeping (done index, report) is not in it, so the last
        progress line, the summary and the record give the same figure."""
        end = self.last_at if self.last_at is not None else time.monotonic()
        return round(self.tried / max(end - self.started, 1e-9), 2)

    @property
    def failed_fraction(self) -> float:
        """Failed rows over the rows that were pairs to render (skipped rows are another row's pair)."""
        return self.failed / max(self.rows - self.skipped, 1)

    def add(self, batch: pa.Table) -> None:
        now = time.monotonic()
        if self.first_at is None:
            self.first_at, self.first_at_rows = now, batch.num_rows
        self.last_at = now
        if "render_ended_at" in batch.column_names:
            for ended, rows in collections.Counter(batch["render_ended_at"].to_pylist()).items():
                if ended is not None:
                    self._model_call(ended, rows)
        attempts = batch["attempt"].to_pylist()
        for stage, column in STAGE_TIMES.items():
            if column in batch.column_names:
                times = zip(batch[column].to_pylist(), attempts)
                self.stage_seconds[stage] += sum(ms or 0.0 for ms, a in times if a) / 1000
        status, codes = batch["status"].to_pylist(), batch["error_code"].to_pylist()
        self.rows += batch.num_rows
        self.status.update(status)
        self.reused += sum(1 for a, row_status in zip(attempts, status) if a == 0 and row_status != "skipped")
        self.reused_failed += sum(1 for a, row_status in zip(attempts, status) if a == 0 and row_status == "failed")
        self.error_codes.update(code for code, row_status in zip(codes, status) if row_status == "failed")
        shards = batch["shard"].to_pylist()
        for shard, row_status, attempt in zip(shards, status, attempts):
            self.shards[shard][row_status] += 1
            if row_status != "skipped":
                self.shards[shard]["reused" if attempt == 0 else "rendered"] += 1
        self._identity(batch, shards, status)

    def _identity(self, batch: pa.Table, shards: list, status: list) -> None:
        if "identity_score" not in batch.column_names:
            return
        scores = batch["identity_score"].to_pylist()
        by_shard: dict[str, list] = collections.defaultdict(list)
        for shard, row_status, score in zip(shards, status, scores):
            if row_status == "ok" and score is not None:
                by_shard[shard].append(score)
        for shard, values in by_shard.items():
            self.identity[shard].add(values)
            self.identity_all.add(values)
        self.needs_review += sum(1 for flag in batch["needs_review"].to_pylist() if flag)

    def _model_call(self, ended: float, rows: int) -> None:
        """`rows` rendered by a model call that ended at `ended` (a call's rows may come in parts)."""
        self.model_rows += rows
        if self.first_end is None or ended < self.first_end:
            self.first_end, self.first_rows = ended, 0
        if ended == self.first_end:
            self.first_rows += rows
        self.last_end = ended if self.last_end is None else max(self.last_end, ended)

    def steady_rows_per_s(self) -> float | None:
        """Rows/s rendered once the first model call is out (model load and the pipeline's
        start-up are not throughput), on the model's clock; None before two calls ended. With
        several actors, the others' first calls count: a conservative figure."""
        if self.first_end is None or self.last_end == self.first_end:
            return None
        return (self.model_rows - self.first_rows) / (self.last_end - self.first_end)

    def arrival_rows_per_s(self) -> float | None:
        """The same on the driver's clock: rows after the first arriving block over the time since."""
        if self.first_at is None or self.last_at == self.first_at:
            return None
        return (self.rows - self.first_at_rows) / (self.last_at - self.first_at)

    def counts(self) -> dict:
        """The run record's `counts`."""
        return {
            "rows": self.rows,
            "ok": self.ok,
            "failed": self.failed,
            "skipped": self.skipped,
            "reused": self.reused,
            "reused_failed": self.reused_failed,
            "error_codes": dict(self.error_codes),
            "shards": {shard: dict(c) for shard, c in sorted(self.shards.items())},
            "needs_review": self.needs_review,
            "identity_score": {
                "all": self.identity_all.summary(),
                "shards": {shard: h.summary() for shard, h in sorted(self.identity.items())},
            },
        }
