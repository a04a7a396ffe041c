"""Data-path benchmark: CPU cost per pair of everything around the model, vs the codec floor.

    python bench/data_path.py [--pairs 24] [--resolution 512] [--format jpeg]

Path (what the CPU stages do for one pair, minus the model): fetch + decode the 1024^2 JPEG
context and the RGBA PNG product, region from the bbox, preprocess (crop window, resize to the
working resolution, product on grey at 224, the hint from the full-resolution product), then
the paste-back of a rendered window and the
encode of the output, including the payload round trip through raw bytes that the Ray blocks
carry. Floor (same run, same files): one full decode of each input and one encode of the output
in the same format and quality. Prints one JSON line; target: ratio <= 1.5. Runs 3 rounds over
the pairs, each pair's path timed right after its floor; `ratio` is the median of the per-pair
ratios (this VM's speed drifts by up to 2x within a minute), `ratio_of_totals` beside it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline import compose, images  # noqa: E402
from pipeline.config import RENDER_DEFAULTS  # noqa: E402
from pipeline.fetch import InputPolicy  # noqa: E402
from pipeline.payload import CONTEXT_RAW, HOLE_BITS, PAYLOAD_TYPE, RENDERED, Sizes  # noqa: E402
from pipeline.sample_catalog import product, scene  # noqa: E402
from pipeline.stages.prepare_stage import PrepareConfig, prepare_pair  # noqa: E402


def make_inputs(folder: str, pairs: int) -> list[tuple[str, str, list[float]]]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(pairs):
        context_path, product_path = os.path.join(folder, f"c{i}.jpg"), os.path.join(folder, f"p{i}.png")
        photo = scene(1024, 1024, rng)
        noise = rng.integers(-12, 12, photo.shape)  # photo-like entropy, so JPEG sizes are realistic
        Image.fromarray((photo + noise).clip(0, 255).astype(np.uint8)).save(context_path, quality=90)
        Image.fromarray(product(768, rng)).save(product_path)
        x0, y0 = rng.integers(50, 500, 2)
        out.append((context_path, product_path, [float(x0), float(y0), float(x0 + 350), float(y0 + 300)]))
    return out


def floor_cost(context_path: str, product_path: str, fmt: str, quality: int) -> None:
    with open(context_path, "rb") as f:
        context = np.asarray(Image.open(io.BytesIO(f.read())).convert("RGB"))
    with open(product_path, "rb") as f:
        np.asarray(Image.open(io.BytesIO(f.read())).convert("RGBA"))
    images.encode_image(context, fmt, quality=quality)


def path_cost(context_path: str, product_path: str, bbox, config: PrepareConfig, fmt: str, quality: int) -> None:
    pair = prepare_pair(context_path, product_path, None, bbox, config)
    h, w, resolution = pair.height, pair.width, config.resolution
    block = {c: pa.array([v], PAYLOAD_TYPE) for c, v in pair.payloads().items()}  # prepare_batch's copy into the block
    # what finish_batch does with the payloads (the model's output stands in as the input crop)
    sizes = Sizes(resolution, config.product_size, height=h, width=w)
    context = CONTEXT_RAW.unpack(block[CONTEXT_RAW.name][0].as_buffer(), sizes)
    hole = HOLE_BITS.unpack(block[HOLE_BITS.name][0].as_buffer(), sizes)
    rendered = RENDERED.unpack(block["model_context"][0].as_buffer(), sizes)
    final = compose.postprocess(
        context, rendered, hole, tuple(pair.model["crop_box"]), feather_px=RENDER_DEFAULTS.feather_px
    )
    images.encode_image(final, fmt, quality=quality)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=24)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--format", default="jpeg", choices=("jpeg", "png", "webp"))
    parser.add_argument("--quality", type=int, default=92)
    args = parser.parse_args()
    # One thread, as Ray gives a fractional-CPU task (OMP_NUM_THREADS=1): the resizes run on
    # torch's uint8 kernels, which would otherwise use every core.
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="dtc-datapath-") as folder:
        inputs = make_inputs(folder, args.pairs)
        config = PrepareConfig(InputPolicy(manifest_dir=folder), args.resolution, 224)
        for c, p, b in inputs[:2]:  # warm-up (imports, allocator)
            floor_cost(c, p, args.format, args.quality)
            path_cost(c, p, b, config, args.format, args.quality)
        # interleaved pair by pair, so both sides see the same machine state; 3 rounds
        floor_ms, path_ms = [], []
        for _ in range(3):
            for c, p, b in inputs:
                start = time.perf_counter()
                floor_cost(c, p, args.format, args.quality)
                floor_ms.append((time.perf_counter() - start) * 1000)
                start = time.perf_counter()
                path_cost(c, p, b, config, args.format, args.quality)
                path_ms.append((time.perf_counter() - start) * 1000)
    ratio = float(np.median(np.array(path_ms) / np.array(floor_ms)))
    print(
        json.dumps(
            {
                "bench": "data_path",
                "pairs": len(inputs),
                "rounds": 3,
                "context": "1024x1024 JPEG",
                "product": "768x768 RGBA PNG",
                "resolution": args.resolution,
                "format": args.format,
                "quality": args.quality,
                "torch_threads": 1,
                "path_ms_per_pair": round(float(np.median(path_ms)), 2),
                "floor_ms_per_pair": round(float(np.median(floor_ms)), 2),
                "ratio": round(ratio, 3),
                "ratio_of_totals": round(sum(path_ms) / sum(floor_ms), 3),
                "target_max_ratio": 1.5,
                "meets_target": ratio <= 1.5,
                "cpu": platform.processor() or platform.machine(),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
