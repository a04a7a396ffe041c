"""Helpers shared by test files (fixtures live in conftest.py)."""

from __future__ import annotations

import glob
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline import images, regions, storage
from pipeline.config import RENDER_DEFAULTS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
S3_SECRET = "test-secret-key-4f1c0de"  # the moto endpoint's secret key: grepped for in every output
# The render flags every integration test uses: 2 steps, PNG (pixels compare exactly), half-CPU actors.
# the toy CI recipes' test seed (tests/conftest.py toy_ci_runs): no calibration seed (runs.CALIBRATION_SEEDS)
TOY_CI_SEED = 6
FAST = "--steps 2 --batch-size 4 --image-format png --cpus-per-actor 0.5 --torch-threads 1".split()


# The 13 FiLM sites of SD-1.5 at 512^2 (DTC_MODEL.md "Skip list"): (channels, side) of conv_in,
# the down blocks' skips and downsamplers, and the mid block, in order.
SD15_FILM_SITES = [(320, 64)] * 3 + [(320, 32)] + [(640, 32)] * 2 + [(640, 16)] + [(1280, 16)] * 2 + [(1280, 8)] * 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render_args(manifest, output, model, *flags: str) -> list[str]:
    """`jobs.render` flags for a manifest, an output and a model, then `flags`."""
    return ["--manifest", str(manifest), "--output", str(output), "--model", str(model), *flags]


def metric_flags(extractors: tuple[str, str]) -> list[str]:
    """`jobs.render` flags for the (Inception weights, CLIP folder) of conftest's `extractors`."""
    inception, clip = extractors
    return ["--inception-weights", inception, "--clip-model", clip]


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def read_manifest(output: str, run_id: str | None = None) -> pa.Table:
    """All rows of one run (or of every run) under `output`."""
    if storage.is_s3(output):
        parts = [p for p, _, _ in storage.list_files(storage.join(output, "manifest")) if p.endswith(".parquet")]
        parts = [storage.join(output, "manifest", p) for p in parts if run_id is None or p.startswith(run_id + "/")]
        return pa.concat_tables([storage.read_parquet(p) for p in parts])
    pattern = f"manifest/{run_id or '*'}/part-*.parquet"
    return pa.concat_tables([storage.read_parquet(p) for p in sorted(glob.glob(os.path.join(output, pattern)))])


def region_of_row(row: dict, width: int, height: int) -> np.ndarray:
    """The region an output-manifest row was rendered into."""
    mask = storage.read_bytes(row["mask_uri"]) if row["mask_uri"] else None
    return regions.region_of(mask, row["bbox"], width, height, max_pixels=RENDER_DEFAULTS.max_pixels)


def check_ok_rows(table: pa.Table) -> int:
    """Every ok image decodes, has the context's size, and keeps the context outside the region."""
    checked = 0
    for row in table.to_pylist():
        if row["status"] != "ok":
            continue
        out = np.asarray(Image.open(io.BytesIO(storage.read_bytes(row["output_uri"]))).convert("RGB"))
        context = images.decode_image(storage.read_bytes(row["context_uri"]), max_pixels=RENDER_DEFAULTS.max_pixels)
        assert out.shape == context.shape, (row["pair_id"], out.shape, context.shape)
        assert (row["width"], row["height"]) == (context.shape[1], context.shape[0])
        region = region_of_row(row, context.shape[1], context.shape[0])
        assert np.array_equal(out[~region], context[~region]), f"{row['pair_id']}: pixels outside the region changed"
        assert not np.array_equal(out[region], context[region]), f"{row['pair_id']}: region not rendered"
        checked += 1
    return checked


def subprocess_render(args: list[str], log_path) -> subprocess.Popen:
    """`python -m jobs.render ARGS` as its own driver process (in its own process group, so that
    a test can kill it and its children at once), output to `log_path`."""
    env = dict(os.environ, PYTHONPATH=os.getcwd(), RAY_USAGE_STATS_ENABLED="0")
    return subprocess.Popen(
        [sys.executable, "-m", "jobs.render", *args],
        stdout=open(log_path, "w"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )


def wait_for_parts(proc: subprocess.Popen, output, run_id: str, parts: int, log_path, timeout: float = 240) -> None:
    """Until the run has written `parts` manifest part files (a deadline on the wait, not a timing assertion)."""
    deadline = time.time() + timeout
    while len(glob.glob(os.path.join(str(output), "manifest", run_id, "part-*.parquet"))) < parts:
        assert proc.poll() is None, open(log_path).read()[-3000:]
        assert time.time() < deadline, f"run {run_id} wrote {parts} manifest part(s) not in time"
        time.sleep(0.2)


def browser_view(chromium: str, page, shot, size: tuple[int, int] = (1000, 1400)) -> tuple[str, np.ndarray]:
    """Headless Chromium on the local file `page` at a `size` window: its DOM once loaded (the
    page's scripts run) and a screenshot saved to `shot`, as RGB pixels."""
    profile = tempfile.mkdtemp(prefix="chromium-")
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--force-device-scale-factor=1", f"--window-size={size[0]},{size[1]}",
             f"--user-data-dir={profile}"]  # fmt: skip
    url = page.as_uri()
    try:
        dump = [*flags, "--virtual-time-budget=5000", "--dump-dom", url]
        dom = subprocess.run(dump, capture_output=True, text=True, timeout=120)
        assert dom.stdout, dom.stderr[-1000:]
        subprocess.run([*flags, f"--screenshot={shot}", url], capture_output=True, timeout=120)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    return dom.stdout, np.asarray(Image.open(shot).convert("RGB")).astype(float)
