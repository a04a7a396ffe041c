"""Fault injection for the chaos tests: a worker death or a GPU out-of-memory error, on cue.

Never part of a production render: the render stage builds a `FaultInjector` only when the
run's YAML carries `fault_injection` (tests/integration/test_faults.py), and calls it just
before each model call with the pair ids about to be rendered. Keys:

- `crash_on_pair: ID` — the worker exits (as a segfault would: no exception, no cleanup) when
  ID is in the call; with `crash_once_marker: PATH`, only while PATH does not exist yet;
- `oom_over: N` — a call on more than N pairs raises torch's OutOfMemoryError;
- `oom_pair: ID` — any call holding ID raises it (the pair never fits, even alone).
"""

from __future__ import annotations

import os

__all__ = ["FaultInjector"]

KEYS = ("crash_on_pair", "crash_once_marker", "oom_over", "oom_pair")


class FaultInjector:
    def __init__(self, fault: dict):
        unknown = sorted(set(fault) - set(KEYS))
        if unknown:
            raise ValueError(f"fault_injection: unknown key(s) {unknown}; expected some of {list(KEYS)}")
        self.fault = fault

    def __call__(self, pair_ids: list[str]) -> None:
        fault = self.fault
        if fault.get("crash_on_pair") in pair_ids:
            marker = fault.get("crash_once_marker")
            if marker is None or not os.path.exists(marker):
                if marker:
                    open(marker, "w").close()
                os._exit(1)
        too_many = fault.get("oom_over") is not None and len(pair_ids) > fault["oom_over"]
        if too_many or fault.get("oom_pair") in pair_ids:
            import torch

            raise torch.OutOfMemoryError("injected: CUDA out of memory")
