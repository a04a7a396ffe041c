"""NodeWatch on a stand-in for Ray's node table (`ray.nodes()`, whose rows it reads): nodes dead
before the run are not its losses, a loss is reported once, and a table that cannot be read
stops nothing. The real losses are in tests/integration/test_node_loss.py."""

from __future__ import annotations

from pipeline import nodes
from pipeline.nodes import NodeWatch


class NodeTable:
    """`ray.nodes()` as Ray 2.60 returns it (the fields NodeWatch reads), or its failure."""

    def __init__(self, *alive: str):
        self.rows = {node: True for node in alive}
        self.error: Exception | None = None

    def kill(self, node: str) -> None:
        self.rows[node] = False

    def nodes(self) -> list[dict]:
        if self.error:
            raise self.error
        return [
            {
                "NodeID": node,
                "Alive": alive,
                "NodeManagerAddress": "10.0.0.1",
                "DeathReasonMessage": "" if alive else "health check failed",
            }
            for node, alive in self.rows.items()
        ]


def test_only_losses_during_the_run_are_reported_once(monkeypatch):
    monkeypatch.setattr(nodes, "POLL_EVERY_S", 0.0)
    table = NodeTable("head", "a", "b")
    table.kill("old")  # dead before the run began
    watch = NodeWatch()
    watch.start(table)
    assert watch.poll() == []
    table.kill("a")
    (lost,) = watch.poll()
    assert (lost["node_id"], lost["ip"], lost["reason"]) == ("a", "10.0.0.1", "health check failed")
    assert lost["at"].endswith("+00:00")
    assert watch.poll() == []  # seen once
    table.kill("b")
    assert [n["node_id"] for n in watch.finish()] == ["a", "b"]
    assert "2 Ray node(s) lost" in watch.summary_line()


def test_polls_are_throttled_but_the_last_look_is_not():
    table = NodeTable("head", "a")
    watch = NodeWatch()
    watch.start(table)
    table.kill("a")
    assert watch.poll() == []  # within POLL_EVERY_S of the start: the table is not read
    assert [n["node_id"] for n in watch.finish()] == ["a"]


def test_an_unreadable_table_or_no_ray_stops_nothing():
    assert NodeWatch().finish() == [] and NodeWatch().summary_line() is None  # the run failed before Ray
    table = NodeTable("head")
    table.error = ConnectionError("GCS unavailable")
    watch = NodeWatch()
    watch.start(table)  # no baseline: watching would report old losses as this run's
    table.error = None
    table.kill("head")
    assert watch.finish() == []
    table = NodeTable("head", "a")
    watch = NodeWatch()
    watch.start(table)
    table.error = ConnectionError("GCS unavailable")
    assert watch.finish() == []
    table.error = None
    table.kill("a")
    assert [n["node_id"] for n in watch.finish()] == ["a"]
