"""Online rendering with Ray Serve: `serve run pipeline.serve:app_builder model_uri=DIR`."""

from pipeline.serve.app import app_builder

__all__ = ["app_builder"]
