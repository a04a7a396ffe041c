"""Real processes contending for one output's `_lock`: spawned (nothing shared but the storage),
on local files (tests/unit/test_output_lock.py) or the moto S3 endpoint (tests/integration/test_lock.py).

- `race`: n processes released by one barrier call `OutputLock.acquire` at the same instant.
- `crashed_holder`: a process that takes the lock and is SIGKILLed (its record stays, going stale).
- `frozen_holder_taken_over`: a holder SIGSTOPped past the stale limit, taken over, then let go.
- as a script, `python tests/contenders.py GO_FILE ARGS...` is `python -m jobs.render ARGS` started
  once GO_FILE exists: its imports are done before (it then leaves `GO_FILE.ready-<pid>`), so
  several jobs reach the lock together.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import time

from pipeline.output.layout import Layout
from pipeline.output.lock import LockHeld, LockLost, OutputLock


def _contend(output: str, run_id: str, stale_after_s: float, barrier, results, done) -> None:
    lock = OutputLock(Layout(output), run_id, stale_after_s=stale_after_s)
    barrier.wait()
    try:
        lock.acquire()
    except LockHeld as e:
        results.put((run_id, "held", str(e)))
        return
    results.put((run_id, "acquired", lock.token))
    done.wait(120)  # hold it until every contender has answered
    lock.release()


def race(output: str, n: int = 8, stale_after_s: float = 60.0) -> tuple[dict[str, tuple[str, str]], dict | None]:
    """({run_id: ("acquired", token) | ("held", LockHeld message)}, the `_lock` record while the
    winner still holds it) for n contenders r0..r{n-1}."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results, done = ctx.Barrier(n), ctx.Queue(), ctx.Event()
    procs = [
        ctx.Process(target=_contend, args=(output, f"r{i}", stale_after_s, barrier, results, done)) for i in range(n)
    ]
    for p in procs:
        p.start()
    try:
        outcomes = {}
        for _ in range(n):
            run_id, outcome, detail = results.get(timeout=120)
            outcomes[run_id] = (outcome, detail)
        holder = observer(output).holder()
    finally:
        done.set()
        for p in procs:
            p.join(60)
    assert [p.exitcode for p in procs] == [0] * n
    return outcomes, holder


def assert_one_winner(outcomes: dict[str, tuple[str, str]], holder: dict | None) -> str:
    """Exactly one contender acquired, `_lock` is its record, every other was refused naming it."""
    winners = [run_id for run_id, (outcome, _) in outcomes.items() if outcome == "acquired"]
    assert len(winners) == 1, outcomes
    (winner,) = winners
    assert holder is not None and (holder["run_id"], holder["token"]) == (winner, outcomes[winner][1])
    for run_id, (outcome, message) in outcomes.items():
        if run_id != winner:
            assert outcome == "held" and f"locked by run {winner} on host" in message, (run_id, message)
    return winner


def assert_fenced(report: dict, taker: OutputLock, holder_after: dict | None) -> None:
    """The frozen holder found by itself (heartbeat) and at its fence (check) that the taker has
    the lock, and its release left the taker's lock in place."""
    assert report["heartbeat"] and "lost the output lock" in report["heartbeat"], report
    assert "to run taker" in report["heartbeat"], report
    assert "to run taker" in report["check"] and "stopped before writing the test's write" in report["check"]
    assert report["check_holder"] == "taker"
    assert holder_after is not None and holder_after["token"] == taker.token


def observer(output: str, stale_after_s: float = 60.0) -> OutputLock:
    """An OutputLock that only reads (holder()), or takes over when a test says so."""
    return OutputLock(Layout(output), "observer", stale_after_s=stale_after_s)


def wait_stale(output: str, stale_after_s: float, timeout: float = 60.0) -> dict:
    """Wait until `_lock`'s heartbeat is older than `stale_after_s`; returns the record."""
    deadline = time.monotonic() + timeout
    while True:
        holder = observer(output).holder()
        assert holder is not None, "no _lock"
        if time.time() - float(holder["heartbeat"]) > stale_after_s:
            return holder
        assert time.monotonic() < deadline, holder
        time.sleep(0.1)


def _wait_file(path: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, path
        time.sleep(0.02)


def _hold(output: str, run_id: str, stale_after_s: float, folder: str) -> None:
    """Take the lock; once `go` exists, report how the lock fared: files only, as the test
    freezes this process (a frozen process must hold no lock the test needs)."""
    lock = OutputLock(Layout(output), run_id, stale_after_s=stale_after_s)
    lock.acquire()
    open(os.path.join(folder, "ready"), "w").close()
    _wait_file(os.path.join(folder, "go"))
    deadline = time.monotonic() + 60
    while lock.lost is None and time.monotonic() < deadline:  # the heartbeat thread finds out by itself
        time.sleep(0.05)
    report = {"heartbeat": None if lock.lost is None else str(lock.lost)}
    try:
        lock.check("the test's write")
        report["check"] = "passed"
    except LockLost as e:
        report["check"] = str(e)
        report["check_holder"] = e.holder.get("run_id")
    lock.release()
    with open(os.path.join(folder, "report.json"), "w") as f:
        json.dump(report, f)


def _hold_until_killed(output: str, run_id: str, stale_after_s: float, folder: str) -> None:
    OutputLock(Layout(output), run_id, stale_after_s=stale_after_s).acquire()
    open(os.path.join(folder, "ready"), "w").close()
    time.sleep(600)


def crashed_holder(output: str, run_id: str, stale_after_s: float, folder: str) -> None:
    """A process takes the lock and is SIGKILLed: no release, its record stays."""
    p = multiprocessing.get_context("spawn").Process(
        target=_hold_until_killed, args=(output, run_id, stale_after_s, folder)
    )
    p.start()
    try:
        _wait_file(os.path.join(folder, "ready"), timeout=60)
    finally:
        p.kill()
        p.join(30)


def frozen_holder_taken_over(output: str, stale_after_s: float, folder: str) -> tuple[dict, OutputLock, dict]:
    """A holder ("frozen") is SIGSTOPped until its lock is stale, a "taker" takes it over, and
    the holder is let go (SIGCONT): (the holder's report, the taker (still holding), the `_lock`
    record after the holder's release). The caller releases the taker."""
    p = multiprocessing.get_context("spawn").Process(target=_hold, args=(output, "frozen", stale_after_s, folder))
    p.start()
    try:
        _wait_file(os.path.join(folder, "ready"), timeout=60)
        os.kill(p.pid, signal.SIGSTOP)
        wait_stale(output, stale_after_s)
        taker = OutputLock(Layout(output), "taker", stale_after_s=stale_after_s)
        taker.acquire()
        open(os.path.join(folder, "go"), "w").close()
        os.kill(p.pid, signal.SIGCONT)
        p.join(120)
        assert p.exitcode == 0, p.exitcode
        with open(os.path.join(folder, "report.json")) as f:
            report = json.load(f)
        return report, taker, taker.holder()
    finally:
        if p.is_alive():
            os.kill(p.pid, signal.SIGCONT)
            p.kill()


if __name__ == "__main__":
    import runpy

    import pipeline.run  # noqa: F401 - the job's imports, done before the gate opens

    open(f"{sys.argv[1]}.ready-{os.getpid()}", "w").close()
    _wait_file(sys.argv[1])
    sys.argv = ["jobs/render.py", *sys.argv[2:]]
    runpy.run_module("jobs.render", run_name="__main__", alter_sys=True)
