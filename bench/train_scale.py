"""Training at catalog scale: the training job on a prepared-sample store of 10k, 100k and 1M
samples, and the 1.2M-pair plan from measured per-sample costs. One JSON line per measurement.

    python bench/train_scale.py [--sizes 10000,100000,1000000] [--steps 30] [--workers 2]

1. A real store: the learnable toy catalog (32 pairs) prepared by `jobs.train --prepare-only` at
   the train-tiny preset (R = 64, S = 56).
2. Per size N: a manifest of N train rows (the toy's train rows repeated under new pair_ids, its
   val rows kept as they are, so validation costs the same at every size) and, at the digest
   `jobs.train` computes for that manifest (`store.prep_inputs`, `TrainRecipe.prepare_config`),
   a store of those N samples written with the store's own part encoder (`store.encode_part`):
   every sample has its own row in its own row group of its own part, as a prepared store would;
   the payload bytes repeat (replicated rows: building it costs seconds per 10k rows, preparing
   1M real pairs is what the plan below projects).
3. `python -m jobs.train` on that manifest, joining a Ray head this bench starts (`ray start
   --head`, loopback only), `--steps` steps of `--workers` workers: the store is found complete
   (nothing prepared) and the workers read it. Sampled every 0.2 s: the job's (driver) RSS, the
   largest Ray Train worker's RSS, the object store's use (`ray memory --stats-only`); steps/s
   from the run's train.jsonl (after the first window).
4. At 512^2 (the paper's resolution) on this machine: a worker's read + decode + augmentation
   ms per sample (`reader.StoreReader.fetch` + `samples.build_batch`, photo-like noise in the
   synthetic photos), turned into CPU cores per GPU and GPU-days for 1.2M pairs x 40 epochs at the
   cost model's samples/s per GPU. The store's bytes per sample, size and preparation core-hours
   for 1.2M pairs are bench/store.py's (section `store`): one definition each.

What it does not show: disk or S3 throughput at 1M distinct samples (the replicated payloads
compress alike and the page cache holds more of them than of a real store), and GPU step times
(the cost model's samples/s per GPU is docs/training.md's estimate, not a measurement here).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import ROOT  # noqa: E402  (bench/common.py: bench/ is first on sys.path)

PYTHON = sys.executable
RAY = os.path.join(os.path.dirname(sys.executable), "ray")
TOY_PAIRS = 32
PAIRS_1_2M = 1_200_000
EPOCHS_PAPER = 40
# docs/training.md's cost model: samples/s per A100 at 512^2 and 35% MFU, with the x0 decode every
# step (~13 TFLOP a sample) and every 4th (~7.75). An estimate, not a measurement here.
GPU_SAMPLES_PER_S = (8.0, 14.0)


def emit(**record) -> None:
    print(json.dumps({"bench": "train_scale", **record}), flush=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT, RAY_USAGE_STATS_ENABLED="0")
    return subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True, text=True, **kwargs)


# -- 1./2. the stores -----------------------------------------------------------------------------


def train_config(manifest: str, model: str, output: str, steps: int, workers: int, address: str | None):
    from pipeline.train.config import TrainConfig

    return TrainConfig(
        manifest=manifest,
        init_model=model,
        output=output,
        run_id="scale",
        steps=steps,
        batch_size=8 * workers,
        learning_rate=1e-3,
        workers=workers,
        cpus_per_worker=0.5,
        torch_threads=1,
        data_cpus=0.25,
        pixel_weight=0.0,
        perceptual_weight=0.0,
        gradient_checkpointing=False,
        checkpoint_every=steps,
        log_every=5,
        val_renders=0,
        address=address,
    )


def build_scaled(source_store: str, toy_manifest: str, model: str, folder: str, n: int, cfg_args: dict) -> dict:
    """The N-row manifest and its store (see the module docstring, 2.); returns what was built."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipeline import storage
    from pipeline.train import store
    from pipeline.train.recipe import TrainRecipe

    began = time.perf_counter()
    toy = pq.read_table(toy_manifest)
    split = pc.fill_null(toy["split"], "train") if "split" in toy.column_names else None
    train_rows = np.flatnonzero(pc.equal(split, "train").to_numpy(zero_copy_only=False))
    val = toy.filter(pc.equal(split, "val"))
    cycle = train_rows[np.arange(n) % len(train_rows)]
    scaled = toy.take(pa.array(cycle))
    scaled = scaled.set_column(
        scaled.schema.get_field_index("pair_id"), "pair_id", pa.array([f"scale-{i:08d}" for i in range(n)])
    )
    scaled = scaled.set_column(scaled.schema.get_field_index("split"), "split", pa.array(["train"] * n))
    manifest_path = os.path.join(folder, f"scaled-{n}.parquet")  # beside the toy's images: same relative URIs
    # row groups of 64k rows, as a manifest written by a data pipeline has (not one of N rows)
    pq.write_table(pa.concat_tables([scaled, val.cast(scaled.schema)]), manifest_path, row_group_size=65536)

    output = os.path.join(folder, f"out-{n}")
    recipe = TrainRecipe(train_config(manifest_path, model, output, **cfg_args))
    recipe.check()
    config, cfg = recipe.prepare_config(), recipe.cfg
    inputs = store.prep_inputs(recipe.spec.plan, config, cfg.store_part_rows)
    uri = store.store_uri(output, store.prep_digest(inputs))

    # the prepared rows by source pair_id, from the real store's parts
    source = json.loads(storage.read_bytes(storage.join(source_store, "store.json")))
    prepared = pa.concat_tables(
        [pq.read_table(storage.join(source_store, "parts", f"{p}.parquet")) for p in source["parts"]]
    )
    prepared = prepared.filter(pc.equal(pc.fill_null(prepared["error_code"], ""), ""))
    by_id = {pid: i for i, pid in enumerate(prepared["pair_id"].to_pylist())}
    source_ids = toy["pair_id"].to_pylist()
    full = pq.read_table(manifest_path)
    rows_of = np.array([by_id[source_ids[i]] for i in cycle] + [by_id[p] for p in val["pair_id"].to_pylist()])
    parts = store.plan_parts(recipe.spec.plan, cfg.store_part_rows)
    record = dict(source, digest=store.prep_digest(inputs), inputs=inputs)
    record["counts"] = {
        "usable": {"train": n, "val": val.num_rows},
        "skipped": {"train": {}, "val": {}},
        "examples": {},
    }
    write_store(uri, prepared, rows_of, full["pair_id"], full["split"], parts, cfg.store_row_group_rows, record)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(uri) for f in fs)
    return {
        "manifest": manifest_path,
        "output": output,
        "store": uri,
        "store_bytes": size,
        "parts": len(parts),
        "build_s": round(time.perf_counter() - began, 1),
    }


def write_store(uri: str, prepared, rows_of, ids, splits, parts, row_group_rows: int, record: dict) -> None:
    """A store whose row j is prepared row `rows_of[j]` under pair_id `ids[j]`, split `splits[j]`:
    parts by the store's own encoder, the index sorted as the writer sorts it, store.json last."""
    import numpy as np
    import pyarrow as pa

    from pipeline import storage
    from pipeline.train import store

    index = []
    for part in parts:
        table = prepared.take(pa.array(rows_of[part.start : part.end]))
        table = table.set_column(table.schema.get_field_index("pair_id"), "pair_id", ids[part.start : part.end])
        table = table.set_column(table.schema.get_field_index("split"), "split", splits[part.start : part.end])
        storage.write_bytes(
            storage.join(uri, "parts", f"{part.name}.parquet"), store.encode_part(table, row_group_rows)
        )
        k = part.end - part.start
        positions = {
            "part": pa.array([part.name] * k, pa.string()),
            "row_group": pa.array(np.arange(k) // row_group_rows, pa.int32()),
            "row": pa.array(np.arange(k) % row_group_rows, pa.int32()),
        }
        index.append(pa.table({"split": table["split"], "pair_id": table["pair_id"], **positions}))
    index = pa.concat_tables(index).sort_by([("split", "ascending"), ("pair_id", "ascending")])
    storage.write_parquet(storage.join(uri, "index.parquet"), index.cast(store.INDEX_SCHEMA))
    record = dict(record, parts=[p.name for p in parts], built_by="bench/train_scale.py: replicated prepared rows")
    storage.write_bytes(storage.join(uri, "store.json"), json.dumps(record, indent=1).encode())


# -- 3. the training job, watched --------------------------------------------------------------


class Watch(threading.Thread):
    """Peaks of the job's RSS, the Ray Train workers' RSS and the object store's use."""

    def __init__(self, pid: int, gcs: str):
        super().__init__(daemon=True)
        self.pid, self.gcs = pid, gcs
        self.driver_mb = self.worker_mb = self.store_mb = 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        job, last_store = psutil.Process(self.pid), 0.0
        while not self.stop.is_set():
            try:
                self.driver_mb = max(self.driver_mb, job.memory_info().rss / 2**20)
            except psutil.Error:
                pass
            for proc in psutil.process_iter(["cmdline", "memory_info"]):
                cmdline = " ".join(proc.info["cmdline"] or [])
                if cmdline.startswith("ray::RayTrainWorker") and proc.info["memory_info"]:
                    self.worker_mb = max(self.worker_mb, proc.info["memory_info"].rss / 2**20)
            if time.monotonic() - last_store > 2.0:  # `ray memory` is a GCS round trip: not every tick
                last_store = time.monotonic()
                self.store_mb = max(self.store_mb, object_store_mb(self.gcs))
            self.stop.wait(0.2)


def object_store_mb(gcs: str) -> float:
    out = subprocess.run(
        [RAY, "memory", "--stats-only", f"--address={gcs}"], capture_output=True, text=True, timeout=60
    ).stdout
    found = re.search(r"Plasma memory usage (\d+) MiB", out)
    return float(found.group(1)) if found else 0.0


def start_head(temp_dir: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            f"--num-cpus={os.cpu_count()}",
            "--node-ip-address=127.0.0.1",
            "--include-dashboard=false",
            f"--port={port}",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    gcs = f"127.0.0.1:{port}"
    deadline = time.time() + 120
    while subprocess.run([RAY, "status", f"--address={gcs}"], capture_output=True).returncode != 0:
        if head.poll() is not None or time.time() > deadline:
            stop_head(head)
            raise RuntimeError("ray start --head did not come up")
        time.sleep(1)
    return head, gcs


def stop_head(head: subprocess.Popen) -> None:
    if head.poll() is not None:
        return
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()


def train_on(built: dict, model: str, steps: int, workers: int, gcs: str) -> dict:
    from pipeline import storage

    command = [PYTHON, "-m", "jobs.train", "--manifest", built["manifest"], "--init-model", model]
    command += ["--output", built["output"], "--address", gcs]
    config = train_config(built["manifest"], model, built["output"], steps, workers, gcs)
    yaml_path = os.path.join(os.path.dirname(built["manifest"]), f"scale-{steps}.yaml")
    keys = ("run_id", "steps", "batch_size", "learning_rate", "workers", "cpus_per_worker", "torch_threads")
    keys += ("data_cpus", "pixel_weight", "perceptual_weight", "gradient_checkpointing", "checkpoint_every")
    keys += ("log_every", "val_renders")
    with open(yaml_path, "w") as f:
        json.dump({k: getattr(config, k) for k in keys}, f)  # JSON is YAML
    command += ["--config", yaml_path]
    env = dict(os.environ, PYTHONPATH=ROOT, RAY_USAGE_STATS_ENABLED="0")
    began = time.perf_counter()
    job = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watch = Watch(job.pid, gcs)
    watch.start()
    out, _ = job.communicate()
    watch.stop.set()
    watch.join()
    wall = time.perf_counter() - began
    if job.returncode != 0:
        raise RuntimeError(f"jobs.train exited {job.returncode}:\n{out[-3000:]}")
    run_record = json.loads(storage.read_bytes(os.path.join(built["output"], "runs", "scale.json")))
    lines = [json.loads(x) for x in open(os.path.join(built["output"], "metrics", "scale", "train.jsonl"))]
    windows = [r for r in lines if "loss" in r and r["step"] > config.log_every]
    step_s = statistics.fmean(r["data_s"] + r["compute_s"] for r in windows)
    return {
        "store_reused": (run_record.get("store") or {}).get("reused"),
        "job_wall_s": round(wall, 1),
        "driver_peak_rss_mb": round(watch.driver_mb, 1),
        "worker_peak_rss_mb": round(watch.worker_mb, 1),
        "object_store_peak_mb": watch.store_mb,
        "steps_per_s": round(1.0 / step_s, 3),
        "data_wait_fraction": round(statistics.fmean(r["data_s"] for r in windows) / step_s, 4),
        "steps_measured": windows[-1]["step"] - windows[0]["step"] + config.log_every,
    }


# -- 4. per-sample costs at 512^2 ------------------------------------------------------------------


def per_sample_512(folder: str, pairs: int = 8, rounds: int = 3) -> dict:
    """A worker's CPU per sample at R = 512, S = 224: the row-group read and decode, the
    augmentation and collation. (Store bytes and preparation per sample: bench/store.py.)"""
    import numpy as np
    import pyarrow as pa
    import torch
    from store import prepared_rows  # bench/store.py: the sample catalog prepared by the training code

    from pipeline.train import store
    from pipeline.train.config import TrainConfig
    from pipeline.train.reader import StoreReader
    from pipeline.train.samples import Augment, build_batch

    torch.set_num_threads(1)
    table, _ = prepared_rows(os.path.join(folder, "cat512"), pairs, 512, noisy=True)
    uri = os.path.join(folder, "store512")
    ids = pa.array([f"p{i:03d}" for i in range(pairs)])
    record = {"format": store.FORMAT, "resolution": 512, "product_size": 224}
    parts = [store.Part("00000-0000000000", 0, 0, pairs)]
    write_store(uri, table, np.arange(pairs), ids, pa.array(["train"] * pairs), parts, 1, record)
    cfg = TrainConfig(manifest="-", init_model="-", output="-")
    augment = Augment(cfg.bbox_mask_prob, cfg.flip_prob, cfg.rotate_degrees, cfg.cfg_drop)
    latent = (4, 64, 64)  # SD's VAE at 512: the noise draws a sample costs
    read_ms, build_ms = [], []
    for k in range(rounds):
        reader = StoreReader.open(uri, "train", cache_row_groups=1)  # every sample a row-group read
        began = time.perf_counter()
        samples = reader.fetch(range(pairs))
        read_ms.append((time.perf_counter() - began) * 1000 / pairs)
        began = time.perf_counter()
        build_batch(reader, [(i, k) for i in range(pairs)], 0, augment, latent)
        build_ms.append((time.perf_counter() - began) * 1000 / pairs)
        del samples
    return {
        "resolution": 512,
        "product_size": 224,
        "samples": pairs,
        "read_decode_ms_per_sample": round(statistics.median(read_ms), 2),
        "augment_batch_ms_per_sample": round(statistics.median(build_ms), 2),
        "compression": store.COMPRESSION,
        "photos": "synthetic scenes with photo-like noise (bench/store.py)",
    }


def plan_1_2m(costs: dict) -> dict:
    """The paper's 1.2M pairs x 40 epochs: CPU cores per GPU for the workers' data work, GPU-days.
    (The store's size and preparation core-hours: bench/store.py's `store_plan`.)"""
    worker_ms = costs["read_decode_ms_per_sample"] + costs["augment_batch_ms_per_sample"]
    return {
        "pairs": PAIRS_1_2M,
        "worker_cpu_ms_per_sample": round(worker_ms, 2),
        "cpu_cores_per_gpu": [round(s * worker_ms / 1000, 2) for s in GPU_SAMPLES_PER_S],
        "at_gpu_samples_per_s": list(GPU_SAMPLES_PER_S),
        "samples_40_epochs": PAIRS_1_2M * EPOCHS_PAPER,
        "gpu_days": [round(PAIRS_1_2M * EPOCHS_PAPER / s / 86400, 1) for s in GPU_SAMPLES_PER_S],
        "note": "GPU samples/s from docs/training.md's cost model (an A100 estimate), not measured here",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="store sizes, comma-separated")
    parser.add_argument("--steps", type=int, default=30, help="optimiser steps per size")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers (0.5 CPU each)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per size, interleaved; medians reported")
    parser.add_argument("--keep", help="keep the stores in this folder (default: a temporary one)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    # this bench's own head listens on 127.0.0.1 only; its processes and the job's share this env
    os.environ.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    folder = args.keep or tempfile.mkdtemp(prefix="dtc-bench-scale-")
    os.makedirs(folder, exist_ok=True)
    try:
        costs = per_sample_512(folder)
        emit(what="per_sample_512", **costs)
        emit(what="plan_1_2m", **plan_1_2m(costs))
        from pipeline.toy.catalog import make_training_catalog

        toy_manifest = make_training_catalog(os.path.join(folder, "catalog"), n_pairs=TOY_PAIRS, val_fraction=0.125)
        model = os.path.join(folder, "init")
        if not os.path.exists(os.path.join(model, "model_index.json")):
            run([PYTHON, "-m", "jobs.make_model", "--preset", "train-tiny", "--out", model])
        head, gcs = start_head(os.path.join(tempfile.gettempdir(), f"dtc-scale-ray-{os.getpid()}"))
        try:
            cfg_args = dict(steps=args.steps, workers=args.workers, address=gcs)
            catalog = os.path.join(folder, "catalog")
            source_out = os.path.join(folder, "source")
            run(
                [PYTHON, "-m", "jobs.train", "--prepare-only", "--manifest", toy_manifest, "--init-model", model]
                + ["--output", source_out, "--address", gcs, "--data-cpus", "0.25"]
            )
            (source_store,) = [
                os.path.join(source_out, "prepared", d) for d in os.listdir(os.path.join(source_out, "prepared"))
            ]
            built = {n: build_scaled(source_store, toy_manifest, model, catalog, n, cfg_args) for n in sizes}
            os.sync()  # the stores' GBs on disk before any run: no writeback competing with the first runs
            runs: dict[int, list[dict]] = {n: [] for n in sizes}
            for _ in range(args.repeats):  # interleaved: the machine's drift falls on every size alike
                for n in sizes:
                    runs[n].append(train_on(built[n], model, args.steps, args.workers, gcs))
                    shutil.rmtree(os.path.join(built[n]["output"], "checkpoints"), ignore_errors=True)
                    for name in ("runs", "metrics", "model", "best", "_lock"):
                        shutil.rmtree(os.path.join(built[n]["output"], name), ignore_errors=True)
            results = {}
            for n in sizes:
                results[n] = {
                    k: (
                        round(statistics.median(r[k] for r in runs[n]), 4)
                        if isinstance(runs[n][0][k], float)
                        else runs[n][0][k]
                    )
                    for k in runs[n][0]
                }
                emit(
                    what="store_size",
                    samples=n,
                    **{k: v for k, v in built[n].items() if k not in ("manifest", "output")},
                    **results[n],
                    repeats=args.repeats,
                    steps_per_s_each=[r["steps_per_s"] for r in runs[n]],
                )
            small, large = results[sizes[0]], results[sizes[-1]]
            emit(
                what="growth",
                from_samples=sizes[0],
                to_samples=sizes[-1],
                driver_rss=round(large["driver_peak_rss_mb"] / small["driver_peak_rss_mb"] - 1, 4),
                worker_rss=round(large["worker_peak_rss_mb"] / small["worker_peak_rss_mb"] - 1, 4),
                steps_per_s=round(large["steps_per_s"] / small["steps_per_s"], 3),
                object_store_peak_mb=[results[n]["object_store_peak_mb"] for n in sizes],
                target="RSS growth <= 0.10, steps/s ratio ~1",
            )
        finally:
            stop_head(head)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
