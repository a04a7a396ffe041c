"""Does the plan fit the cluster? A run whose actor pool cannot start beside one task of the
other steps is refused before any work (exit 2), not left to wait for Ray's 30-minute timeout.

Ray Data starts the pool's minimum (`--actors MIN,...`) before the first block and keeps it;
what is left must hold one task of the largest task step (`dataflow.resource_plan`: Ray's own
shuffle and repartition steps take 1 CPU per task), or nothing moves. One such task is enough
for progress: the steps then take turns. Checked per node, as Ray places them: an actor or a
task cannot span nodes.

Only where no autoscaler can add nodes: `cluster_grows` reads Ray's own signals. A cluster that
may grow (or one whose autoscaler cannot be told apart yet) skips the refusal; the stall watchdog
(`pipeline.watchdog`) still stops a run that does not move. Driver-side (no torch).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from typing import TYPE_CHECKING

from pipeline.config import ConfigError, RunSpec

if TYPE_CHECKING:  # the driver imports this module before Ray (pipeline.run catches OverCapacity)
    from pipeline.dataflow import ResourcePlan

__all__ = ["OverCapacity", "check_capacity", "capacity_problem", "cluster_grows", "config_node_types"]

log = logging.getLogger("dtc.render")

EPS = 1e-6  # Ray keeps resource amounts to 1e-4; this only absorbs float noise (0.1 + 0.2)
REPORT_WAIT_S = 10.0  # a Ray just started writes its first autoscaler report within a few seconds


class OverCapacity(ConfigError):
    """The plan cannot start on this cluster: the message names the numbers and what to lower."""


def check_capacity(ray, spec: RunSpec, gpus_per_actor: float) -> None:
    """Raise OverCapacity when the run's plan cannot start on the cluster `ray` is connected to."""
    grows = cluster_grows(ray)
    if grows:
        log.info("capacity check skipped: %s", grows)
        return
    from pipeline.dataflow import resource_plan

    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    problem = capacity_problem(resource_plan(spec, gpus_per_actor), nodes, spec.cfg.actors)
    if problem:
        raise OverCapacity(problem)


def capacity_problem(plan: ResourcePlan, nodes: list[dict], actors: tuple[int, int]) -> str | None:
    """Why `plan` cannot start on `nodes` (each node's total resources), or None when it fits."""
    actor, lo = plan.actor, plan.min_actors
    task_cpus = max(task.get("CPU", 0.0) for task in plan.tasks.values())
    largest = "/".join(name for name, task in plan.tasks.items() if task.get("CPU", 0.0) == task_cpus)
    others = "/".join(name for name, task in plan.tasks.items() if task.get("CPU", 0.0) != task_cpus)
    pool = f"--actors {actors[0]},{actors[1]}"
    for name, each in actor.items():  # 1. the totals
        have = sum(node.get(name, 0.0) for node in nodes)
        need = lo * each + (task_cpus if name == "CPU" else 0.0)
        if need <= have + EPS:
            continue
        what = f"{pool} needs {lo} x {_n(each)} {name} for the model actors"
        if name == "CPU":
            what += f" plus {_n(task_cpus)} CPU for one {largest} task"
            what += f" ({others} take less)" if others else ""
        return (
            f"{what} = {_n(need)} {_plural(name)}; the cluster has {_n(have)} {_plural(name)} and no autoscaler: "
            f"lower --actors or {_knob(name)}"
        )
    # 2. per node: as many actors as fit on each, the task on whichever node keeps the most
    task = {"CPU": task_cpus}
    fits = [_actors_on(node, actor) for node in nodes]
    lefts = [_minus(node, task) for node in nodes]
    beside = [sum(fits) - fits[i] + _actors_on(left, actor) for i, left in enumerate(lefts) if left is not None]
    best = max(beside, default=None)
    if best is not None and best >= lo:
        return None
    shapes = ", ".join(_fmt(node, actor) for node in nodes) or "none"
    held = "no node has room for that task" if best is None else f"they hold only {best} of them beside the task"
    return (
        f"{pool} needs {lo} model actors of {_fmt(actor, actor)} beside one {largest} task of {_n(task_cpus)} CPU; "
        f"an actor cannot span nodes, the cluster's nodes are {shapes}: {held}, and no autoscaler adds nodes: "
        "lower --actors or what one actor asks (--cpus-per-actor, --gpus-per-actor)"
    )


def _actors_on(node: dict, actor: dict) -> int:
    """How many actors fit on `node`."""
    return min(math.floor(node.get(name, 0.0) / each + EPS) for name, each in actor.items())


def _minus(node: dict, task: dict) -> dict | None:
    """`node` with `task` placed on it, or None when the task does not fit there."""
    left = {name: node.get(name, 0.0) - task.get(name, 0.0) for name in set(node) | set(task)}
    return left if all(v >= -EPS for v in left.values()) else None


def _fmt(resources: dict, names: dict) -> str:
    """`{CPU: 1.0, GPU: 1.0}` over the resource names the actor asks for."""
    return "{" + ", ".join(f"{name}: {_n(resources.get(name, 0.0))}" for name in names) + "}"


def _n(amount: float) -> str:
    """1.0, 0.5, 2.25: the way Ray prints resource amounts."""
    text = f"{amount:g}"
    return text if "." in text or "e" in text else f"{text}.0"


def _plural(name: str) -> str:
    return f"{name}s" if name in ("CPU", "GPU") else name


def _knob(name: str) -> str:
    return {"CPU": "--cpus-per-actor (or add nodes)", "GPU": "--gpus-per-actor (0 renders on CPU)"}.get(
        name, f"actor_resources {name!r}"
    )


def cluster_grows(ray) -> str | None:
    """Why the cluster may still add nodes, or None when no autoscaler can.

    Ray's own signals, any one enough: autoscaler v2 is on (its flag in the GCS); Ray's cluster
    config names a node group that can scale (what Ray Data's own autoscaling check reads); the
    v1 autoscaler's report (what `ray status` prints: `ray up`, `ray start --autoscaling-config`,
    KubeRay's in-tree autoscaler) names node types of a config. Without an autoscaling config Ray
    runs that autoscaler read-only, each node its own type `node_<node id>`: a fixed cluster
    (a local Ray, a hand-started `ray start` cluster). No report to read (the monitor has not
    reported yet, or none runs): treated as may-grow, so a run is never refused on a guess."""
    try:
        from ray.autoscaler.v2.utils import is_autoscaler_v2

        if is_autoscaler_v2(fetch_from_server=True):
            return "the cluster runs autoscaler v2"
    except Exception as e:  # noqa: BLE001 - a signal we cannot read is not a "no"
        log.debug("autoscaler v2 flag unreadable: %s", e)
    try:
        from ray.data._internal.cluster_autoscaler.util import is_autoscaling_enabled

        if is_autoscaling_enabled():
            return "Ray's cluster config has node groups that scale"
    except Exception as e:  # noqa: BLE001
        log.debug("Ray's cluster config unreadable: %s", e)
    report = _autoscaler_report(ray)
    if report is None:
        return "the autoscaler's report could not be read: cannot tell whether the cluster autoscales"
    types = config_node_types(report)
    return f"the autoscaler runs with node types {types}" if types else None


def config_node_types(report: dict) -> list[str]:
    """The node types in a v1 autoscaler report that come from an autoscaling config (none for
    the read-only autoscaler, whose type for each node is `node_<its id>`)."""
    names = set((report.get("node_type_mapping") or {}).values())
    for key in ("active_nodes", "idle_nodes", "pending_launches"):
        names |= set(report.get(key) or {})
    return sorted(name for name in names if not re.fullmatch(r"node_[0-9a-f]+", name))


def _autoscaler_report(ray) -> dict | None:
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    deadline = time.monotonic() + REPORT_WAIT_S
    while True:
        try:
            status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
            report = json.loads(status).get("autoscaler_report") if status else None
        except Exception as e:  # noqa: BLE001
            log.debug("autoscaler status unreadable: %s", e)
            return None
        if report is not None or time.monotonic() > deadline:
            return report
        time.sleep(0.5)
