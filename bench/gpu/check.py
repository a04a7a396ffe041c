"""The device check: the sd15 DTC's speed, memory and CPU needs on one GPU, as JSON lines on stdout.

    bash bench/gpu/run.sh [RESULTS_FILE]      # on the device machine: installs .whl/, then runs this
    python bench/gpu/check.py --cpu-smoke     # the same path on the tiny preset, on the CPU

Sections, in order (each line is `{"bench": "gpu", "what": ...}` unless it comes from a bench
reused as it is):
1. `env`, `matmul_peak` (a bf16 matmul benchmark: MFU's denominator) and `flops` (the FLOPs of
   one image, counted by `bench/model.py` on the meta device);
2. `throughput` per layout (eager, then channels-last) and batch: the real render path
   (`Renderer.render`, numpy in, uint8 renders out) called with a few steps and with a few more.
   Per step = (t(hi) - t(lo)) / (hi - lo); fixed = t(lo) - lo * per step (DINOv2, VAE encode and
   decode, hint, copies: once per call); a 40-step call = fixed + 40 * per step; images/s =
   batch / that. Peak memory is the batch's `max_memory_allocated`;
3. `host_syncs` (`bench/model.py`): per_step must be 0;
4. `oom_split`: the render stage (`RenderStage`, loading the model from disk as a job does) on a
   block of prepared pairs under a memory cap between the measured peaks of half the block and
   the whole block, so the whole block runs out of memory on the GPU for real and splits; its
   renders compared with the same block rendered without a cap (CPU: the stage's fault injection);
5. `cpu_stages`: `prepare_batch` and `finish_batch` on the same pairs (1024^2 JPEG photos, 768^2
   RGBA products), one torch thread as a Ray task has: CPU seconds per pair, and the CPU cores
   one GPU keeps busy at the best measured images/s;
6. `in_process_step` (`bench/train.py`, bench "train"): the sd15 recipe's optimiser step at batch
   2, bf16 autocast and gradient checkpointing, with its x0 decode;
7. `compile`: `torch.compile` of the UNet and hint encoder at the best batch, in a child process
   given what is left of `--budget-s`: its warm-up time and throughput, or that it did not fit.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.model import count_flops, host_syncs  # noqa: E402
from pipeline.model.loading import optimize_pipeline, save_pipeline  # noqa: E402
from pipeline.model.presets import build_preset  # noqa: E402
from pipeline.model.renderer import Renderer  # noqa: E402

GUIDANCE = 5.0
# The device run and the CPU smoke: same code, smaller sizes.
SIZES = {
    "gpu": dict(
        preset="sd15",
        batches=(1, 4, 8, 16, 32),
        steps_lo=2,
        steps_hi=6,
        repeats=2,
        matmul_n=(4096, 8192, 16384),
        pairs=16,
        photo=1024,
        product=768,
        train_steps=4,
    ),
    "cpu": dict(
        preset="tiny",
        batches=(1, 2),
        steps_lo=1,
        steps_hi=3,
        repeats=2,
        matmul_n=(256,),
        pairs=4,
        photo=256,
        product=192,
        train_steps=3,
    ),
}


def emit(what: str, **record) -> None:
    print(json.dumps({"bench": "gpu", "what": what, **record}), flush=True)


def log(message: str) -> None:
    print(f"[gpu-check] {message}", file=sys.stderr, flush=True)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def gib(n: int) -> float:
    return round(n / 2**30, 2)


# 1. environment, matmul peak, FLOPs ------------------------------------------------------------


def environment(device: str, smoke: bool) -> None:
    import diffusers
    import transformers

    record = dict(
        smoke=smoke,
        python=platform.python_version(),
        torch=torch.__version__,
        diffusers=diffusers.__version__,
        transformers=transformers.__version__,
        cpus=os.cpu_count(),
        device=device,
    )
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        try:
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            driver = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip() or None
        except (OSError, subprocess.TimeoutExpired):
            driver = None
        record.update(
            gpu=props.name,
            gpu_memory_gib=gib(props.total_memory),
            cuda=torch.version.cuda,
            driver=driver,
            sdpa_flash=torch.backends.cuda.flash_sdp_enabled(),
        )
    emit("env", **record)


def matmul_peak(device: str, sizes: tuple[int, ...]) -> float:
    """Dense matmul TFLOP/s, the best over a few square sizes (bf16 on the GPU, fp32 on the CPU,
    where bf16 is emulated): the denominator of every MFU here."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    best = {}
    for n in sizes:
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        a @ b  # warm-up: cuBLAS picks its kernel
        sync(device)
        repeats = max(10, int(1e14 / (2 * n**3))) if device == "cuda" else 3  # ~0.1 s per size
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync(device)
        tflops = 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12
        if tflops > best.get("tflops", 0):
            best = dict(tflops=tflops, n=n, repeats=repeats)
        del a, b
    emit("matmul_peak", dtype=str(dtype).removeprefix("torch."), **dict(best, tflops=float(f"{best['tflops']:.4g}")))
    return best["tflops"]


# 2. throughput -------------------------------------------------------------------------------


def render_inputs(pipe, batch: int) -> dict:
    """What the render stage hands `Renderer.render`: uint8 windows, a hole with the hint inside it."""
    r, s = pipe.config.resolution, pipe.config.product_size
    rng = np.random.default_rng(0)
    hole = np.zeros((batch, r, r), dtype=bool)
    hole[:, r // 4 : 3 * r // 4, r // 4 : 3 * r // 4] = True
    return dict(
        context=rng.integers(0, 256, (batch, r, r, 3), dtype=np.uint8),
        hole=hole,
        product=rng.integers(0, 256, (batch, s, s, 3), dtype=np.uint8),
        product_alpha=np.ones((batch, s, s), dtype=bool),
        seeds=np.arange(batch, dtype=np.int64),
        hint=rng.integers(0, 256, (batch, r, r, 3), dtype=np.uint8),
        hint_mask=hole.copy(),
    )


class TimingNoise(Exception):
    pass


def measure_batch(renderer: Renderer, batch: int, size: dict, device: str) -> dict:
    """Per-step and per-call seconds of `Renderer.render` at `batch`, from calls of lo and hi steps."""
    inputs = render_inputs(renderer.pipe, batch)

    def call(steps: int) -> float:
        start = time.perf_counter()
        renderer.render(**inputs, steps=steps, guidance_scale=GUIDANCE)  # returns host uint8: synced
        return time.perf_counter() - start

    lo, hi = size["steps_lo"], size["steps_hi"]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    warmup_s = call(lo)
    t_lo = min(call(lo) for _ in range(size["repeats"]))
    t_hi = min(call(hi) for _ in range(size["repeats"]))
    if t_hi <= t_lo:  # the steps cost less than the timing noise: nothing to extrapolate from
        raise TimingNoise(f"t{hi} {t_hi:.4f} s <= t{lo} {t_lo:.4f} s")
    per_step = (t_hi - t_lo) / (hi - lo)
    return dict(
        warmup_s=round(warmup_s, 3),
        seconds_per_step=round(per_step, 5),
        fixed_s=round(t_lo - lo * per_step, 4),
        peak_memory_gib=gib(torch.cuda.max_memory_allocated()) if device == "cuda" else None,
    )


def throughput(renderer: Renderer, layout: str, size: dict, steps: int, device: str, flops: float, peak: float):
    """One `throughput` line per batch; a batch that runs out of memory ends the sweep."""
    results = {}
    lo, hi = size["steps_lo"], size["steps_hi"]
    method = (
        f"min of {size['repeats']} calls at {lo} and at {hi} steps after one warm-up call;"
        f" per_step = (t{hi} - t{lo}) / {hi - lo}, fixed = t{lo} - {lo} * per_step,"
        f" call_{steps}_steps = fixed + {steps} * per_step"
    )
    for batch in size["batches"]:
        try:
            m = measure_batch(renderer, batch, size, device)
        except torch.OutOfMemoryError:
            renderer.free_memory()
            emit("throughput", layout=layout, batch=batch, error="oom")
            break
        except TimingNoise as e:
            emit("throughput", layout=layout, batch=batch, error=f"timing noise: {e}")
            continue
        call_s = m["fixed_s"] + steps * m["seconds_per_step"]
        ips = batch / call_s
        results[batch] = dict(m, images_per_s=ips)
        emit(
            "throughput",
            layout=layout,
            resolution=renderer.pipe.config.resolution,
            batch=batch,
            steps=steps,
            guidance_scale=GUIDANCE,
            dtype=str(renderer.pipe.unet.dtype).removeprefix("torch."),
            **m,
            call_s=round(call_s, 3),
            images_per_s=round(ips, 3),
            achieved_tflops=float(f"{ips * flops / 1e12:.4g}"),
            mfu=round(ips * flops / (peak * 1e12), 4),
            method=method,
        )
    return results


def build(preset: str, device: str):
    """A random-init DTC on `device`, bf16 on the GPU (as `loading.default_dtype` loads one)."""
    with torch.device(device):
        pipe = build_preset(preset)
    if device == "cuda":
        pipe.to(dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# 4.-5. OOM split and the CPU stages -------------------------------------------------------------


def make_block(folder: str, size: dict, resolution: int, product_size: int, seed_base: int = 0):
    """A manifest of `pairs` photo/product pairs through the read and resume stages, then
    `prepare_batch` (timed): the render stage's input block, and prepare's seconds."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from PIL import Image

    from pipeline.fetch import InputPolicy
    from pipeline.manifest import plan_manifest
    from pipeline.sample_catalog import product, scene
    from pipeline.stages.prepare_stage import PrepareConfig, prepare_batch
    from pipeline.stages.read_stage import ReadConfig, read_files
    from pipeline.stages.resume_stage import ResumeConfig, resume_bucket

    rng = np.random.default_rng(seed_base)
    n, photo, item = size["pairs"], size["photo"], size["product"]
    for i in range(n):
        picture = scene(photo, photo, rng)
        noise = rng.integers(-12, 12, picture.shape)  # photo-like entropy: realistic JPEG sizes
        Image.fromarray((picture + noise).clip(0, 255).astype(np.uint8)).save(f"{folder}/c{i}.jpg", quality=90)
        Image.fromarray(product(item, rng)).save(f"{folder}/p{i}.png")
    box = [photo * 0.3, photo * 0.3, photo * 0.65, photo * 0.6]
    table = pa.table(
        {
            "pair_id": [f"pair{i}" for i in range(n)],
            "context_uri": [f"c{i}.jpg" for i in range(n)],
            "product_uri": [f"p{i}.png" for i in range(n)],
            "bbox": [box] * n,
        }
    )
    pq.write_table(table, f"{folder}/manifest.parquet")
    plan = plan_manifest(f"{folder}/manifest.parquet")
    rows = pa.concat_tables(read_files(pa.table({"file_index": [0]}), config=ReadConfig(plan)))
    resume = ResumeConfig(plan, f"{folder}/out", "model-digest", "settings-digest")
    buckets = sorted(set(rows["_bucket"].to_pylist()))  # the resume stage runs once per bucket
    rows = pa.concat_tables([resume_bucket(rows.filter(pc.equal(rows["_bucket"], b)), config=resume) for b in buckets])
    config = PrepareConfig(InputPolicy(folder), resolution, product_size)
    prepare_batch(rows.slice(0, 1), config=config)  # warm-up: imports, codec tables
    start = time.process_time()
    block = prepare_batch(rows, config=config)
    return block, time.process_time() - start


def oom_split_and_cpu_stages(
    model_dir: str, size: dict, device: str, peaks: dict, ips_best: float, steps: int, folder: str
) -> None:
    from pipeline.stages.finish_stage import FinishConfig, finish_batch
    from pipeline.stages.render_stage import RenderStage, RenderStageConfig

    check_steps = size["steps_hi"]  # the split is about memory: a few steps show it
    started = time.perf_counter()
    base = dict(steps=check_steps, guidance_scale=GUIDANCE, channels_last=device == "cuda", batch_size=size["pairs"])
    if device == "cpu":
        base["torch_threads"] = torch.get_num_threads()
    stage = RenderStage(RenderStageConfig(model_dir, **base))
    load_s = time.perf_counter() - started
    pipe = stage.renderer.pipe
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a Ray prepare / finish task gets one thread (OMP_NUM_THREADS=1)
    block, prepare_cpu_s = make_block(folder, size, pipe.config.resolution, pipe.config.product_size)
    torch.set_num_threads(threads)
    pairs = block.num_rows

    # the block without a cap: the reference renders
    reference = stage(block)
    # the same block under a cap (GPU) or the stage's fault injection (CPU): it must split
    splits: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: splits.append(record.getMessage())
    logging.getLogger("pipeline.stages.render_stage").addHandler(handler)
    if device == "cuda":
        half, whole = peaks.get(pairs // 2), peaks.get(pairs)
        total = torch.cuda.get_device_properties(0).total_memory
        cap = (half + whole) / 2 * 2**30 if half and whole else None
        how = (
            f"torch.cuda.set_per_process_memory_fraction: a cap of {gib(cap or 0)} GiB, between the peaks"
            f" of {pairs // 2} and {pairs} pairs ({half} and {whole} GiB)"
        )
        torch.cuda.empty_cache()
        if cap:
            torch.cuda.set_per_process_memory_fraction(cap / total)
        capped = stage
    else:
        how = f"fault_injection oom_over={pairs // 2} (the chaos hook: a CPU has no device memory to cap)"
        capped = RenderStage(RenderStageConfig(model_dir, **base, fault_injection={"oom_over": pairs // 2}))
    calls_before = capped.renderer.model_calls
    start = time.perf_counter()
    try:
        split = capped(block)
    finally:
        if device == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0)
        logging.getLogger("pipeline.stages.render_stage").removeHandler(handler)
    split_s = time.perf_counter() - start
    rendered = [np.frombuffer(b, np.uint8) for b in split["rendered"].to_pylist()]
    expected = [np.frombuffer(b, np.uint8) for b in reference["rendered"].to_pylist()]
    same = [len(a) == len(b) and len(a) > 0 for a, b in zip(rendered, expected)]
    diff = max(
        (int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(rendered, expected) if len(a)), default=None
    )
    emit(
        "oom_split",
        pairs=pairs,
        steps=check_steps,
        how=how,
        split_warnings=splits,
        model_calls=capped.renderer.model_calls - calls_before,
        rows_ok=sum(not code for code in split["error_code"].to_pylist()),
        rows_oom=split["error_code"].to_pylist().count("oom"),
        renders_present=sum(same),
        max_abs_diff_vs_unsplit=diff,
        split_call_s=round(split_s, 3),
        model_load_s=round(load_s, 2),
    )

    # the finish stage on the rendered block, timed as prepare was
    config = FinishConfig(
        f"{folder}/out", "gpu-check", "m" * 64, "s" * 16, pipe.config.resolution, steps, GUIDANCE, "ddim"
    )
    torch.set_num_threads(1)
    finish_batch(reference.slice(0, 1), config=config)  # warm-up
    start = time.process_time()
    finished = finish_batch(reference, config=config)
    finish_cpu_s = time.process_time() - start
    torch.set_num_threads(threads)
    ok = finished["status"].to_pylist().count("ok")
    per_pair = (prepare_cpu_s + finish_cpu_s) / pairs
    emit(
        "cpu_stages",
        pairs=pairs,
        rows_ok=ok,
        photo=f"{size['photo']}^2 JPEG q90",
        product=f"{size['product']}^2 RGBA PNG",
        output="jpeg q92",
        torch_threads=1,
        prepare_cpu_ms_per_pair=round(prepare_cpu_s / pairs * 1000, 1),
        finish_cpu_ms_per_pair=round(finish_cpu_s / pairs * 1000, 1),
        images_per_s=round(ips_best, 3),
        cores_for_prepare_finish=float(f"{per_pair * ips_best:.3g}"),
        cores_per_gpu=int(np.ceil(per_pair * ips_best)) + 1,
        how="CPU time (process_time) of prepare_batch and finish_batch per pair x the best measured images/s;"
        " cores_per_gpu rounds that up and adds the render actor's own core",
    )


# 7. torch.compile, in a child process -----------------------------------------------------------


def compile_child(args, size: dict, device: str) -> None:
    renderer = Renderer.from_pretrained(args.model_dir, device=device, compile_model=True, channels_last=True)
    inputs = render_inputs(renderer.pipe, args.compile_batch)
    start = time.perf_counter()
    renderer.render(**inputs, steps=size["steps_lo"], guidance_scale=GUIDANCE)
    emit("compile", batch=args.compile_batch, warmup_s=round(time.perf_counter() - start, 1))
    throughput(
        renderer,
        "channels_last+compile",
        dict(size, batches=(args.compile_batch,)),
        args.steps,
        device,
        args.flops_per_image,
        args.peak_tflops,
    )


def run_compile(args, model_dir: str, batch: int, flops: float, peak: float, seconds: float) -> None:
    if seconds < 30:
        emit("compile", batch=batch, skipped=f"only {seconds:.0f} s of the budget left")
        return
    command = [sys.executable, os.path.abspath(__file__), "--compile-batch", str(batch), "--model-dir", model_dir]
    command += ["--steps", str(args.steps)]
    command += ["--flops-per-image", str(flops), "--peak-tflops", str(peak)] + (
        ["--cpu-smoke"] if args.cpu_smoke else []
    )
    # its own inductor cache: a cold compile, as on a fresh node, and a child stopped mid-compile
    # cannot leave a truncated kernel in the machine's shared cache
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(os.path.dirname(model_dir), "inductor-cache"))
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, start_new_session=True, env=env)
    try:
        out, _ = child.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)  # inductor's compile workers too
        out, _ = child.communicate()
        print(out, end="", flush=True)
        emit("compile", batch=batch, skipped=f"warm-up + measurement did not finish within {seconds:.0f} s")
        return
    print(out, end="", flush=True)
    if child.returncode:
        emit("compile", batch=batch, error=f"child exited {child.returncode} (its stderr is above)")


# main ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny preset on the CPU, small sizes")
    parser.add_argument("--steps", type=int, default=40, help="denoising steps the figures are extrapolated to")
    parser.add_argument("--budget-s", type=float, default=400, help="wall time for everything, compile included")
    parser.add_argument("--compile-batch", type=int, help=argparse.SUPPRESS)  # the compile child
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--flops-per-image", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--peak-tflops", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    started = time.perf_counter()
    device = "cpu" if args.cpu_smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("bench/gpu/check.py: no CUDA device here; use --cpu-smoke on a CPU machine", file=sys.stderr)
        sys.exit(2)
    size = SIZES["cpu" if args.cpu_smoke else "gpu"]
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.cpu_smoke:
        torch.set_num_threads(1)  # a shared CPU: spinning OpenMP threads would measure the neighbours
    if args.compile_batch:
        compile_child(args, size, device)
        return

    # 1. environment, the measured matmul peak, FLOPs per image
    environment(device, args.cpu_smoke)
    peak = matmul_peak(device, size["matmul_n"])
    counted = count_flops(size["preset"], args.steps)
    flops = counted["flops_per_image"]
    emit(
        "flops",
        preset=size["preset"],
        steps=args.steps,
        guidance_scale=GUIDANCE,
        **{k: int(v) for k, v in counted.items()},
    )

    with tempfile.TemporaryDirectory(prefix="dtc-gpu-check-") as folder:
        # 2. throughput: eager, then channels-last on the same weights, loaded from disk as the
        # render job loads them (bf16 on the GPU, the scheduler's tables on the CPU)
        log("building and saving the random-init model")
        model_dir = os.path.join(folder, "model")
        save_pipeline(build(size["preset"], device), model_dir)
        free(device)
        log("throughput sweep")
        started_load = time.perf_counter()
        renderer = Renderer.from_pretrained(model_dir, device=device)  # as the render job loads it
        emit(
            "model_load",
            seconds=round(time.perf_counter() - started_load, 2),
            model_dir_gib=gib(folder_bytes(model_dir)),
        )
        pipe = renderer.pipe
        eager = throughput(renderer, "eager", size, args.steps, device, flops, peak)
        optimize_pipeline(pipe, channels_last=True)
        last = throughput(renderer, "channels_last", size, args.steps, device, flops, peak)
        layouts = {"eager": eager, "channels_last": last}
        measured = [(layout, batch) for layout, results in layouts.items() for batch in results]
        if not measured:
            emit("best", error="no batch was measured")
            sys.exit(1)
        best_layout, best_batch = max(measured, key=lambda key: layouts[key[0]][key[1]]["images_per_s"])
        best_ips = layouts[best_layout][best_batch]["images_per_s"]
        emit(
            "best",
            layout=best_layout,
            batch=best_batch,
            images_per_s=round(best_ips, 3),
            mfu=round(best_ips * flops / (peak * 1e12), 4),
        )
        peaks = {batch: result["peak_memory_gib"] for batch, result in last.items()}

        # 3. host syncs per denoising step (CUDA's sync debug mode)
        if device == "cuda":
            host_syncs(pipe)
        else:
            emit("host_syncs", skipped="torch's sync debug mode needs CUDA")
        del renderer, pipe
        free(device)

        # 4.-5. the render stage's OOM split; prepare and finish's CPU cost per pair
        log("OOM split and CPU stages")
        pairs_dir = os.path.join(folder, "pairs")
        os.makedirs(pairs_dir)
        oom_split_and_cpu_stages(model_dir, size, device, peaks, best_ips, args.steps, pairs_dir)
        free(device)

        # 6. one optimiser step of the training recipe at batch 2 (bench/train.py's in-process path)
        log("training step")
        sys.path.append(os.path.join(ROOT, "bench"))  # bench/train.py imports its sibling `common`
        from bench.train import bench_in_process

        bench_in_process(folder, device, size["preset"], 2, size["train_steps"], decodes=(True,))
        free(device)

        # 7. torch.compile at the best batch, in what is left of the budget
        left = args.budget_s - (time.perf_counter() - started)
        log(f"torch.compile at batch {best_batch}, {left:.0f} s left")
        run_compile(args, model_dir, best_batch, flops, peak, left)

    emit("done", wall_s=round(time.perf_counter() - started, 1))


if __name__ == "__main__":
    main()
