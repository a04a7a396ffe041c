"""Shared fixtures: a real S3 endpoint on loopback (moto's server), the tiny DTC model, one
local Ray per session.

Two tiers: tests/unit/ needs no Ray, S3 endpoint or browser (`make test-unit`, or
`pytest -m "not integration and not slow"`); everything under tests/integration/ is marked
`integration` here. A unit test that takes a minute of CPU (training) is marked `slow`: it
still refuses Ray and S3 but runs with the integration tier. `make test` (and CI) runs all.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py, tests/parts.py, tests/s3proxy.py

from helpers import FAST, ROOT, S3_SECRET, TOY_CI_SEED, free_port, metric_flags, render_args  # noqa: E402

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

# One torch thread in the test process, as Ray gives a fractional-CPU task (OMP_NUM_THREADS=1):
# on a shared 2-core machine two OpenMP threads per process spin-wait on each other (under load
# tests/unit/test_model.py + test_train_gradients.py took 389 s with two threads, 35 s with one),
# and the tiny models gain little from a second one. Ray workers and subprocesses are untouched.
torch.set_num_threads(1)

INTEGRATION_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "integration")
SLOW_FIXTURES = {"s3_proxy", "s3_endpoint", "s3_bucket", "ray_address", "chromium"}


def pytest_collection_modifyitems(config, items):
    """Mark tests/integration/ `integration`; a unit test asking for Ray, S3 or the browser is a mistake."""
    for item in items:
        if str(item.fspath).startswith(INTEGRATION_DIR):
            item.add_marker(pytest.mark.integration)
        elif SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            raise pytest.UsageError(
                f"{item.nodeid} is a unit test but uses {sorted(SLOW_FIXTURES & set(item.fixturenames))}"
            )


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Back to one torch thread after a test that set more (RenderStage(torch_threads=2))."""
    yield
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, for the pages' headless checks; installed here when missing (the tests
    run as root, as CI does)."""
    path = shutil.which("chromium")
    if path is None:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True, timeout=600)
        install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"]
        subprocess.run(install, check=True, env=env, capture_output=True, timeout=900)
        path = shutil.which("chromium")
    assert path, "chromium could not be installed"
    return path


@pytest.fixture(scope="session")
def s3_proxy():
    """moto's S3 server on 127.0.0.1 (never all interfaces) behind a loopback proxy that can
    inject S3's 503 SlowDown / 500 errors (tests/s3proxy.py; off unless a test sets
    `fail_every`). AWS_* env points every client at the proxy."""
    from moto.server import ThreadedMotoServer
    from s3proxy import FlakyS3Proxy

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    proxy = FlakyS3Proxy(f"http://127.0.0.1:{port}").start()
    env = {
        "AWS_ENDPOINT_URL": proxy.endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield proxy
    proxy.stop()
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def s3_endpoint(s3_proxy) -> str:
    return s3_proxy.endpoint


@pytest.fixture
def s3_bucket(s3_endpoint, request):
    """A fresh bucket per test."""
    import boto3

    name = "t-" + request.node.name.lower().replace("_", "-")[:40].strip("-") + f"-{os.getpid() % 1000}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """The tiny preset saved once per session, as `jobs.make_model --preset tiny` writes it."""
    from jobs.make_model import main

    out = str(tmp_path_factory.mktemp("models") / "dtc-tiny")
    assert main(["--preset", "tiny", "--out", out]) == 0
    return out


@pytest.fixture(scope="session")
def pbe_tiny_dir(tmp_path_factory) -> str:
    """A tiny Paint-by-Example folder in the hub's layout, as `jobs.make_model --preset pbe-tiny`
    writes it, once per session."""
    from jobs.make_model import main

    out = str(tmp_path_factory.mktemp("models") / "pbe-tiny")
    assert main(["--preset", "pbe-tiny", "--out", out]) == 0
    return out


@pytest.fixture(scope="session")
def pbe_warm(pbe_tiny_dir, tmp_path_factory) -> dict:
    """`jobs.make_model --from-parts --pbe` on the pbe-tiny folder and a tiny DINOv2, once per
    session: the source folders and the DTC built from them."""
    from parts import make_dinov2

    from jobs.make_model import main

    dinov2 = make_dinov2(str(tmp_path_factory.mktemp("dinov2") / "dinov2"))
    model = str(tmp_path_factory.mktemp("models") / "dtc-pbe-warm")
    assert main(["--from-parts", "--pbe", pbe_tiny_dir, "--dinov2", dinov2, "--out", model]) == 0
    return {"pbe": pbe_tiny_dir, "dinov2": dinov2, "model": model}


@pytest.fixture(scope="session")
def ray_address(s3_endpoint):
    """One local Ray per test session (2 CPUs, as on CI); returns its address so that
    subprocess drivers (`python -m jobs.render --address ...`) join the same cluster.
    Started after the S3 endpoint so its workers inherit the AWS_* settings, as the nodes of a
    real cluster carry theirs."""
    import ray

    # address="local": a multi-node test's cluster (or a `ray start` left on the machine) must
    # not be joined instead of starting the session's own
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session")
def extractors(tmp_path_factory) -> tuple[str, str]:
    """Random-weight Inception weights and CLIP folder (as jobs.demo makes them), saved once."""
    from pipeline.metrics.extract import save_random_extractors

    return save_random_extractors(str(tmp_path_factory.mktemp("extractors")))


@pytest.fixture(scope="session")
def demo_output(ray_address, tmp_path_factory, tiny_model_dir, extractors):
    """A run made as jobs.demo makes it (3 pairs, run id `demo`): random-weight extractors,
    `metrics_random_weights: true`. Shared by the metrics and the comparison tests."""
    from jobs.render import main as render
    from pipeline.sample_catalog import make_catalog

    tmp_path = tmp_path_factory.mktemp("demo")
    manifest = make_catalog(str(tmp_path / "catalog"), n_pairs=3, bad_rows=False, sizes=[(64, 64)])
    config = tmp_path / "render.yaml"
    config.write_text("metrics_random_weights: true\n")
    output = tmp_path / "out"
    flags = ["--run-id", "demo", *metric_flags(extractors), "--config", str(config), *FAST]
    assert render(render_args(manifest, output, tiny_model_dir, *flags)) == 0
    return output


@pytest.fixture(scope="session")
def toy_ci_runs(tmp_path_factory) -> dict:
    """The toy's CI recipes on their test seed (`TOY_CI_SEED`, a seed no calibration used), for
    tests/unit/test_learned.py (`colour`: `runs.ci_run`) and test_detail_learned.py (`detail`:
    `runs.detail_ci_run` of the default form; `off`: of the form "off", the hint-off control).
    Three trainings at once in two processes of one torch thread each (spawned: no torch state
    forked): one after another they cost CI ~4.5 minutes, at once ~2.6. The calibration runs
    (bench/) use one torch thread too."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from pipeline.schema import DEFAULT_FILM_MODE
    from pipeline.toy import runs

    folder = tmp_path_factory.mktemp("toy-ci")
    weights = runs.unpack(os.path.join(ROOT, "models", "train-tiny.safetensors"), str(folder / "weights"))
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(2, mp_context=context, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        jobs = {  # the longest first: the third lands on the first process free
            "detail": pool.submit(runs.detail_ci_run, weights, str(folder / "detail"), TOY_CI_SEED, DEFAULT_FILM_MODE),
            "colour": pool.submit(runs.ci_run, weights, str(folder / "colour"), TOY_CI_SEED),
            "off": pool.submit(runs.detail_ci_run, weights, str(folder / "off"), TOY_CI_SEED, "off"),
        }
        return {name: job.result() for name, job in jobs.items()}
