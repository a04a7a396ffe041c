"""`_lock`: one run per output (DESIGN.md "Resume, staleness, concurrency").

`_lock` holds run id, host, pid and a heartbeat that a thread refreshes; a fresh lock held by
another run refuses the start (exit 2, naming it), a stale one is taken over with a warning.
Driver-side.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from pipeline import storage
from pipeline.output.layout import Layout

__all__ = ["LockHeld", "OutputLock"]

log = logging.getLogger(__name__)


class LockHeld(RuntimeError):
    """Another run holds the output (exit code 2)."""


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
            {
                "run_id": self.run_id,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "token": self.token,
                "heartbeat": time.time(),
            }
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

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
