"""Weights loaded from s3:// prefixes on the real S3 endpoint: a DTC checkpoint through the node
cache (two processes at once) and the FID Inception weights file."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import torch

from pipeline import storage
from pipeline.metrics.inception import FIDInceptionV3, load_inception, random_init_
from pipeline.model.checkpoint import model_digest
from pipeline.model.loading import load_pipeline

STANDARD_NAME = "pt_inception-2015-12-05-6726825d.pth"


def _inputs(pipe, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    size, psize = pipe.config.resolution, pipe.config.product_size
    image = torch.randint(0, 256, (batch, size, size, 3), generator=g, dtype=torch.uint8)
    hole = torch.zeros(batch, size, size)
    hole[:, 16:80, 24:72] = 1
    product = torch.randint(0, 256, (batch, psize, psize, 3), generator=g, dtype=torch.uint8)
    return image, hole, product


def _render(pipe, image, hole, product, seeds, steps=3):
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(image, hole, product, num_inference_steps=steps, generator=generators, output_type="uint8").images


def test_model_from_s3_in_a_cold_node_cache(tiny_model_dir, tmp_path, s3_bucket):
    local = tiny_model_dir
    tiny = load_pipeline(local)
    digest = model_digest(local)
    image, hole, product = _inputs(tiny, 2)
    reference = _render(tiny, image, hole, product, [1, 2])

    prefix = f"s3://{s3_bucket}/models/dtc-tiny"
    for rel, _, _ in storage.list_files(local):
        storage.write_bytes(storage.join(prefix, rel), open(os.path.join(local, rel), "rb").read())
    assert model_digest(prefix) == digest
    # Two processes loading the same s3:// model at once into one cold node cache.
    cache = str(tmp_path / "cache")
    script = (
        "import sys, torch; from pipeline.model.loading import load_pipeline;"
        f"p = load_pipeline({prefix!r}, cache_dir={cache!r});"
        "sys.stdout.write(str(sum(float(t.double().sum()) for t in p.unet.state_dict().values())))"
    )
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        for _ in range(2)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1].decode()[-2000:] for r in results]
    assert results[0][0] == results[1][0]
    entries = os.listdir(cache)
    assert not [e for e in entries if ".tmp-" in e], entries  # no half-synced folder left
    from_s3 = load_pipeline(prefix, cache_dir=cache)
    assert _render(from_s3, image, hole, product, [1, 2]).tobytes() == reference.tobytes()


def test_inception_from_s3_and_digest(s3_bucket, tmp_path):
    weights_file = tmp_path / "random.pth"
    torch.save(random_init_(FIDInceptionV3(), seed=0).state_dict(), weights_file)
    # A half-precision copy (loads into the fp32 model just the same): reading ~100 MB back
    # from the moto server takes ~25 s here, half of it ~6 s. Written in torch's legacy
    # (pre-1.6, non-zip) format, as the 2019 standard file may be, to load that path too.
    half = tmp_path / STANDARD_NAME
    state = torch.load(weights_file, weights_only=True)
    half_state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    torch.save(half_state, half, _use_new_zipfile_serialization=False)
    data = half.read_bytes()
    uri = f"s3://{s3_bucket}/metrics-weights/{STANDARD_NAME}"
    storage.write_bytes(uri, data)
    from_s3 = load_inception(uri, "cpu")
    local = load_inception(str(half), "cpu")
    assert from_s3.weights_sha256 == local.weights_sha256 == hashlib.sha256(data).hexdigest()
    assert next(from_s3.parameters()).dtype == torch.float32
    for (name, a), (_, b) in zip(from_s3.state_dict().items(), local.state_dict().items()):
        assert torch.equal(a, b), name
