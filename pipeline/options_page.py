"""docs/options.md, generated from the option declarations (a test keeps the page current):

python -m pipeline.options_page > docs/options.md
"""

from __future__ import annotations

from pipeline.config import RenderConfig
from pipeline.options import table
from pipeline.train.config import TrainConfig

__all__ = ["page"]


def page() -> str:
    return f"""# Options

Generated from the declarations in `pipeline/config.py` (`RenderConfig`) and
`pipeline/train/config.py` (`TrainConfig`) by `python -m pipeline.options_page > docs/options.md`;
`tests/unit/test_options.py` fails while this page differs from them. Every option is a flag and
the same key in `--config FILE` (YAML, `-` or `_`); flags win. A value of the wrong type, out of
its range or not one of its choices is refused with one line before any work (exit 2).

## Render (`jobs.render`, `jobs.backfill`)

An option marked *pixels* enters the settings digest: changing it re-renders every pair on
resume ([Running a render](running.md)).

{table(RenderConfig, "pixels")}
## Training (`jobs.train`)

An option marked *recipe* enters the recipe digest: a re-run that changes one is refused
instead of resumed ([Training](training.md)).

{table(TrainConfig, "recipe")}"""


if __name__ == "__main__":
    print(page(), end="")
