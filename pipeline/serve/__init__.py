"""Online rendering with Ray Serve: `serve run pipeline.serve:app_builder model_uri=DIR`.

    args.py   ServeArgs, the app builder's arguments (pydantic)
    http.py   request parsing and JSON errors: ApiError, RenderRequest, parse_request (no Ray)
    app.py    the DTCServer deployment and app_builder; its docstring is the API reference

Importing this package imports Ray Serve's API, but starts no Ray.
"""

from pipeline.serve.app import DTCServer, ServeSetupError, app_builder
from pipeline.serve.args import ServeArgs

__all__ = ["app_builder", "DTCServer", "ServeArgs", "ServeSetupError"]
