"""The Ray nodes that died while a run streamed: `nodes_lost` in runs/<run_id>.json and a line
of the summary. Driver-side (no torch).

Ray keeps a dead node in its node table (`ray.nodes()`, `Alive: False`), so no event stream is
needed: `NodeWatch.start` sets aside the nodes already dead when the run began (an earlier loss
is not this run's), `poll` looks again between blocks (at most every POLL_EVERY_S) and `finish`
once at the end, which also catches a loss while Ray Data held the stream back to recover.
`at` is when the driver first saw the node dead, so it can be up to a poll late.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

__all__ = ["NodeWatch", "POLL_EVERY_S"]

log = logging.getLogger("dtc.render")

POLL_EVERY_S = 5.0


class NodeWatch:
    def __init__(self):
        self._ray = None  # None: not started (no Ray yet) or the node table could not be read
        self._dead_at_start: set[str] = set()
        self._last = 0.0
        self.lost: list[dict] = []  # {node_id, ip, at, reason}, in the order they were seen

    def start(self, ray) -> None:
        nodes = self._nodes(ray)
        if nodes is None:  # without a baseline every old loss would be reported as this run's
            return
        self._ray, self._last = ray, time.monotonic()
        self._dead_at_start = {n["NodeID"] for n in nodes if not n["Alive"]}

    def poll(self, force: bool = False) -> list[dict]:
        """Nodes newly seen dead (also appended to `lost`); [] between polls."""
        if self._ray is None or (not force and time.monotonic() - self._last < POLL_EVERY_S):
            return []
        self._last = time.monotonic()
        seen = self._dead_at_start | {n["node_id"] for n in self.lost}
        at = datetime.now(UTC).isoformat(timespec="seconds")
        new = [
            {
                "node_id": n["NodeID"],
                "ip": n.get("NodeManagerAddress"),
                "at": at,
                "reason": n.get("DeathReasonMessage") or None,
            }
            for n in self._nodes(self._ray) or []
            if not n["Alive"] and n["NodeID"] not in seen
        ]
        for n in new:
            log.warning("Ray node %s (%s) was lost: %s", n["node_id"][:12], n["ip"], n["reason"] or "no reason given")
        self.lost += new
        return new

    def finish(self) -> list[dict]:
        """Every node lost during the run, after one last look."""
        self.poll(force=True)
        return self.lost

    def summary_line(self) -> str | None:
        if not self.lost:
            return None
        nodes = ", ".join(f"{n['node_id'][:8]} ({n['ip']}, seen {n['at'][11:19]} UTC)" for n in self.lost)
        return (
            f"  nodes      {len(self.lost)} Ray node(s) lost during the run: {nodes}; see nodes_lost in the run record"
        )

    @staticmethod
    def _nodes(ray) -> list[dict] | None:
        try:
            return ray.nodes()
        except Exception as e:  # noqa: BLE001 - a GCS hiccup must not stop a run that Ray itself survives
            log.warning("could not list the Ray nodes: %s", e)
            return None
