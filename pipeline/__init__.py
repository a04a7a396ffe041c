"""dtc-render: batch "try-all" rendering with Diffuse to Choose on Ray.

The public surface, driver-safe (importing it pulls in neither torch nor diffusers):

    from pipeline import RenderConfig, run_render
    result = run_render(RenderConfig(manifest="catalog/manifest.parquet", output="out/", model="models/dtc-tiny"))

Stages, model, metrics and Serve live in their subpackages (docs/files.md).
"""

from pipeline.config import ConfigError, RenderConfig, RunSpec
from pipeline.run import RunResult, run_render
from pipeline.schema import EXIT_ERROR, EXIT_OK, EXIT_REFUSED, EXIT_TOO_MANY_FAILED

__all__ = [
    "ConfigError",
    "RenderConfig",
    "RunSpec",
    "RunResult",
    "run_render",
    "EXIT_OK",
    "EXIT_ERROR",
    "EXIT_REFUSED",
    "EXIT_TOO_MANY_FAILED",
]
