"""What every entrypoint's command line shares: usage errors on one line.

argparse prints the whole usage before a usage error; a nightly's log should show the one
line that matters, like every other refusal (exit 2, nothing written).
"""

from __future__ import annotations

import argparse
import sys

from pipeline.schema import EXIT_REFUSED

__all__ = ["Parser"]


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        print(f"{self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(EXIT_REFUSED)
