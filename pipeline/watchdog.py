"""No silent stalls: a stream that yields no batch for `--stall-timeout-s` stops the run (exit 1)
with a message naming the stages that wait and what for. Driver-side (no torch).

Progress is a batch reaching the driver's loop (`RenderRun.stream`), or any step of the stream
finishing a task or yielding a block: a group-by is a barrier, and the resume stage's shuffle of
10M rows runs for minutes before the first batch (bench/RESULTS.md). The clock starts when the
dataset does, so model loading counts: a model that loads within the timeout is fine (a
`--compile` warm-up of several minutes needs a longer timeout). The time the driver spends on a
batch (writing its manifest part) does not count: only the waits inside Ray's iterator do.

The driver's main thread is blocked inside that iterator, so the watchdog is a thread of its own;
on a stall it reads the stages' state (Ray Data's executor, and the GCS for actors that have not
started) and raises `Stalled` in the main thread through `driver.raise_in_main_thread`, the
handler that makes SIGTERM into `Terminated`: the run record, the lock and the summary follow as
on any other failure. The stalled executor is then shut down (its actors and tasks killed), so a
shared cluster gets its resources back.

What the stages are doing is read from Ray Data internals (2.60: the executor thread's topology):
best effort, and the message says so when they cannot be read.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator

__all__ = ["Stalled", "StallWatchdog", "stage_report"]

log = logging.getLogger("dtc.render")


class Stalled(Exception):
    """No batch reached the driver for the stall timeout; the message names the waiting stages."""


@functools.cache
def _raised_in_ray_iterator() -> type[Stalled]:
    # Raised inside Ray Data's iterator: as Ray Data's own no-progress error it is kept off the
    # console (Ray logs it to ray-data.log); any other exception there is printed with a full
    # trace as "an error in Ray Data internal code, please open an issue".
    from ray.data.exceptions import ExecutionTimeoutError

    return type("Stalled", (Stalled, ExecutionTimeoutError), {"__module__": __name__})


class StallWatchdog:
    """`for batch in watchdog.watch(dataset.iter_batches(...))`; `timeout_s` 0 watches nothing.

    `describe(executors)` is the stall's explanation (`stage_report`); `interrupt(error)` raises
    it in the main thread (`driver.raise_in_main_thread`), False where it cannot."""

    def __init__(self, timeout_s: float, describe: Callable[[list], str], interrupt: Callable[[BaseException], bool]):
        self.timeout_s = timeout_s
        self.describe = describe
        self.interrupt = interrupt
        self.poll_s = min(1.0, timeout_s / 4)  # a late stop by up to this; a check is one clock read
        self.stalled: list = []  # the executors of a stalled stream, shut down when it ends
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the thread fires only while the main thread still waits
        self._waiting = False
        self._since = 0.0
        self._batches = 0

    def watch(self, batches: Iterator) -> Iterator:
        if self.timeout_s <= 0:
            yield from batches
            return
        before = set(_executors())  # the run's earlier datasets (compaction) are not this stream
        self._since, self._waiting = time.monotonic(), True
        thread = threading.Thread(target=self._run, args=(before,), name="dtc-stall-watchdog", daemon=True)
        thread.start()
        try:
            for batch in batches:
                with self._lock:
                    self._waiting = False
                    self._batches += 1
                yield batch  # the driver's own work on the batch runs here, off the clock
                self._since, self._waiting = time.monotonic(), True
        finally:
            self._stop.set()
            self._waiting = False
            for executor in self.stalled:
                _shutdown(executor)

    def _run(self, before: set) -> None:
        done = None
        while not self._stop.wait(self.poll_s):
            executors = [e for e in _executors() if e not in before]
            if (now := _tasks_done(executors)) != done:  # a step moved: progress, if not at the driver yet
                done, self._since = now, time.monotonic()
            if not self._waiting or time.monotonic() - self._since < self.timeout_s:
                continue
            since = "since the stream started" if not self._batches else f"since batch {self._batches}"
            message = (
                f"no progress for {self.timeout_s:g} s (no batch reached the driver {since}, "
                "no step finished a task): "
            )
            message += self.describe(executors)
            message += " (--stall-timeout-s)"
            with self._lock:
                if not self._waiting or self._stop.is_set():  # a batch came while we looked
                    continue
                self.stalled = executors
                if not self.interrupt(_raised_in_ray_iterator()(message)):
                    log.error("%s; this driver cannot be interrupted from here, so it keeps waiting", message)
            return


def _executors() -> list:
    """Ray Data's streaming executors alive in this process (each one is a thread)."""
    try:
        from ray.data._internal.execution.streaming_executor import StreamingExecutor
    except ImportError:
        return []
    return [t for t in threading.enumerate() if isinstance(t, StreamingExecutor)]


def _tasks_done(executors: list) -> int | None:
    """Tasks finished plus blocks yielded, over every step of `executors` (None: unreadable, so
    only the driver's batches count)."""
    try:
        return sum(
            op.metrics.num_tasks_finished + op.metrics.num_task_outputs_generated
            for executor in executors
            for op in list(executor._topology)
        )
    except Exception:  # noqa: BLE001
        return None


def _shutdown(executor) -> None:
    try:
        executor.shutdown(force=True)
    except Exception as e:  # noqa: BLE001 - the run is failing already; Ray's own GC would follow
        log.warning("could not shut the stalled stream down: %s", e)


def stage_report(executors: list, actor: dict[str, float]) -> str:
    """What each unfinished step of the stalled stream waits for, upstream first, and the free
    resources; `actor`: one model actor's resources (`dataflow.ResourcePlan.actor`)."""
    import ray

    try:
        free, total = ray.available_resources(), ray.cluster_resources()
        names = [name for name in dict.fromkeys(("CPU", "GPU", *actor)) if name in total]
        cluster = "free now " + ", ".join(f"{name} {free.get(name, 0.0):g} of {total[name]:g}" for name in names)
    except Exception as e:  # noqa: BLE001
        free, cluster = {}, f"free resources unknown ({e})"
    try:
        lines = [
            line
            for executor in executors
            for op, state in list(executor._topology.items())
            if op.input_dependencies and not op.has_execution_finished()
            if (line := _step_line(op, state, free, actor))
        ]
    except Exception as e:  # noqa: BLE001 - an explanation must not hide the stall itself
        return f"the stages' state could not be read ({type(e).__name__}: {e}); {cluster}"
    if not lines:
        lines = ["no step has work queued or running (the stream's executor may have ended)"]
    return "; ".join(lines) + f"; {cluster}"


def _step_line(op, state, free: dict, actor: dict[str, float]) -> str | None:
    queued = state.total_enqueued_input_blocks()
    queue = f", {_count(queued, 'block')} queued for it" if queued else ""
    pool = getattr(op, "_actor_pool", None)
    if pool is not None:
        info, minimum = op.get_actor_info(), pool.min_size()
        if info.running >= minimum and not queued:
            return None
        pending = []
        waiting, starting = _pending_actors(pool, info.pending)
        if waiting:
            pending.append(f"{waiting} waiting for resources {_fmt(actor)} each")
        if starting:
            pending.append(f"{starting} started but still in __init__ (loading the model)")
        if info.restarting:
            pending.append(f"{info.restarting} restarting")
        detail = f" (pending: {', '.join(pending)})" if pending else ""
        return f"stage {op.name} has {_count(info.running, 'running actor')} of min {minimum}{detail}{queue}"
    tasks = op.num_active_tasks()
    if not tasks and not queued:
        return None
    need = op.incremental_resource_usage()
    each = {name: amount for name, amount in (("CPU", need.cpu), ("GPU", need.gpu)) if amount}
    short = any(free.get(name, 0.0) < amount for name, amount in each.items())
    waits = f", waiting for {_fmt(each)} per task" if short and each else ""
    return f"{op.name} has {_count(tasks, 'submitted task')}{waits}{queue}"


def _pending_actors(pool, pending: int) -> tuple[int, int]:
    """(waiting for resources, started and in __init__) of a pool's pending actors: the GCS
    gives an actor a worker process (Pid) once Ray has placed it."""
    try:
        import ray

        actors = list(pool._pending_actors.values())
        started = sum(1 for a in actors if (ray._private.state.actors(a._actor_id.hex()) or {}).get("Pid"))
        return len(actors) - started, started
    except Exception:  # noqa: BLE001 - then all of them, unsplit
        return pending, 0


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{name}: {float(amount)!r}" for name, amount in resources.items()) + "}"
