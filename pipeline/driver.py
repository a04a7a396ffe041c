"""What both drivers (`pipeline.run`, the render job; `pipeline.train.recipe`, the training job)
do around their work: refuse an output they cannot write, start or join Ray with a quiet
console, and turn SIGTERM / Ctrl-C into an exception so the run record, the lock and Ray's
shutdown happen as on any other failure. Driver-side (no torch; Ray is imported when started).
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid

from pipeline.config import ConfigError

__all__ = [
    "absolute_uri",
    "check_writable",
    "init_ray",
    "quiet_console",
    "Terminated",
    "terminate_as_exception",
    "raise_in_main_thread",
]


def absolute_uri(uri: str | None) -> str | None:
    """A local path made absolute on the driver (a URI with a scheme, None and "" as they are):
    Ray workers run in other folders, so a relative path must mean what it meant where the user
    typed it."""
    return uri if not uri or "://" in uri else os.path.abspath(uri)


def check_writable(output: str, probe: bool = True) -> None:
    """A local --output that cannot be created or written is refused now (exit 2, nothing
    written), not when the lock is first written. The probe file is removed at once."""
    parent = output
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"--output {output} cannot be created: {parent} is a file")
    if not probe:
        return
    probe = os.path.join(parent, f".dtc-write-probe-{uuid.uuid4().hex[:8]}")
    try:
        with open(probe, "wb"):
            pass
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"--output {output} cannot be written: {parent}: {e.strerror or e}") from e


def init_ray(address: str | None):
    """Ray, joined at `address` (or RAY_ADDRESS, which `ray job submit` sets for its
    entrypoint); with neither, a fresh local Ray of this process's own, never a cluster some
    earlier `ray start` left running on the machine (`--address auto` joins that one)."""
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            with _loopback_only(), _quiet("ray._private.authentication.authentication_token_setup"):
                ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
    quiet_console(ray)
    # A hash-shuffle map task (the resume stage's group-by, the index's fold) takes input blocks
    # of up to this many bytes at once and peaks at 2-3x that: Ray's 1 GiB default made one
    # worker hold ~3 GB at 10M rows (bench/scale.py); 64 MiB keeps each worker to its share.
    ray.data.DataContext.get_current().shuffle_input_batch_bytes = 64 << 20
    return ray


@contextlib.contextmanager
def _quiet(logger_name: str):
    """Ray's notice on a logger kept off the console while the local Ray starts (its token-auth
    line says that a new local Ray enables token auth, which it does: nothing to act on)."""
    logger = logging.getLogger(logger_name)
    old = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)


@contextlib.contextmanager
def _loopback_only():
    """A job's own local Ray on 127.0.0.1 only: its GCS, raylet, object manager and workers
    listen on the loopback interface, not on every one (nothing outside this machine joins a
    job's private Ray). `ray.init(_node_ip_address="127.0.0.1")` does not do it: Ray resolves a
    loopback address to the machine's external one. Ray's own switch is the node-IP rule it
    uses where it runs no clusters (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`: the node IP is the
    loopback one, and the servers bind to the node IP). Set while the local Ray starts (its
    processes inherit it), then put back, so a later `ray.init(address=...)` in this process
    resolves its node IP as usual."""
    from ray._private import ray_constants

    name = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    old_env, old_flag = os.environ.get(name), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[name], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old_flag
        if old_env is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old_env


def quiet_console(ray) -> None:
    """The console gets the run's progress lines, its summary and the workers' warnings (GPU
    out of memory, a worker death); Ray Data's progress bars and execution-plan lines go to its
    log file (`ray-data.log` in the session's log folder) only."""
    import ray.data
    from ray.data._internal.logging import SessionFileHandler

    ray.data.DataContext.get_current().enable_progress_bars = False
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, SessionFileHandler):
            handler.setLevel(logging.ERROR)


class Terminated(Exception):
    """The run was asked to stop (SIGTERM, SIGINT)."""


def terminate_as_exception():
    """SIGTERM and SIGINT raise Terminated in the driver's main thread, so the run record, the
    lock and Ray's shutdown happen as on any other failure (a bare SIGTERM would leave Ray's
    agents running); returns the function that puts the old handlers back."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        if signum == signal.SIGINT and _RAISE_NEXT:  # sent by raise_in_main_thread
            raise _RAISE_NEXT.pop()
        _STOPPED.append(signal.Signals(signum).name)
        raise Terminated(f"stopped by {signal.Signals(signum).name}")

    _STOPPED.clear()
    handler.raises_for_threads = True
    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    return lambda: [signal.signal(sig, previous) for sig, previous in old.items()]


_RAISE_NEXT: list[BaseException] = []  # what terminate_as_exception's handler raises on the next SIGINT
_STOPPED: list[str] = []  # the signals terminate_as_exception's handler raised Terminated for


def raise_if_stopped() -> None:
    """Terminated again for a signal whose exception was swallowed where it landed: one raised
    in the middle of an import is turned into a warning by a Cython module's init, and the run
    would go on as if never asked to stop. The driver calls this between its steps."""
    if _STOPPED:
        raise Terminated(f"stopped by {_STOPPED[-1]}")


def raise_in_main_thread(error: BaseException) -> bool:
    """From another thread (the stall watchdog): `error` raised in the driver's main thread by
    terminate_as_exception's handler. A real SIGINT to that one thread (not to Ray's workers), so
    a wait inside Ray's iterator is interrupted as Ctrl-C would interrupt it. False where that
    handler is not installed (a run started off the main thread): nothing is raised."""
    import signal
    import threading

    if not getattr(signal.getsignal(signal.SIGINT), "raises_for_threads", False):
        return False
    _RAISE_NEXT.append(error)
    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
    return True
