"""`_lock`: one run per output (DESIGN.md "Resume, staleness, concurrency").

`_lock` holds the holder's run id, host, pid, a random token, a counter `gen` and a heartbeat
time. Every write of it is conditional (`storage.put_if_absent` / `put_if_match` /
`delete_if_match`: on S3 If-None-Match / If-Match on the ETag, on local files a link/rename
compare-and-swap on the content's sha256, explained in `storage.put_if_match`):

- acquire: create `_lock` only if absent; when it exists with a fresh heartbeat the start is
  refused (LockHeld, exit 2, naming the holder); a stale one (heartbeat older than
  `stale_after_s`, or unreadable) is replaced only if it is still the version read, so of
  several runs taking over the same stale lock exactly one wins and the others are refused.
- heartbeat (a thread, every `heartbeat_s`) and `check()`: rewrite our record only if `_lock`
  is still the version we last wrote. A takeover is therefore never overwritten: the next
  renewal fails its precondition, finds another run's token, and marks the lock `lost`.
- fence: the driver calls `check()` right before every write to what other runs read (a
  manifest part, the state compaction); it renews the lock synchronously and raises LockLost
  (exit 1, naming the run that took it) when the lock is no longer ours. A renewal just before
  the write also means nobody can take the lock over for `stale_after_s` after it. The run
  record (`runs/<run_id>.json`) is still written: no other run writes that key, and it is
  where the loss is reported.
- release: delete `_lock` only if it is still our version; a lock taken over is left alone.

Residual windows: a writer frozen for longer than `stale_after_s` between `check()` and the
write it fences (e.g. SIGSTOP exactly there) can still write once after a takeover, as with any
lease; on local files also one inside the few system calls of a compare-and-swap (see
`storage.put_if_match`). Image objects are written by Ray workers, not fenced one by one: the
driver checks the lock before it starts the render stream and stops at the first block after
the heartbeat finds the lock taken over, but blocks already in flight may still overwrite
images (it writes no row for them).
Staleness compares the holder's clock with the reader's: hosts need roughly synchronised
clocks. Driver-side.
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

__all__ = ["LockHeld", "LockLost", "OutputLock"]

log = logging.getLogger(__name__)

ACQUIRE_ATTEMPTS = 5  # create / take over, re-reading after each lost race
RENEW_ATTEMPTS = 5  # check(): renewals tried while another writer's claim blocks ours (local files)


class LockHeld(RuntimeError):
    """Another run holds the output (exit code 2)."""


class LockLost(RuntimeError):
    """Another run took our lock over (exit code 1); `holder` is its record ({} if `_lock` is gone)."""

    def __init__(self, message: str, holder: dict | None = None):
        super().__init__(message)
        self.holder = holder or {}


class OutputLock:
    """`_lock` with a heartbeat thread. Use as a context manager; `check()` before each write."""

    def __init__(self, layout: Layout, run_id: str, stale_after_s: float, heartbeat_s: float | None = None):
        self.layout, self.run_id, self.stale_after_s = layout, run_id, stale_after_s
        self.heartbeat_s = heartbeat_s or max(1.0, min(30.0, stale_after_s / 4))
        self.token = uuid.uuid4().hex
        self.lost: LockLost | None = None  # set once a renewal finds the lock taken over
        self._gen = 0  # bumped by every record made: ours never repeat (a version never comes back)
        self._version: str | None = None  # of the record we last wrote; None when not held
        self._renewing = threading.Lock()  # the heartbeat thread and check() renew one at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        self._gen += 1
        return json.dumps(
            {
                "run_id": self.run_id,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "token": self.token,
                "gen": self._gen,
                "heartbeat": time.time(),
            }
        ).encode()

    def _read(self) -> tuple[dict, str] | None:
        """(holder record, its version), or None when there is no lock."""
        try:
            data, version = storage.read_versioned(self.layout.lock)
        except FileNotFoundError:
            return None
        try:
            record = json.loads(data)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except (ValueError, UnicodeDecodeError):
            record = {"run_id": "?", "heartbeat": 0}  # unreadable lock: treat as stale
        return record, version

    def holder(self) -> dict | None:
        """The record in `_lock` now, or None."""
        current = self._read()
        return None if current is None else current[0]

    @staticmethod
    def _age(record: dict) -> float:
        try:
            return time.time() - float(record.get("heartbeat", 0))
        except (TypeError, ValueError):
            return float("inf")

    def acquire(self) -> None:
        """Take the lock, or raise LockHeld naming the run that holds it (see the module docstring)."""
        uri = self.layout.lock
        for _ in range(ACQUIRE_ATTEMPTS):
            try:
                self._version = storage.put_if_absent(uri, self._record())
                break
            except storage.PreconditionFailed:
                pass
            current = self._read()
            if current is None:
                continue  # released between our create and our read: create again
            holder, version = current
            age = self._age(holder)
            if age < self.stale_after_s:
                raise LockHeld(
                    f"output {self.layout.output} is locked by run {holder.get('run_id')} on host "
                    f"{holder.get('host')} (pid {holder.get('pid')}), heartbeat {age:.0f}s ago; "
                    f"it is taken over once the heartbeat is {self.stale_after_s:.0f}s old"
                )
            try:
                self._version = storage.put_if_match(uri, self._record(), version, stale_claim_s=self.stale_after_s)
            except storage.PreconditionFailed:
                continue  # another run changed it first (took it over, or renewed it): read again
            log.warning(
                "took over the stale lock of run %s on host %s (pid %s, heartbeat %.0fs ago)",
                holder.get("run_id"),
                holder.get("host"),
                holder.get("pid"),
                age,
            )
            break
        else:
            raise LockHeld(f"output {self.layout.output}: its lock keeps changing hands; try again")
        self._thread = threading.Thread(target=self._beat, name="dtc-lock-heartbeat", daemon=True)
        self._thread.start()

    def _renew(self) -> bool | None:
        """Rewrite our record if `_lock` is still the version we wrote (the caller holds
        `_renewing`): True renewed; False lost (`self.lost` set); None not renewed but still ours
        (another writer's claim on our version is pending; local files)."""
        if self.lost is not None:
            return False
        if self._version is None:
            raise RuntimeError(f"the output lock of {self.layout.output} is not held (acquire() first)")
        try:
            self._version = storage.put_if_match(
                self.layout.lock, self._record(), self._version, stale_claim_s=self.stale_after_s
            )
            return True
        except storage.PreconditionFailed:
            pass
        current = self._read()
        if current is not None and current[0].get("token") == self.token:
            return None
        holder = {} if current is None else current[0]
        if current is None:
            message = (
                f"lost the output lock of {self.layout.output}: {self.layout.lock} is gone "
                "(another run took it over and has released it, or it was deleted)"
            )
        else:
            message = (
                f"lost the output lock of {self.layout.output} to run {holder.get('run_id')} "
                f"(host {holder.get('host')}, pid {holder.get('pid')})"
            )
        self.lost = LockLost(message, holder)
        log.error("%s; this run stops before its next write", message)
        return False

    def check(self, before: str = "its next output") -> None:
        """The fence: renew the lock now, or raise LockLost (`before` names the write it guards)."""
        with self._renewing:
            for attempt in range(RENEW_ATTEMPTS):
                renewed = self._renew()
                if renewed is not None:
                    break
                time.sleep(0.1 * (attempt + 1))
            else:  # still ours, but a takeover's claim keeps us from renewing it: as good as lost
                self.lost = LockLost(
                    f"could not renew the output lock of {self.layout.output}: another run is taking it over"
                )
        if self.lost is not None:
            raise LockLost(f"{self.lost}; stopped before writing {before}", self.lost.holder)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                with self._renewing:
                    if self._renew() is False:
                        return  # lost: reported; check() raises at the next write
            except Exception as e:  # noqa: BLE001 - a missed beat must not kill the run
                log.warning("lock heartbeat failed: %s", e)

    def release(self) -> None:
        """Stop the heartbeat; delete `_lock` only if it is still our version."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        with self._renewing:
            version, self._version = self._version, None
            if version is None or self.lost is not None:
                return
            try:
                storage.delete_if_match(self.layout.lock, version, stale_claim_s=self.stale_after_s)
            except storage.PreconditionFailed:
                holder = self.holder()
                if holder is not None and holder.get("token") != self.token:
                    log.warning("the output lock was taken over by run %s; left in place", holder.get("run_id"))
            except storage.StorageError as e:
                log.warning("could not release the output lock (it goes stale in %.0fs): %s", self.stale_after_s, e)

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
