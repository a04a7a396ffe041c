"""Model benchmark: one JSON line per measurement.

    python bench/model.py                 # tiny on CPU + sd15 FLOPs (counted on the meta device)
    python bench/model.py --gpu-batches 1,2,4,8,16   # plus sd15 images/s and MFU when CUDA is present

FLOPs are counted with `torch.utils.flop_counter.FlopCounterMode` on one denoising step (hint
encoder + main UNet, CFG batch of 2B), the VAE encode and decode, and the image encoder, at
the preset's real sizes; nothing is assumed. MFU divides achieved FLOP/s by `--peak-tflops`
(default: 989, the H100/H200 SXM dense bf16 datasheet figure).

On a GPU the model runs as the render job runs it there: bf16, SDPA attention, channels_last
(`pipeline.model.loading.optimize_pipeline`), `--compile` optional. A `host_syncs` line first
counts the host-GPU synchronisations of one call with torch's sync debug mode, at two step
counts: `per_step` must be 0 (the denoising loop never waits for the GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

# Run as `python bench/model.py`: the script's folder comes first on sys.path, and its sibling
# bench/pipeline.py would shadow the `pipeline` package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from pipeline.model.loading import optimize_pipeline  # noqa: E402
from pipeline.model.presets import build_preset  # noqa: E402


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def make_batch(pipe, batch: int, device: str = "cpu"):
    size, psize = pipe.config.resolution, pipe.config.product_size
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (batch, size, size, 3), generator=g, dtype=torch.uint8)
    hole = torch.zeros(batch, size, size)
    hole[:, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    product = torch.randint(0, 256, (batch, psize, psize, 3), generator=g, dtype=torch.uint8)
    return image, hole, product


def step_inputs(pipe, batch: int, device, dtype):
    r = pipe.config.resolution // pipe.vae_scale_factor
    t = pipe.image_projection.config.num_tokens
    d = pipe.unet.config.cross_attention_dim
    n = 2 * batch  # CFG
    mk = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731
    return (
        mk(n, 4, r, r),
        torch.tensor(500, device=device),
        mk(n, 4, r, r),
        mk(n, 1, r, r),
        mk(n, 4, r, r),
        mk(n, t, d),
    )


def count_flops(preset: str, steps: int) -> dict:
    """FLOPs per image at the preset's sizes, counted on the meta device (no allocation)."""
    with torch.device("meta"):
        pipe = build_preset(preset)
        size, psize = pipe.config.resolution, pipe.config.product_size
        with FlopCounterMode(display=False) as step_counter:
            pipe.predict_noise(*step_inputs(pipe, 1, "meta", torch.float32))
        with FlopCounterMode(display=False) as vae_counter:
            latents = pipe.vae.encode(torch.empty(1, 3, size, size)).latent_dist.mean
            pipe.vae.decode(latents)
        with FlopCounterMode(display=False) as enc_counter:
            pipe.encode_product(torch.empty(1, 3, psize, psize))
        with FlopCounterMode(display=False) as adapter_counter:
            pipe.hint_adapter(torch.empty(1, 3, size, size))
    step = step_counter.get_total_flops()
    once = vae_counter.get_total_flops() + enc_counter.get_total_flops() + adapter_counter.get_total_flops()
    return {
        "step_flops_cfg": step,
        "vae_flops": vae_counter.get_total_flops(),
        "image_encoder_flops": enc_counter.get_total_flops(),
        "flops_per_image": steps * step + once,
    }


def time_call(fn, repeats: int, sync=lambda: None) -> float:
    fn()  # warm-up
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def bench_tiny_cpu(steps: int) -> None:
    pipe = build_preset("tiny")
    pipe.set_progress_bar_config(disable=True)
    for batch in (1, 4):
        args = step_inputs(pipe, batch, "cpu", torch.float32)
        with torch.no_grad():
            per_step = time_call(lambda: pipe.predict_noise(*args), repeats=10)
        image, hole, product = make_batch(pipe, batch)
        gens = lambda: [torch.Generator().manual_seed(i) for i in range(batch)]  # noqa: E731
        per_call = time_call(
            lambda: pipe(image, hole, product, num_inference_steps=steps, generator=gens(), output_type="uint8"),
            repeats=2,
        )
        emit(
            bench="model",
            preset="tiny",
            device="cpu",
            threads=torch.get_num_threads(),
            batch=batch,
            steps=steps,
            guidance_scale=5.0,
            seconds_per_step=round(per_step, 5),
            images_per_s=round(batch / per_call, 3),
        )


def host_syncs(pipe, steps: int = 4) -> None:
    """How many times one call makes the host wait for the GPU, inside the denoising loop and in
    all (torch's sync debug mode warns once per sync; the loop should have none)."""
    import warnings

    image, hole, product = make_batch(pipe, 2)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    latents_only = dict(num_inference_steps=steps, generator=gens, output_type="latent")
    counts = {}
    for name, call in (
        ("steps_" + str(steps), latents_only),
        ("steps_" + str(steps * 2), dict(latents_only, num_inference_steps=steps * 2)),
    ):
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                pipe(image, hole, product, **call)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts[name] = sum("synchroniz" in str(w.message) for w in caught)
    # Syncs before the loop (hint geometry on the CPU) are per call; a sync per step would make
    # the count grow with the steps.
    emit(bench="host_syncs", **counts, per_step=(counts[f"steps_{steps * 2}"] - counts[f"steps_{steps}"]) / steps)


def bench_gpu(
    preset: str, steps: int, batches: list[int], peak_tflops: float, flops_per_image: float, compile_unet: bool
) -> None:
    device, dtype = "cuda", torch.bfloat16
    with torch.device(device):
        pipe = build_preset(preset)
    pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    optimize_pipeline(pipe, compile_model=compile_unet, channels_last=True)
    host_syncs(pipe)
    for batch in batches:
        image, hole, product = make_batch(pipe, batch)
        gens = lambda: [torch.Generator().manual_seed(i) for i in range(batch)]  # noqa: E731
        try:
            per_call = time_call(
                lambda: pipe(image, hole, product, num_inference_steps=steps, generator=gens(), output_type="uint8"),
                repeats=2,
                sync=torch.cuda.synchronize,
            )
        except torch.OutOfMemoryError:
            emit(bench="model", preset=preset, device=torch.cuda.get_device_name(), batch=batch, error="oom")
            torch.cuda.empty_cache()
            continue
        ips = batch / per_call
        emit(
            bench="model",
            preset=preset,
            device=torch.cuda.get_device_name(),
            dtype="bf16",
            compiled=compile_unet,
            batch=batch,
            steps=steps,
            guidance_scale=5.0,
            images_per_s=round(ips, 3),
            achieved_tflops=round(ips * flops_per_image / 1e12, 1),
            mfu=round(ips * flops_per_image / (peak_tflops * 1e12), 4),
            peak_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--gpu-batches", default="1,2,4,8,16")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet and hint encoder (GPU)")
    args = parser.parse_args()
    emit(
        bench="env",
        python=platform.python_version(),
        torch=torch.__version__,
        cpu=platform.processor() or platform.machine(),
        cuda=torch.cuda.is_available(),
    )
    flops = count_flops("sd15", args.steps)
    emit(
        bench="flops",
        preset="sd15",
        resolution=512,
        steps=args.steps,
        guidance_scale=5.0,
        **{k: int(v) for k, v in flops.items()},
        tflops_per_image=round(flops["flops_per_image"] / 1e12, 2),
    )
    bench_tiny_cpu(args.steps)
    if torch.cuda.is_available():
        bench_gpu(
            "sd15",
            args.steps,
            [int(b) for b in args.gpu_batches.split(",")],
            args.peak_tflops,
            flops["flops_per_image"],
            args.compile,
        )


if __name__ == "__main__":
    main()
