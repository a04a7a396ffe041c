"""Scale benchmark: plan + resume decision of a 1M- and a 10M-row manifest, half of each done.

    python bench/scale.py [--rows 1000000,10000000] [--done-fraction 0.5] [--work DIR]

Setup (not timed, own process): a tiny DTC model folder, a generated Parquet manifest
(pair_id, context_uri, product_uri, bbox) in one file per 250k rows, and an output whose
bucketed done index (`state/buckets/`, written with the project's own `bucket_of` and `Layout`)
holds `ok` rows of `--done-fraction` of the pairs with this run's model and settings digests.

Measured, in a fresh driver process per size (its peak RSS is this work alone), the steps a
render run takes before its first pair is prepared, with the run's own functions: `check`
(config, manifest plan, model), `init_ray` (a local Ray on every core here), `compact_state`
(the fold of unfinished runs: none here, so it only reads done.json) and the dataset up to the
resume stage (`dataflow.resumed_rows`: read, hash shuffle by state bucket, validate, conflicts,
bucket lookups), its rows counted per action by a task on the cluster, as a run hands them on
to the prepare stage without the driver seeing them. A thread samples the RSS of every Ray
worker process (the largest is printed: no worker may hold more than its share of the state).
Targets (issue #17): driver peak RSS <= 1 GB at 10M, <= 10% growth from 1M to 10M, and seconds
per row at 10M no worse than at 1M (linear).
"""

from __future__ import annotations

import os
import sys

from common import ROOT, tiny_model  # noqa: E402  (bench/common.py: bench/ is first on sys.path)

sys.path.insert(0, ROOT)  # bench/pipeline.py would shadow the `pipeline` package otherwise

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

TARGET_RSS_MB, TARGET_GROWTH = 1024.0, 0.10
ROWS_PER_FILE = 250_000


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


# -- setup (parent process, not timed) -------------------------------------------------------


def _pair_ids(start: int, stop: int, width: int):
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    digits = pc.utf8_lpad(pc.cast(pa.array(np.arange(start, stop, dtype=np.int64)), pa.string()), width, "0")
    return pc.binary_join_element_wise("p", digits, "")


def _write_manifest(folder: str, rows: int, files: int, width: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    os.makedirs(folder, exist_ok=True)
    bounds = np.linspace(0, rows, files + 1).astype(np.int64)
    for f in range(files):
        start, stop = int(bounds[f]), int(bounds[f + 1])
        n = stop - start
        idx = pa.array(np.arange(start, stop, dtype=np.int64))
        context = pc.binary_join_element_wise("context/", pc.cast(pc.divide(idx, 7), pa.string()), ".jpg", "")
        product = pc.binary_join_element_wise("products/", pc.cast(pc.remainder(idx, 5000), pa.string()), ".png", "")
        x0 = (np.arange(n) % 200).astype(np.float64)
        coords = np.stack([x0, x0 / 2, x0 + 300, x0 / 2 + 400], axis=1).ravel()
        bbox = pa.ListArray.from_arrays(pa.array(np.arange(0, 4 * n + 1, 4, dtype=np.int32)), pa.array(coords))
        table = pa.table(
            {"pair_id": _pair_ids(start, stop, width), "context_uri": context, "product_uri": product, "bbox": bbox}
        )
        pq.write_table(table, os.path.join(folder, f"part-{f:05d}.parquet"), row_group_size=128 * 1024)


def _write_state(output: str, rows: int, done: int, width: int, model_digest: str, settings_digest: str) -> None:
    """The bucketed done index with `done` ok rows (a fixed random half of the pairs), exactly
    where and how compaction leaves them (images are not checked without --verify-images)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipeline.output.layout import Layout
    from pipeline.output.state import STATE_BUCKETS, bucket_of
    from pipeline.rows import stable_seed
    from pipeline.schema import EXTENSIONS, state_schema

    layout = Layout(output)
    chosen = np.sort(np.random.default_rng(0).permutation(rows)[:done])
    pair_ids = _pair_ids(0, rows, width).take(pa.array(chosen))
    n = len(pair_ids)
    table = pa.table(
        {
            "pair_id": pair_ids,
            "status": pa.array(["ok"] * n),
            "error_code": pa.nulls(n, pa.string()),
            "error_message": pa.nulls(n, pa.string()),
            "output_uri": pc.binary_join_element_wise(layout.images_dir + "/", pair_ids, "." + EXTENSIONS["jpeg"], ""),
            "width": np.full(n, 1024, np.int64),
            "height": np.full(n, 768, np.int64),
            "crop_box": pa.ListArray.from_arrays(
                pa.array(np.arange(0, 4 * n + 1, 4, dtype=np.int32)),
                pa.array(np.tile(np.array([0, 0, 512, 512], np.int64), n)),
            ),
            "seed": pa.array([stable_seed(p) for p in pair_ids.to_pylist()], pa.int64()),
            "model_digest": pa.array([model_digest] * n),
            "settings_digest": pa.array([settings_digest] * n),
            "clip_score": np.full(n, 27.5),
            "render_ms": np.full(n, 850.0),
            "finished_at": pa.array(["2026-11-26T03:12:45.123+00:00"] * n),
            "run_id": pa.array(["20261126T030000Z-abc123"] * n),
        },
        schema=state_schema(),
    )
    buckets = bucket_of(table["pair_id"])
    table = table.append_column("b", buckets).sort_by("b")
    sorted_buckets = table["b"].to_numpy()
    bounds = np.searchsorted(sorted_buckets, np.arange(STATE_BUCKETS + 1))
    os.makedirs(layout.state_buckets_dir, exist_ok=True)
    pairs = {}
    for b in range(STATE_BUCKETS):
        part = table.slice(int(bounds[b]), int(bounds[b + 1] - bounds[b])).drop_columns(["b"])
        pq.write_table(part, layout.state_bucket(b))
        pairs[f"{b:04d}"] = part.num_rows
    meta = {
        "layout": 2,
        "buckets": STATE_BUCKETS,
        "compacted_runs": ["20261126T030000Z-abc123"],
        "pairs": n,
        "bucket_pairs": pairs,
        "updated_at": time.time(),
    }
    with open(layout.state_meta, "w") as f:
        json.dump(meta, f)


def setup(work: str, rows: int, done: int, model: str | None) -> dict:
    """Build (or reuse, when `work` already holds the same sizes) model, manifest and output."""
    from pipeline.config import RenderConfig
    from pipeline.model.checkpoint import check_model_checkpoint, model_digest

    files = max(1, rows // ROWS_PER_FILE)
    key = f"rows={rows}-done={done}"
    spec_file = os.path.join(work, f"setup-{key}.json")
    if os.path.exists(spec_file):
        with open(spec_file) as f:
            return {**json.load(f), "reused_setup": True}
    if model is None:
        model = tiny_model(work)
    width = max(7, len(str(rows - 1)))
    manifest = os.path.join(work, f"manifest-{key}")
    output = os.path.join(work, f"out-{key}")
    shutil.rmtree(manifest, ignore_errors=True)
    shutil.rmtree(output, ignore_errors=True)
    _write_manifest(manifest, rows, files, width)
    cfg = RenderConfig(manifest=manifest, output=output, model=model)  # the run's settings: defaults
    resolution, digest = int(check_model_checkpoint(model)["resolution"]), model_digest(model)
    _write_state(output, rows, done, width, digest, cfg.settings_digest(resolution))
    spec = {"manifest": manifest, "output": output, "model": model, "rows": rows, "files": files, "done": done}
    with open(spec_file, "w") as f:
        json.dump(spec, f)
    return {**spec, "reused_setup": False}


# -- measurement (child process) ---------------------------------------------------------------


def _peak_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _hwm_mb() -> float:
    """VmHWM: this process image's own peak RSS (reset by exec, unlike ru_maxrss)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def _memory_mb(pid: int) -> tuple[float, float]:
    """(RSS, RSS outside the object store) of a process, from /proc/<pid>/smaps: a worker maps
    the plasma store (`/dev/shm/plasma*`), and the pages of the objects it wrote count in its
    RSS (and in psutil's USS, while no other process maps them) though they are not its heap."""
    total = store = 0
    in_store = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if line[0] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
                in_store = "/dev/shm/plasma" in line
            elif line.startswith("Rss:"):
                kb = int(line.split()[1])
                total += kb
                store += kb if in_store else 0
    return total / 1024, (total - store) / 1024


class WorkerSampler:
    """The largest RSS, and RSS outside the object store, of any worker process of this
    driver's Ray (descendants of this process: its raylet's workers), sampled every 0.5 s."""

    def __init__(self):
        import threading

        self.rss = self.own = 0.0
        self.name = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.wait(0.5):
            for proc in me.children(recursive=True):
                try:
                    cmdline = " ".join(proc.cmdline())
                    if not cmdline.startswith("ray::") or "IDLE" in cmdline:
                        continue
                    rss, own = _memory_mb(proc.pid)
                except (psutil.NoSuchProcess, psutil.AccessDenied, FileNotFoundError, ProcessLookupError):
                    continue
                if own > self.own:
                    self.own, self.name = own, cmdline.split("(")[0]
                self.rss = max(self.rss, rss)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {
            "largest_worker_rss_mb": round(self.rss, 1),
            "largest_worker_heap_mb": round(self.own, 1),
            "largest_worker": self.name,
        }


def _count_actions(batch):
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipeline.schema import REUSE

    reuse = int(pc.sum(pc.equal(batch["action"], REUSE)).as_py() or 0)
    invalid = int(pc.sum(pc.not_equal(batch["error_code"], "")).as_py() or 0)
    return pa.table({"rows": [batch.num_rows], "reuse": [reuse], "invalid": [invalid]})


def child(spec: dict) -> None:
    """The run's steps up to the resume stage, timed, in this (fresh) driver process."""
    import pyarrow as pa

    from pipeline.config import RenderConfig
    from pipeline.dataflow import resumed_rows, stage_configs
    from pipeline.driver import init_ray
    from pipeline.output.layout import Layout
    from pipeline.output.state import compact_state
    from pipeline.run import check

    pa.set_memory_pool(pa.system_memory_pool())  # as run_render does
    cfg = RenderConfig(manifest=spec["manifest"], output=spec["output"], model=spec["model"])
    baseline_mb = _peak_mb()
    seconds = {}
    start = time.perf_counter()
    run = check(cfg)
    seconds["check_and_plan"] = time.perf_counter() - start
    mark = time.perf_counter()
    init_ray(None)
    seconds["ray_start"] = time.perf_counter() - mark
    sampler = WorkerSampler()
    mark = time.perf_counter()
    compact_state(Layout(run.output), num_cpus=run.cfg.cpu_stage_cpus, exclude_run=run.run_id)
    seconds["fold"] = time.perf_counter() - mark
    mark = time.perf_counter()
    read, resume, *_ = stage_configs(run, 0.0)
    rows = resumed_rows(run, read, resume).map_batches(_count_actions, batch_format="pyarrow", num_cpus=0.25)
    totals = {"rows": 0, "reuse": 0, "invalid": 0}
    for batch in rows.iter_batches(batch_format="pyarrow", batch_size=None):
        for key in totals:
            totals[key] += int(pa.compute.sum(batch[key]).as_py())
    seconds["resume"] = time.perf_counter() - mark
    total = time.perf_counter() - start - seconds["ray_start"]
    workers = sampler.stop()
    print(
        json.dumps(
            {
                "plan_and_resume_s": round(total, 3),
                "driver_peak_rss_mb": _peak_mb(),
                "driver_vm_hwm_mb": _hwm_mb(),
                "driver_baseline_rss_mb": baseline_mb,
                "seconds": {k: round(v, 3) for k, v in seconds.items()},
                **workers,
                **totals,
            }
        ),
        flush=True,
    )


def _run_setup(work: str, rows: int, done: int, model: str | None) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--setup", json.dumps([work, rows, done, model])]
    ran = subprocess.run(command, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True)
    if ran.returncode != 0:
        raise SystemExit(f"setup exited {ran.returncode}:\n{ran.stdout[-3000:]}\n{ran.stderr[-3000:]}")
    return json.loads(ran.stdout.strip().splitlines()[-1])


def run_child(spec: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT, RAY_ADDRESS="")
    command = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"measurement driver exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")][0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="1000000,10000000", help="manifest sizes, comma-separated")
    parser.add_argument("--done-fraction", type=float, default=0.5)
    parser.add_argument("--work", help="keep (and reuse) the generated data here instead of a temp folder")
    parser.add_argument("--model", help="an existing DTC model folder (default: build a tiny one)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--setup", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.setup:
        print(json.dumps(setup(*json.loads(args.setup))), flush=True)
        return
    if args.child:
        child(json.loads(args.child))
        return

    sizes = [int(r) for r in args.rows.split(",")]
    work = args.work or tempfile.mkdtemp(prefix="dtc-bench-scale-")
    os.makedirs(work, exist_ok=True)
    results = []
    try:
        for rows in sizes:
            done = int(round(rows * args.done_fraction))
            # Setup runs in its own process: on Linux a child's ru_maxrss starts at its parent's
            # RSS at fork time, so the parent that spawns the measured driver must stay small.
            start = time.perf_counter()
            spec = _run_setup(work, rows, done, args.model)
            emit(
                bench="scale_setup",
                rows=rows,
                files=spec["files"],
                done=done,
                setup_s=round(time.perf_counter() - start, 2),
                reused=spec.pop("reused_setup"),
            )
            result = run_child(spec)
            expected = {"rows": rows, "reuse": done, "invalid": 0}
            correct = all(result[k] == v for k, v in expected.items())
            results.append(result)
            emit(bench="scale", manifest_rows=rows, done=done, files=spec["files"], correct=correct, **result)
            if not args.work:
                shutil.rmtree(spec["manifest"], ignore_errors=True)
                shutil.rmtree(spec["output"], ignore_errors=True)
        if len(sizes) > 1:
            small, large = results[0], results[-1]
            growth = large["driver_peak_rss_mb"] / small["driver_peak_rss_mb"] - 1
            per_row = (large["plan_and_resume_s"] / sizes[-1]) / (small["plan_and_resume_s"] / sizes[0])
            emit(
                bench="scale_growth",
                rows=[sizes[0], sizes[-1]],
                driver_peak_rss_mb=[small["driver_peak_rss_mb"], large["driver_peak_rss_mb"]],
                driver_rss_growth=round(growth, 4),
                seconds_per_row_ratio=round(per_row, 3),
                largest_worker_rss_mb=[small["largest_worker_rss_mb"], large["largest_worker_rss_mb"]],
                largest_worker_heap_mb=[small["largest_worker_heap_mb"], large["largest_worker_heap_mb"]],
                target_max_rss_mb=TARGET_RSS_MB,
                target_max_growth=TARGET_GROWTH,
                meets_target=large["driver_peak_rss_mb"] <= TARGET_RSS_MB
                and growth <= TARGET_GROWTH
                and per_row <= 1.0,
            )
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
