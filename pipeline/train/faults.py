"""Fault injection for the training chaos tests: a worker that dies (or stalls) at a given step, once,
or a preparation that stalls on one store part.

Never part of a production run: the loop builds `TrainFaults` only when the run's YAML carries
`fault_injection` (tests/integration/test_train.py), and calls it before each step. Keys:

- `crash_at_step: K` — the worker exits at the start of 0-based step K (as a segfault or an OOM
  kill would: no exception, no cleanup);
- `crash_rank: R` — only the worker of that rank (default 0);
- `crash_once_marker: PATH` — only while PATH does not exist yet (it is created just before),
  so the restarted worker group trains on;
- `pause_at_step: K`, `pause_s: SECONDS`, `pause_once_marker: PATH` — every worker sleeps before
  step K (once, with the marker): a window in which the driver-kill test can strike.
"""

from __future__ import annotations

import os
import time

__all__ = ["TrainFaults"]

KEYS = (
    "crash_at_step",
    "crash_rank",
    "crash_once_marker",
    "pause_at_step",
    "pause_s",
    "pause_once_marker",
    "prepare_stall_part",
)


class TrainFaults:
    def __init__(self, fault: dict):
        unknown = sorted(set(fault) - set(KEYS))
        if unknown:
            raise ValueError(f"fault_injection: unknown key(s) {unknown}; expected some of {list(KEYS)}")
        self.fault = fault

    def __call__(self, step: int, rank: int) -> None:
        fault = self.fault
        if fault.get("pause_at_step") == step and not _once(fault.get("pause_once_marker"), rank):
            time.sleep(float(fault.get("pause_s", 5)))
        if fault.get("crash_at_step") != step or fault.get("crash_rank", 0) != rank:
            return
        marker = fault.get("crash_once_marker")
        if marker is not None and os.path.exists(marker):
            return
        if marker is not None:
            open(marker, "w").close()
        os._exit(1)


def _once(marker: str | None, rank: int) -> bool:
    """True when the marker says it already happened; rank 0 leaves the marker."""
    if marker is None:
        return False
    if os.path.exists(marker):
        return True
    if rank == 0:
        open(marker, "w").close()
    return False
