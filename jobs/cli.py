"""What every entrypoint's command line shares: usage errors on one line.

argparse prints the whole usage before a usage error; a nightly's log should show the one
line that matters, like every other refusal (exit 2, nothing written).
"""

from __future__ import annotations

import argparse
import sys

from pipeline.config import ConfigError
from pipeline.schema import EXIT_REFUSED

__all__ = ["Parser", "merge_options"]


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        print(f"{self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(EXIT_REFUSED)


def merge_options(flags: dict, keys: set[str]) -> dict:
    """The parsed flags (only those given) over the `--config` YAML they name (its keys are the
    flags' names, `-` or `_`); ConfigError for an unreadable file or an unknown key. A lone
    `allow_root` string becomes a list."""
    flags = dict(flags)
    values: dict = {}
    if "config" in flags:
        import yaml

        path = flags.pop("config")
        try:
            with open(path) as f:
                loaded = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"--config {path}: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {path} must be a mapping of option: value")
        values.update({str(k).replace("-", "_"): v for k, v in loaded.items()})
    values.update(flags)
    unknown = sorted(set(values) - keys)
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} (see --help)")
    if isinstance(values.get("allow_root"), str):
        values["allow_root"] = [values["allow_root"]]
    return values
