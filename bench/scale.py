"""Driver scale benchmark: plan + resume filter of a 1M-row manifest, half of it already done.

    python bench/scale.py [--rows 1000000] [--files 4] [--done-fraction 0.5] [--profile]

Setup (not timed): a tiny DTC model folder (`jobs.make_model --preset tiny`), a generated
Parquet manifest of `--rows` rows in `--files` files (pair_id, context_uri, product_uri, bbox),
and an output whose `state/done.parquet` holds the `ok` rows of `--done-fraction` of the pairs
with this run's model and settings digests, each with a zero-byte image under `images/` at the
key `Layout(output).image(pair_id, "jpg")` (the resume filter only lists them).

Measured, in a fresh driver process so that its peak RSS (`ru_maxrss`) is this work alone:
`run_render(cfg, dry_run=True)`, which does on the driver exactly what a resumed run does
before Ray starts (check inputs + `plan_manifest`, reusable state = `load_state` + listing
`images/` + `reusable_state`, `StateIndex`, `pair_id_conflicts`) plus the resume filter over
every row (`planned_batches`: read + `validate_rows` + `resume_batch`) that the Ray read stage
runs in a real run. Per-stage seconds come from wrapping those project functions in place
(same code path, nothing re-implemented). Prints one JSON line for the setup, one for the
measurement; with `--profile`, a second (cProfile) driver prints the top functions.
Target (issue "Throughput"): 1M rows <= 60 s with driver peak RSS <= 2048 MB.
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

TARGET_S, TARGET_RSS_MB = 60.0, 2048.0


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
    """`state/done.parquet` with `done` ok rows (a fixed random half of the pairs) and their
    zero-byte images, exactly where and how a finished run leaves them."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.output.layout import Layout
    from pipeline.rows import stable_seed
    from pipeline.schema import EXTENSIONS, state_schema

    layout = Layout(output)
    chosen = np.sort(np.random.default_rng(0).permutation(rows)[:done])
    pair_ids = [f"p{i:0{width}d}" for i in chosen.tolist()]
    uris = [layout.image(pid, EXTENSIONS["jpeg"]) for pid in pair_ids]
    images_dir = os.path.join(output, "images")
    os.makedirs(images_dir, exist_ok=True)
    flags = os.O_CREAT | os.O_WRONLY
    for uri in uris:
        os.close(os.open(uri, flags, 0o644))
    n = len(pair_ids)
    table = pa.table(
        {
            "pair_id": pair_ids,
            "status": ["ok"] * n,
            "error_code": pa.nulls(n, pa.string()),
            "error_message": pa.nulls(n, pa.string()),
            "output_uri": uris,
            "width": np.full(n, 1024, np.int64),
            "height": np.full(n, 768, np.int64),
            "crop_box": pa.ListArray.from_arrays(
                pa.array(np.arange(0, 4 * n + 1, 4, dtype=np.int32)),
                pa.array(np.tile(np.array([0, 0, 512, 512], np.int64), n)),
            ),
            "seed": [stable_seed(pid) for pid in pair_ids],
            "model_digest": [model_digest] * n,
            "settings_digest": [settings_digest] * n,
            "clip_score": np.full(n, 27.5),
            "render_ms": np.full(n, 850.0),
            "finished_at": ["2026-11-26T03:12:45.123+00:00"] * n,
            "run_id": ["20261126T030000Z-abc123"] * n,
        },
        schema=state_schema(),
    )
    os.makedirs(os.path.dirname(layout.state), exist_ok=True)
    pq.write_table(table, layout.state)
    with open(layout.state_meta, "w") as f:
        json.dump({"compacted_runs": ["20261126T030000Z-abc123"], "pairs": n, "updated_at": time.time()}, f)


def setup(work: str, rows: int, files: int, done: int, model: str | None) -> dict:
    """Build (or reuse, when `work` already holds the same sizes) model, manifest and output."""
    from pipeline.config import RenderConfig
    from pipeline.model.checkpoint import check_dtc_checkpoint, model_digest

    key = f"rows={rows}-files={files}-done={done}"
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
    resolution, digest = int(check_dtc_checkpoint(model)["resolution"]), model_digest(model)
    _write_state(output, rows, done, width, digest, cfg.settings_digest(resolution))
    spec = {"manifest": manifest, "output": output, "model": model, "rows": rows, "files": files, "done": done}
    with open(spec_file, "w") as f:
        json.dump(spec, f)
    return {**spec, "reused_setup": False}


# -- measurement (child process) ---------------------------------------------------------------


def _where(path: str) -> str:
    return os.path.relpath(path, ROOT) if path.startswith(ROOT) else path


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


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def child(spec: dict, profile: int) -> None:
    """One dry run on the driver, with per-stage seconds and the peak RSS after each stage."""
    import collections
    import contextlib
    import io

    import pipeline.dry_run as dry_run_mod
    import pipeline.manifest as manifest_mod
    import pipeline.resume as resume_mod
    import pipeline.run as run_mod
    import pipeline.stages.read_stage as read_mod
    from pipeline.config import RenderConfig

    seconds: dict[str, float] = collections.defaultdict(float)
    peak_after: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[name] += time.perf_counter() - start
                peak_after[name] = _peak_mb()

        return wrapper

    def timed_iter(name, fn):
        def wrapper(*args, **kwargs):
            it = fn(*args, **kwargs)
            while True:
                start = time.perf_counter()
                try:
                    item = next(it)
                except StopIteration:
                    return
                finally:
                    seconds[name] += time.perf_counter() - start
                    peak_after[name] = _peak_mb()
                yield item

        return wrapper

    class TimedIndex(resume_mod.StateIndex):
        def __init__(self, state):
            timed("index", super().__init__)(state)

    # The run module's own globals and the module attributes the pipeline code looks up at call
    # time: the code path is run_render's, only observed.
    run_mod.plan_manifest = timed("plan", run_mod.plan_manifest)
    run_mod.reusable = timed("state", run_mod.reusable)
    run_mod.load_state = timed("state.load_state", run_mod.load_state)
    resume_mod.reusable_state = timed("state.reusable_state", resume_mod.reusable_state)
    dry_run_mod.StateIndex = TimedIndex
    dry_run_mod.pair_id_conflicts = timed("duplicates", dry_run_mod.pair_id_conflicts)
    read_mod.planned_batches = timed_iter("resume", read_mod.planned_batches)
    manifest_mod.iter_batches = timed_iter("resume.read", manifest_mod.iter_batches)
    read_mod.validate_rows = timed("resume.validate_rows", read_mod.validate_rows)
    read_mod.resume_batch = timed("resume.resume_batch", read_mod.resume_batch)

    cfg = RenderConfig(manifest=spec["manifest"], output=spec["output"], model=spec["model"])
    baseline_mb = _peak_mb()
    out = io.StringIO()
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out):
        result = run_mod.run_render(cfg, dry_run=True)
    total = time.perf_counter() - start
    if profiler is not None:
        profiler.disable()
    if result.exit_code != 0:
        raise SystemExit(f"dry run exited {result.exit_code}: {result.message}\n{out.getvalue()[-2000:]}")
    counts = result.counts
    known = ("plan", "state", "index", "duplicates", "resume")
    stages = {k: round(v, 3) for k, v in seconds.items()}
    stages["state.list_images"] = round(
        seconds["state"] - seconds["state.load_state"] - seconds["state.reusable_state"], 3
    )
    stages["other"] = round(
        total - sum(seconds[k] for k in known), 3
    )  # check_checkpoint, model digest, dry-run counting
    print(
        json.dumps(
            {
                "total_s": round(total, 3),
                "peak_rss_mb": _peak_mb(),
                "vm_hwm_mb": _hwm_mb(),
                "rss_mb_at_end": _rss_mb(),
                "baseline_peak_rss_mb": baseline_mb,
                "stages": stages,
                "peak_rss_mb_after": peak_after,
                "render": counts["pending"] + counts["invalid"],
                "reuse": counts["done"] + counts["failed"],
                "counts": {k: counts[k] for k in ("pending", "done", "failed", "invalid")},
            }
        ),
        flush=True,
    )
    if profiler is not None:
        import pstats

        for sort in ("tottime", "cumulative"):
            stats = pstats.Stats(profiler)
            stats.sort_stats(sort)
            top = []
            for func in stats.fcn_list[:profile]:
                cc, nc, tt, ct, _ = stats.stats[func]
                top.append(
                    {
                        "func": f"{_where(func[0])}:{func[1]}({func[2]})",
                        "calls": nc,
                        "tottime_s": round(tt, 3),
                        "cumtime_s": round(ct, 3),
                    }
                )
            print(json.dumps({"profile_sort": sort, "top": top}), flush=True)


def _run_setup(work: str, rows: int, files: int, done: int, model: str | None) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--setup", json.dumps([work, rows, files, done, model])]
    ran = subprocess.run(command, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True)
    if ran.returncode != 0:
        raise SystemExit(f"setup exited {ran.returncode}:\n{ran.stdout[-3000:]}\n{ran.stderr[-3000:]}")
    return json.loads(ran.stdout.strip().splitlines()[-1])


def run_child(spec: dict, profile: int) -> tuple[dict, list[dict]]:
    env = dict(os.environ, PYTHONPATH=ROOT)
    command = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec), "--profile", str(profile)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"measurement driver exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return lines[0], lines[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=4, help="Parquet files the manifest is split into")
    parser.add_argument("--done-fraction", type=float, default=0.5)
    parser.add_argument("--work", help="keep (and reuse) the generated data here instead of a temp folder")
    parser.add_argument("--model", help="an existing DTC model folder (default: build a tiny one)")
    parser.add_argument(
        "--profile", type=int, default=0, help="also run a cProfile'd driver and print the top N functions"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--setup", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.setup:
        print(json.dumps(setup(*json.loads(args.setup))), flush=True)
        return
    if args.child:
        child(json.loads(args.child), args.profile)
        return

    done = int(round(args.rows * args.done_fraction))
    work = args.work or tempfile.mkdtemp(prefix="dtc-bench-scale-")
    os.makedirs(work, exist_ok=True)
    try:
        # Setup runs in its own process: on Linux a child's ru_maxrss starts at its parent's RSS
        # at fork time (exec keeps the old image's high-water mark), so the parent that spawns
        # the measured driver must stay small.
        start = time.perf_counter()
        spec = _run_setup(work, args.rows, args.files, done, args.model)
        emit(
            bench="scale_setup",
            rows=args.rows,
            files=args.files,
            done=done,
            setup_s=round(time.perf_counter() - start, 2),
            reused=spec.pop("reused_setup"),
            counted=False,
        )
        result, _ = run_child(spec, 0)
        meets = result["total_s"] <= TARGET_S and result["peak_rss_mb"] <= TARGET_RSS_MB
        emit(
            bench="scale",
            rows=args.rows,
            done=done,
            files=args.files,
            plan_and_resume_s=result["total_s"],
            driver_peak_rss_mb=result["peak_rss_mb"],
            driver_vm_hwm_mb=result["vm_hwm_mb"],
            driver_baseline_rss_mb=result["baseline_peak_rss_mb"],
            stages=result["stages"],
            peak_rss_mb_after=result["peak_rss_mb_after"],
            render=result["render"],
            reuse=result["reuse"],
            counts=result["counts"],
            target_s=TARGET_S,
            target_rss_mb=TARGET_RSS_MB,
            meets_target=meets if args.rows >= 1_000_000 else None,
            **({} if args.rows >= 1_000_000 else {"note": "below 1M rows: meets_target is only judged at 1M"}),
        )
        if args.profile:
            _, profiles = run_child(spec, args.profile)
            for record in profiles:
                emit(bench="scale_profile", rows=args.rows, **record)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
