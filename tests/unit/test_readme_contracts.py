"""The user guide (docs/) carries what a user with only the repository needs: the manifest
columns, the output layout and columns, exit codes, the Serve API, where weights come from, the
failure table; its file map (docs/files.md) lists every file of the repository. The README stays a
short front door whose folder tree names every top-level folder."""

from __future__ import annotations

import os
import re
import subprocess

import yaml
from helpers import ROOT

from pipeline.schema import ERROR_CODES, OUTPUT_FIELDS

DOCS = os.path.join(ROOT, "docs")


def read(path: str) -> str:
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def tracked_files() -> list[str]:
    listing = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return listing.split()


CONTRACTS = read("docs/contracts.md")
SERVE = read("docs/serve.md")
FAILURES = read("docs/failures.md")
FILE_MAP = read("docs/files.md")
README = read("README.md")


def test_the_pages_have_their_contract_sections():
    for page, headings in {
        CONTRACTS: (
            "## Input manifest",
            "## Output layout",
            "## Commands and exit codes",
            "## Where weights come from",
        ),
        SERVE: ("# Online rendering (Ray Serve)",),
        FAILURES: ("# Failure semantics", "## What happens to a pair", "## The output lock"),
        FILE_MAP: ("# Files",),
    }.items():
        for heading in headings:
            assert heading in page, heading


def test_every_manifest_and_output_column_is_documented():
    for column in ("pair_id", "context_uri", "product_uri", "mask_uri", "bbox", "seed", "shard", "scene_id", "step"):
        assert f"| `{column}` |" in CONTRACTS, column
    for field in OUTPUT_FIELDS:
        assert f"`{field.name}`" in CONTRACTS, field.name
    for folder in ("images/", "manifest/", "state/buckets/", "metrics/", "report/", "runs/", "_lock"):
        assert folder in CONTRACTS, folder


def test_exit_codes_serve_api_and_weights_are_documented():
    for code in ("**0**", "**1**", "**2**", "**3**"):
        assert code in CONTRACTS
    for item in ("POST /v1/render", "GET /healthz", "Authorization: Bearer", "X-Seed", "X-Model-Digest", "pair_id"):
        assert item in SERVE, item
    for weights in (
        "stable-diffusion-inpainting",
        "dinov2-giant",
        "pt_inception-2015-12-05",
        "clip-vit-base-patch32",
        "vgg19-dcbb9e9d.pth",
    ):
        assert weights in CONTRACTS, weights


def test_the_error_codes_a_row_can_carry_are_named():
    documented = set(re.findall(r"`([a-z_]+)`", FAILURES))
    missing = sorted(code for code in ERROR_CODES if code not in documented)
    # the codes the failure table does not spell out are in schema.ERROR_CODES, which the pages name
    assert "schema.ERROR_CODES" in FAILURES
    assert len(missing) <= len(ERROR_CODES) // 2, missing


def test_every_page_is_in_the_site_nav():
    with open(os.path.join(ROOT, "mkdocs.yml")) as f:
        # the snippets extension's options are plain YAML; mkdocs' !!python tags are not used here
        nav = yaml.safe_load(f)["nav"]
    in_nav = {page for entry in nav for page in entry.values()}
    pages = {name for name in os.listdir(DOCS) if name.endswith(".md")}
    assert pages <= in_nav, f"pages not in mkdocs.yml's nav: {sorted(pages - in_nav)}"
    assert in_nav <= pages, f"mkdocs.yml's nav names pages that do not exist: {sorted(in_nav - pages)}"


def test_the_file_map_lists_every_file():
    tracked = tracked_files()
    tree = FILE_MAP[FILE_MAP.index("```") :]
    listed = {line.split()[0] for line in tree.splitlines() if line.strip() and not line.startswith(("#", "`"))}
    unlisted = sorted(f for f in tracked if f not in listed)
    assert not unlisted, "docs/files.md misses " + ", ".join(unlisted) + ": add one line for each"
    gone = sorted(f for f in listed if f not in tracked)
    assert not gone, "docs/files.md lists files that are not tracked: " + ", ".join(gone)


def test_the_readme_is_a_short_front_door():
    lines = README.splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; the user guide belongs in docs/"
    headings = ("## The two commands", "## Quick start", "## How a render flows", "## Files", "## Contributor notes")
    for heading in headings:
        assert heading in README, heading
    tree = README[README.index("## Files") :]
    tree = tree[tree.index("```") + 3 :]
    tree = tree[: tree.index("```")]
    folders = {line.split()[0] for line in tree.splitlines() if line.strip() and not line.startswith(" ")}
    top = {f.split("/")[0] + "/" for f in tracked_files() if "/" in f}
    missing = sorted(folder for folder in top if not any(listed.startswith(folder) for listed in folders))
    assert not missing, f"README's folder tree misses {missing}"
    gone = sorted(folder for folder in folders if not os.path.isdir(os.path.join(ROOT, folder)))
    assert not gone, f"README's folder tree names folders that do not exist: {gone}"


def _figures(text: str) -> set[str]:
    """Decimal figures of three or more significant digits in prose (code blocks and spans are
    commands and settings, not figures)."""
    prose = re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", text, flags=re.S))
    return {m for m in re.findall(r"(?<![\w.])\d+\.\d+(?![\w.])", prose) if len(m.replace(".", "").lstrip("0")) >= 3}


def test_no_page_copies_a_figure_from_the_results():
    results = read("bench/RESULTS.md")
    measured = set()
    for figure in re.findall(r"-?\d+\.\d+", results):
        measured |= {f"{round(float(figure), digits):.{digits}f}" for digits in (1, 2, 3)} | {figure}
    pages = ["README.md"] + [f"docs/{name}" for name in sorted(os.listdir(DOCS)) if name != "results.md"]
    copied = {page: sorted(_figures(read(page)) & measured) for page in pages}
    copied = {page: figures for page, figures in copied.items() if figures}
    assert not copied, (
        f"figures that bench/RESULTS.md holds, copied into pages (link to its section instead): {copied}"
    )
