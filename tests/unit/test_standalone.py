"""The repository stands alone: a clone from a git host has nothing beside it, so no tracked file
may read from, point into or link to the team's folder next to the checkout (what the tests and
docs need is vendored, e.g. tests/data/kuberay-crds)."""

from __future__ import annotations

import os
import re
import subprocess

from helpers import ROOT

OUTSIDE = "../shared"
# the same path built from parts, as os.path.join(ROOT, "..", "shared") or Path(...) / ".." / "shared" would
JOINED = re.compile(r"""["']\.\.["']\s*(?:,|/)\s*["']shared["']""")
THIS = os.path.relpath(os.path.abspath(__file__), ROOT)  # names the path to look for, and nothing else


def tracked_entries() -> list[tuple[str, str]]:
    """(mode, path) of every tracked file: mode 120000 is a symlink."""
    listing = subprocess.run(["git", "ls-files", "-s", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    entries = []
    for record in listing.decode().split("\0"):
        if record:
            meta, path = record.split("\t", 1)
            entries.append((meta.split()[0], path))
    return entries


def test_no_tracked_file_points_outside_the_repository():
    mentions = []
    for mode, path in tracked_entries():
        if mode == "120000" or path == THIS or not os.path.isfile(os.path.join(ROOT, path)):
            continue
        with open(os.path.join(ROOT, path), "rb") as f:
            text = f.read().decode("utf-8", errors="replace")
        mentions += [
            f"{path}:{n}" for n, line in enumerate(text.splitlines(), 1) if OUTSIDE in line or JOINED.search(line)
        ]
    assert not mentions, f"tracked files read or name {OUTSIDE} (vendor what they need instead): {mentions}"


def test_no_tracked_symlink_leaves_the_repository():
    root = os.path.realpath(ROOT)
    leaving = []
    for mode, path in tracked_entries():
        if mode != "120000":
            continue
        target = os.readlink(os.path.join(ROOT, path))
        resolved = os.path.realpath(os.path.join(ROOT, os.path.dirname(path), target))
        if os.path.commonpath([root, resolved]) != root:
            leaving.append(f"{path} -> {target}")
    assert not leaving, f"tracked symlinks that leave the repository: {leaving}"
