"""Training benchmark: one JSON line per measurement.

    python bench/train.py                                   # CPU: jobs.train on Ray Train, 1 and 2 workers
    python bench/train.py --device cuda --preset sd15 --batch 4 --steps 20   # on the GPU node (no Ray there)

CPU (default): the tiny model on the learnable training catalog, through `run_train` on a local
Ray, three runs in one process so the ratios compare like with like: 1 worker and 2 workers at
the same per-worker batch, 1 torch thread each (data-parallel scaling: ideal 2.0 on 2 idle
cores), then 1 worker without the x0 decode (pixel and perceptual weights 0). Step times come
from the runs' own `metrics/<run_id>/train.jsonl` (the first 2 steps dropped): `data_s` (index,
augment, collate), `compute_s` (forward, backward, optimizer, the decode included) and
`decode_fwd_s` (the decode's forward: VAE decode + VGG); the decode's whole cost (forward and
backward) is the step-time difference to the run without it.

`--data-wait`: the prepared-sample store read by the training job (`reader.StoreReader`) with
the store on the local disk and on an S3 endpoint (moto's server on 127.0.0.1, as the tests),
1 worker, the tiny preset without the x0 decode (the shortest step, so the hardest case for
hiding reads), at prefetch depths 0, 1 and 2: the share of the step a worker waited for its
batch (`data_s / (data_s + compute_s)` from train.jsonl) and the smallest depth under 5%.

`--device cuda`: the same step (`step.Learner`) in-process, without Ray (the GPU node has no Ray),
bf16 autocast and gradient checkpointing as the training job runs there, with and without the
decode, plus peak GPU memory. `--preset sd15` is the paper's sizes at random init.

The VGG19 here has random weights (`vgg.save_random_vgg19`): its cost is real, its loss is
plumbing only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import tiny_model  # noqa: E402  (bench/common.py: bench/ is first on sys.path)


def emit(**record) -> None:
    print(json.dumps({"bench": "train", **record}), flush=True)


def _steady(lines: list[dict], batch: int) -> dict:
    """Mean step split over the logged steps after the first two (warm-up)."""
    steps = [r for r in lines if "loss" in r and r["step"] > 2]
    mean = {k: statistics.fmean(r[k] for r in steps) for k in ("data_s", "compute_s", "decode_s", "samples_per_s")}
    step_s = mean["data_s"] + mean["compute_s"]
    return {
        "steps_measured": len(steps),
        "samples_per_s": round(mean["samples_per_s"], 3),
        "step_s": round(step_s, 4),
        "data_s": round(mean["data_s"], 4),
        "compute_s": round(mean["compute_s"], 4),
        "decode_fwd_s": round(mean["decode_s"], 4),
        "global_batch": batch,
    }


def bench_ray_cpu(folder: str, steps: int, per_worker: int) -> None:
    import ray

    from pipeline import storage
    from pipeline.toy.catalog import make_training_catalog
    from pipeline.train.config import TrainConfig
    from pipeline.train.recipe import run_train
    from pipeline.train.vgg import save_random_vgg19

    manifest = make_training_catalog(os.path.join(folder, "catalog"), n_pairs=16, val_fraction=0.125)
    vgg = save_random_vgg19(os.path.join(folder, "random-vgg19.pth"))
    model = tiny_model(folder)
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    runs = [("1_worker", 1, 0.1, 1e-3), ("2_workers", 2, 0.1, 1e-3), ("1_worker_no_decode", 1, 0.0, 0.0)]
    results = {}
    for name, workers, pixel, perceptual in runs:
        output = os.path.join(folder, name)
        cfg = TrainConfig(
            manifest=manifest,
            init_model=model,
            output=output,
            steps=steps,
            batch_size=per_worker * workers,
            learning_rate=1e-4,
            workers=workers,
            cpus_per_worker=1.0,
            torch_threads=1,
            data_cpus=0.5,
            pixel_weight=pixel,
            perceptual_weight=perceptual,
            perceptual_every=1,
            vgg_weights=vgg,
            checkpoint_every=steps,
            log_every=1,
        )
        started = time.perf_counter()
        result = run_train(cfg)
        wall = time.perf_counter() - started
        text = storage.read_bytes(os.path.join(output, "metrics", "train", "train.jsonl")).decode()
        lines = [json.loads(line) for line in text.splitlines()]
        results[name] = _steady(lines, cfg.batch_size)
        emit(
            what="run",
            run=name,
            device="cpu",
            workers=workers,
            per_worker_batch=per_worker,
            exit_code=result.exit_code,
            job_wall_s=round(wall, 1),
            **results[name],
        )
    one, two, bare = results["1_worker"], results["2_workers"], results["1_worker_no_decode"]
    emit(
        what="data_parallel_scaling",
        device="cpu",
        cores=os.cpu_count(),
        samples_per_s_1_worker=one["samples_per_s"],
        samples_per_s_2_workers=two["samples_per_s"],
        scaling=round(two["samples_per_s"] / one["samples_per_s"], 3),
        ideal=2.0,
    )
    emit(
        what="step_split",
        device="cpu",
        run="1_worker",
        data=round(one["data_s"] / one["step_s"], 3),
        forward_backward=round((bare["compute_s"]) / one["step_s"], 3),
        perceptual_decode=round((one["step_s"] - bare["step_s"]) / one["step_s"], 3),
        decode_fwd_only_s=one["decode_fwd_s"],
        note="decode = step time with the x0 decode minus without it",
    )
    ray.shutdown()


def bench_data_wait(folder: str, steps: int, per_worker: int, depths: tuple[int, ...] = (0, 1, 2)) -> None:
    import ray
    from moto.server import ThreadedMotoServer

    from pipeline import storage
    from pipeline.toy.catalog import make_training_catalog
    from pipeline.train.config import TrainConfig
    from pipeline.train.recipe import run_train

    with socket.socket() as probe:  # a free loopback port for moto's server
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench-secret",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_REGION="us-east-1",
    )
    import boto3

    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket="bench-train")
    manifest = make_training_catalog(os.path.join(folder, "catalog"), n_pairs=16, val_fraction=0.125)
    model = tiny_model(folder)
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    outputs = {"local": os.path.join(folder, "out"), "s3": "s3://bench-train/out"}
    for where, output in outputs.items():
        fractions = {}
        for depth in depths:  # one store per output (same digest): prepared by the first run, reused after
            run_id = f"prefetch-{depth}"
            cfg = TrainConfig(
                manifest=manifest,
                init_model=model,
                output=output,
                run_id=run_id,
                steps=steps,
                batch_size=per_worker,
                learning_rate=1e-4,
                cpus_per_worker=1.0,
                torch_threads=1,
                data_cpus=0.5,
                pixel_weight=0.0,
                perceptual_weight=0.0,
                prefetch_steps=depth,
                checkpoint_every=steps,
                log_every=1,
            )
            result = run_train(cfg)
            text = storage.read_bytes(storage.join(output, "metrics", run_id, "train.jsonl")).decode()
            lines = [json.loads(line) for line in text.splitlines()]
            steady = [r for r in lines if "loss" in r and r["step"] > 2]
            wait = statistics.fmean(r["data_s"] for r in steady)
            step_s = statistics.fmean(r["data_s"] + r["compute_s"] for r in steady)
            fractions[depth] = wait / step_s
            emit(
                what="data_wait",
                store=where,
                prefetch_steps=depth,
                exit_code=result.exit_code,
                steps_measured=len(steady),
                per_worker_batch=per_worker,
                data_wait_s=round(wait, 5),
                batch_build_s=round(statistics.fmean(r["load_s"] for r in steady), 5),
                step_s=round(step_s, 4),
                data_wait_fraction=round(fractions[depth], 4),
                **({"message": result.message} if result.exit_code else {}),
            )
        enough = [d for d in depths if fractions[d] < 0.05]
        emit(
            what="prefetch_needed",
            store=where,
            target="data wait < 5% of the step",
            prefetch_steps=enough[0] if enough else None,
            fractions={str(d): round(f, 4) for d, f in fractions.items()},
        )
    ray.shutdown()
    server.stop()


def _samples(folder: str, resolution: int):
    """Prepared samples in-process (no Ray): the render job's read and prepare functions."""
    import pyarrow as pa

    from pipeline.fetch import InputPolicy
    from pipeline.manifest import PairIdConflicts, plan_manifest
    from pipeline.stages.prepare_stage import PrepareConfig
    from pipeline.stages.read_stage import planned_batches
    from pipeline.toy.catalog import make_training_catalog
    from pipeline.train.dataset import ROW_COLUMNS, prepare_training_batch
    from pipeline.train.samples import SampleSet

    sizes = [(resolution * 3 // 2, resolution * 5 // 4), (resolution * 5 // 4, resolution * 3 // 2)]
    plan = plan_manifest(
        make_training_catalog(os.path.join(folder, "catalog"), n_pairs=8, val_fraction=0, sizes=sizes)
    )
    config = PrepareConfig(InputPolicy(plan.base_dir), resolution=resolution, product_size=224)
    batches = [b.select(list(ROW_COLUMNS)) for b in planned_batches(plan, 0, PairIdConflicts(), None, 64)]
    rows = pa.concat_tables([prepare_training_batch(b, config=config) for b in batches]).to_pylist()
    return SampleSet.from_rows(rows, resolution, 224)


def bench_in_process(
    folder: str, device: str, preset: str, batch: int, steps: int, decodes: tuple[bool, ...] = (True, False)
) -> None:
    import torch

    from pipeline.model.presets import build_preset
    from pipeline.train.config import TrainConfig
    from pipeline.train.loss import TrainableDTC
    from pipeline.train.step import Learner
    from pipeline.train.vgg import load_vgg19, save_random_vgg19

    vgg_path = save_random_vgg19(os.path.join(folder, "random-vgg19.pth"))
    for decode in decodes:
        with torch.device(device):  # random init on the device: sd15's 2.5B parameters in seconds
            pipe = build_preset(preset)
        if device == "cuda":
            pipe.vae.to(torch.bfloat16)
            pipe.image_encoder.to(torch.bfloat16)
            torch.cuda.reset_peak_memory_stats()
        for module in (pipe.unet, pipe.hint_encoder, pipe.vae):
            module.enable_gradient_checkpointing()
        samples = _samples(folder, pipe.config.resolution)
        cfg = TrainConfig(
            manifest="-",
            init_model="-",
            output="-",
            batch_size=batch,
            learning_rate=1e-5,
            pixel_weight=0.1 if decode else 0.0,
            perceptual_weight=1e-3 if decode else 0.0,
            perceptual_every=1,
        )
        learner = Learner(TrainableDTC(pipe, load_vgg19(vgg_path, device)[0] if decode else None), cfg, device)
        stats = [learner.train_step(step, samples) for step in range(steps)][2:]
        step_s = statistics.fmean(s.data_s + s.compute_s for s in stats)
        emit(
            what="in_process_step",
            device=device,
            preset=preset,
            batch=batch,
            decode=decode,
            steps_measured=len(stats),
            samples_per_s=round(batch / step_s, 3),
            step_s=round(step_s, 4),
            data_s=round(statistics.fmean(s.data_s for s in stats), 4),
            compute_s=round(statistics.fmean(s.compute_s for s in stats), 4),
            decode_fwd_s=round(statistics.fmean(s.decode_s for s in stats), 4),
            peak_gpu_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
            gpu=torch.cuda.get_device_name() if device == "cuda" else None,
        )
        del learner, pipe
        if device == "cuda":
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: in-process, no Ray")
    parser.add_argument("--preset", choices=("tiny", "sd15"), default="tiny", help="model sizes (--device cuda)")
    parser.add_argument("--batch", type=int, default=2, help="per-worker batch")
    parser.add_argument("--steps", type=int, default=12, help="optimiser steps per run")
    parser.add_argument("--in-process", action="store_true", help="CPU too: the step alone, without Ray")
    parser.add_argument("--data-wait", action="store_true", help="the store's data wait by prefetch depth")
    args = parser.parse_args()
    emit(
        what="machine",
        host=platform.node(),
        cpus=os.cpu_count(),
        python=platform.python_version(),
        vgg="random weights: cost real, loss plumbing only",
    )
    with tempfile.TemporaryDirectory(prefix="dtc-bench-train-") as folder:
        if args.data_wait:
            bench_data_wait(folder, args.steps, args.batch)
        elif args.device == "cuda" or args.in_process:
            bench_in_process(folder, args.device, args.preset, args.batch, args.steps)
        else:
            bench_ray_cpu(folder, args.steps, args.batch)


if __name__ == "__main__":
    main()
