"""The README carries what a user with only the repository needs (no ../shared): the manifest
columns, the output layout and columns, exit codes, the Serve API, where weights come from;
and its file tree lists every file of the repository."""

from __future__ import annotations

import os
import re
import subprocess

from helpers import ROOT

from pipeline.schema import ERROR_CODES, OUTPUT_FIELDS

README = open(os.path.join(ROOT, "README.md")).read()


def test_readme_has_the_contract_sections():
    for heading in (
        "### Input manifest",
        "### Output layout",
        "### Commands and exit codes",
        "### Where weights come from",
        "### Online rendering (Ray Serve)",
        "## Failure semantics",
        "## Files",
    ):
        assert heading in README, heading


def test_every_manifest_and_output_column_is_documented():
    for column in ("pair_id", "context_uri", "product_uri", "mask_uri", "bbox", "seed", "shard"):
        assert f"| `{column}` |" in README, column
    for field in OUTPUT_FIELDS:
        assert f"`{field.name}`" in README, field.name
    for folder in ("images/", "manifest/", "state/buckets/", "metrics/", "report/", "runs/", "_lock"):
        assert folder in README, folder


def test_exit_codes_serve_api_and_weights_are_documented():
    for code in ("**0**", "**1**", "**2**", "**3**"):
        assert code in README
    for item in ("POST /v1/render", "GET /healthz", "Authorization: Bearer", "X-Seed", "X-Model-Digest", "pair_id"):
        assert item in README, item
    for weights in (
        "stable-diffusion-inpainting",
        "dinov2-giant",
        "pt_inception-2015-12-05",
        "clip-vit-base-patch32",
        "vgg19-dcbb9e9d.pth",
    ):
        assert weights in README, weights


def test_the_error_codes_a_row_can_carry_are_named():
    documented = set(re.findall(r"`([a-z_]+)`", README))
    missing = sorted(code for code in ERROR_CODES if code not in documented)
    # the codes the failure table does not spell out are in schema.ERROR_CODES, which the README names
    assert "schema.ERROR_CODES" in README
    assert len(missing) <= len(ERROR_CODES) // 2, missing


def test_the_file_tree_lists_every_file():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    tree = README[README.index("## Files") :]
    listed = {line.split()[0] for line in tree.splitlines() if line and not line.startswith(("#", "`"))}
    unlisted = sorted(f for f in tracked if f not in listed)
    assert not unlisted, f"README's file tree misses {unlisted}"
    gone = sorted(f for f in listed if "/" in f or "." in f if f not in tracked)
    assert not gone, f"README's file tree lists files that do not exist: {gone}"
