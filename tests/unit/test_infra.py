"""infra/ checked statically: KubeRay manifests against the CRDs (strict, as `kubectl
--validate=strict`), the RayService's Serve config against Serve's schema, the AWS launcher
config against Ray's schema, entrypoints that answer --help, and versions that agree."""

from __future__ import annotations

import functools
import glob
import json
import os
import re
import subprocess
import sys
import tomllib

import jsonschema
import pytest
import yaml
from helpers import ROOT  # noqa: E402

CRDS = os.path.join(ROOT, "tests", "data", "kuberay-crds")  # vendored: source, commit and licence in its README
MANIFESTS = sorted(glob.glob(os.path.join(ROOT, "infra", "k8s", "*.yaml")))


def _pins() -> dict[str, str]:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    return {re.split(r"[\[=]", d)[0]: d.split("==")[1] for d in deps}


def _strict(schema):
    """Reject unknown fields wherever the CRD lists properties (kubectl --validate=strict)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def _crd_schemas() -> dict[str, dict]:
    schemas = {}
    for path in glob.glob(os.path.join(CRDS, "*.yaml")):
        with open(path) as f:
            crd = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 4 MB of YAML
        for version in crd["spec"]["versions"]:
            key = f"{crd['spec']['group']}/{version['name']}:{crd['spec']['names']['kind']}"
            schemas[key] = _strict(version["schema"]["openAPIV3Schema"])
    assert len(schemas) >= 4, f"the vendored KubeRay CRDs are missing under {CRDS}"
    return schemas


def _documents():
    for path in MANIFESTS:
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                yield os.path.basename(path), doc


def test_every_kuberay_kind_is_present():
    assert {doc["kind"] for _, doc in _documents()} == {"RayCluster", "RayJob", "RayCronJob", "RayService"}


@pytest.mark.slow  # a strict CRD validation per manifest (seconds in all): `make test` runs it
@pytest.mark.parametrize("name, doc", list(_documents()), ids=[n for n, _ in _documents()])
def test_manifest_validates_strictly_against_its_crd(name, doc):
    schema = _crd_schemas()[f"{doc['apiVersion']}:{doc['kind']}"]
    jsonschema.validate(doc, schema)


@pytest.mark.slow  # the same validator on a typo (seconds): `make test` runs it
def test_strict_validation_catches_a_typo():
    _, doc = next((n, d) for n, d in _documents() if d["kind"] == "RayJob")
    doc = json.loads(json.dumps(doc))
    doc["spec"]["shutdownAfterJobFinish"] = doc["spec"].pop("shutdownAfterJobFinishes")  # a classic typo
    with pytest.raises(jsonschema.ValidationError, match="shutdownAfterJobFinish"):
        jsonschema.validate(doc, _crd_schemas()["ray.io/v1:RayJob"])


# GPUs per worker pod: one for rendering; training is one 8-GPU node (DDP over NVLink, rayjob-train.yaml).
GPUS_PER_POD = {"rayjob-train.yaml": "8"}


def test_cluster_shapes():
    for name, doc in _documents():
        spec = doc["spec"]
        cluster = (
            spec.get("rayClusterSpec")
            or spec.get("rayClusterConfig")
            or spec.get("jobTemplate", {}).get("rayClusterSpec")
            or spec
        )
        assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", name
        (gpu,) = cluster["workerGroupSpecs"]
        assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1, name
        limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == GPUS_PER_POD.get(name, "1"), name
        assert cluster["rayVersion"] == _pins()["ray"], name
    for rayjob in (d["spec"] for _, d in _documents() if d["kind"] == "RayJob"):
        for key in ("shutdownAfterJobFinishes", "ttlSecondsAfterFinished", "activeDeadlineSeconds", "submitterConfig"):
            assert key in rayjob


def test_the_training_job_asks_for_the_gpus_its_workers_use():
    doc = next(d for n, d in _documents() if n == "rayjob-train.yaml")
    args = doc["spec"]["entrypoint"].split()
    assert args[:3] == ["python", "-m", "jobs.train"]
    gpus = int(args[args.index("--workers") + 1]) * float(args[args.index("--gpus-per-worker") + 1])
    (group,) = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert gpus == group["maxReplicas"] * int(GPUS_PER_POD["rayjob-train.yaml"])
    assert "--vgg-weights" in args  # the perceptual term is on by default: without weights the job is refused


def test_rayservice_serve_config_parses_with_serves_schema():
    from ray.serve.schema import ServeDeploySchema

    doc = next(d for _, d in _documents() if d["kind"] == "RayService")
    config = ServeDeploySchema.parse_obj(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    (app,) = config.applications
    assert app.import_path == "pipeline.serve:app_builder"
    assert app.deployments[0].ray_actor_options.num_gpus == 1


def test_aws_cluster_yaml_validates_against_rays_schema():
    import ray

    with open(os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")) as f:
        schema = json.load(f)
    with open(os.path.join(ROOT, "infra", "aws-cluster.yaml")) as f:
        config = yaml.safe_load(f)
    jsonschema.validate(config, schema)
    assert config["available_node_types"][config["head_node_type"]]["resources"]["CPU"] == 0
    assert any(
        t["node_config"]["InstanceType"].startswith(("g", "p")) for t in config["available_node_types"].values()
    )


def _entrypoint_modules() -> set[str]:
    texts = [
        doc["spec"].get("entrypoint") or doc["spec"].get("jobTemplate", {}).get("entrypoint")
        for _, doc in _documents()
    ]
    texts += [
        open(os.path.join(ROOT, "infra", f)).read() for f in ("aws-cluster.yaml", "runtime_env.yaml", "README.md")
    ]
    return {m for text in texts if text for m in re.findall(r"python -m ([\w.]+)", text)}


@pytest.mark.slow  # starts every entrypoint's interpreter (seconds): `make test` runs it
def test_entrypoints_named_in_infra_exist_and_answer_help():
    modules = _entrypoint_modules()
    assert {"jobs.render", "jobs.backfill", "jobs.train"} <= modules
    for module in sorted(modules):
        done = subprocess.run(
            [sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0 and "usage:" in done.stdout, (module, done.stderr[-500:])


def test_versions_agree_with_pyproject():
    pins = _pins()
    dockerfile = open(os.path.join(ROOT, "infra", "Dockerfile")).read()
    (base,) = re.findall(r"^FROM rayproject/ray:([\d.]+)-", dockerfile, re.M)
    assert base == pins["ray"]
    assert f"torch=={pins['torch']}" in dockerfile
    assert "-c constraints.txt ." in dockerfile  # every other pin comes from pyproject.toml itself
    readme = open(os.path.join(ROOT, "infra", "README.md")).read()
    for package in ("ray", "torch", "diffusers", "transformers"):
        assert f"| {package} | {pins[package]} |" in readme, package
    for _, doc in _documents():
        images = re.findall(r"image: (\S+)", yaml.safe_dump(doc))
        assert images and all(i.endswith(":0.1.0") for i in images)
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        assert tomllib.load(f)["project"]["version"] == "0.1.0"  # the image tag is the project version


def test_runtime_env_excludes_local_state():
    with open(os.path.join(ROOT, "infra", "runtime_env.yaml")) as f:
        env = yaml.safe_load(f)
    assert {".venv/", ".git/"} <= set(env["excludes"]) and "working_dir" not in env
    assert all(isinstance(v, str) for v in env["env_vars"].values())
