"""A job's own local Ray (no --address, no RAY_ADDRESS) listens on the loopback interface only:
its node IP, and so its GCS, raylet and workers' servers, are 127.0.0.1 (issue 28.9 e). Run in a
subprocess: the session's shared Ray (ray_address) must not be this process's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROBE = """
import json, ray
from pipeline.driver import init_ray
init_ray(None)
context = ray.get_runtime_context()
print(json.dumps({"node_ip": ray.util.get_node_ip_address(), "gcs": context.gcs_address}))
ray.shutdown()
"""


def test_a_jobs_own_local_ray_listens_on_loopback_only(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"PYTHONPATH": ROOT, "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["node_ip"] == "127.0.0.1" and seen["gcs"].startswith("127.0.0.1:"), seen
    assert "Token authentication" not in done.stderr  # Ray's notice kept off the console
