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
`tests/unit/test_options.py` fails while this page differs from them. Every option is a key of
`--config FILE` (YAML, `-` or `_`); the *flag* column says whether it is also a flag (flags win):
*YAML only* options are set by jobs or tests, not typed (`partition_range` comes from
`jobs.backfill --start/--end`), and a flag marked `(jobs.backfill)` is a flag of that job only.
A value of the wrong type, out of its range or not one of its choices is refused with one line
before any work (exit 2).

## Render (`jobs.render`, `jobs.backfill`)

An option marked *pixels* enters the settings digest, so changing it re-renders the pairs on
resume ([Running a render](running.md)), except where the value cannot change the pixels:
`jpeg_quality` while `image_format` is png, `select` with one variant. One marked *yes, unless
default* enters the digest only away from its default, so catalogs rendered before the option
existed keep their digest.

{table(RenderConfig, "pixels")}
## Training (`jobs.train`)

An option marked *recipe* enters the recipe digest: a re-run that changes one is refused
instead of resumed ([Training](training.md)).

{table(TrainConfig, "recipe")}"""


if __name__ == "__main__":
    print(page(), end="")
