"""Bad inputs, table-driven: every case is one manifest row with its documented outcome
(docs/failures.md): rendered with a defined behaviour (`ok`), or `failed` with an
error code. All cases go through one real job run (local Ray, tiny model), which must finish;
afterwards a scan proves nothing was written outside the output prefix.
"""

from __future__ import annotations

import io
import math
import os
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from helpers import FAST, check_ok_rows, read_manifest, render_args
from PIL import Image

from jobs.render import main as render

W, H = 96, 80  # the context photo as displayed
BOX = [20.0, 16.0, 64.0, 56.0]


@dataclass
class Case:
    pair_id: str
    outcome: str  # "ok" or the error_code of the failed row
    context: str = "images/context.jpg"
    product: str = "images/product.png"
    mask: str | None = None
    bbox: list[float] | None = field(default_factory=lambda: list(BOX))
    note: str = ""


def _encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height: a decompression bomb costs nothing to make."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _files(rng: np.random.Generator) -> dict[str, bytes]:
    """Every input file of the suite, by path under the catalog."""
    photo = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    jpeg = _encode(Image.fromarray(photo), "JPEG", quality=90)
    product = np.zeros((48, 40, 4), np.uint8)
    product[..., :3] = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    product[6:42, 6:34, 3] = 255
    palette = Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).quantize(16)
    palette.info["transparency"] = 0  # palette index 0 is see-through
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 80 wide x 96 high; displayed rotated to 96 x 80
    mask = np.zeros((H, W), np.uint8)
    mask[20:60, 24:72] = 255
    gradient = np.tile(np.linspace(0, 255, W, dtype=np.uint8), (H, 1))  # grey levels, threshold 128
    sixteen = rng.integers(0, 65536, (H, W), dtype=np.uint16)
    return {
        "images/context.jpg": jpeg,
        "images/product.png": _encode(Image.fromarray(product, "RGBA")),
        "images/truncated.jpg": jpeg[: len(jpeg) // 2],
        "images/zero.jpg": b"",
        "images/not-an-image.jpg": b"%PDF-1.4\n% this is a pdf, not a photo\n",
        "images/bomb.png": _png_header_only(40_000, 40_000),
        "images/sixteen-bit.png": _encode(Image.fromarray(sixteen)),
        "images/cmyk.jpg": _encode(Image.fromarray(photo).convert("CMYK"), "JPEG", quality=90),
        "images/gray.jpg": _encode(Image.fromarray(photo).convert("L"), "JPEG", quality=90),
        "images/rgba-context.png": _encode(Image.fromarray(np.dstack([photo, np.full((H, W), 90, np.uint8)]), "RGBA")),
        "images/palette-product.png": _encode(palette),
        "images/rotated.jpg": _encode(
            Image.fromarray(np.rot90(photo, k=1).copy()), "JPEG", quality=90, exif=exif.tobytes()
        ),
        "images/mask.png": _encode(Image.fromarray(mask)),
        "images/mask-other-size.png": _encode(Image.fromarray(np.full((H // 2, W // 2), 255, np.uint8))),
        "images/mask-gradient.png": _encode(Image.fromarray(gradient)),
        "images/mask-empty.png": _encode(Image.fromarray(np.zeros((H, W), np.uint8))),
        "images/mask-speck.png": _encode(
            Image.fromarray(np.pad(np.full((4, 4), 255, np.uint8), ((30, H - 34), (30, W - 34))))
        ),
        "images/transparent-product.png": _encode(Image.new("RGBA", (40, 48), (200, 10, 10, 0))),
        "images/tiny-product.png": _encode(Image.new("RGB", (1, 1), (10, 200, 10))),
    }


CASES = [
    # broken or hostile files
    Case("truncated-jpeg", "image_unreadable", context="images/truncated.jpg"),
    Case("zero-byte-file", "image_unreadable", context="images/zero.jpg"),
    Case("non-image-bytes", "image_unreadable", context="images/not-an-image.jpg"),
    Case(
        "decompression-bomb", "too_large", context="images/bomb.png", note="40000x40000 in the header, refused unread"
    ),
    Case("missing-file", "image_missing", context="images/does-not-exist.jpg"),
    Case("product-unreadable", "image_unreadable", product="images/zero.jpg"),
    # unusual but valid images: rendered
    Case("sixteen-bit-png", "ok", context="images/sixteen-bit.png", note="scaled to 8 bits, not clipped"),
    Case("cmyk-jpeg", "ok", context="images/cmyk.jpg"),
    Case("grayscale", "ok", context="images/gray.jpg", note="rendered in RGB"),
    Case("rgba-context", "ok", context="images/rgba-context.png", note="context alpha dropped"),
    Case(
        "palette-transparent-product", "ok", product="images/palette-product.png", note="palette transparency is alpha"
    ),
    Case("exif-rotated", "ok", context="images/rotated.jpg", note="bbox and output in displayed pixels"),
    Case("tiny-product", "ok", product="images/tiny-product.png", note="1x1 product upscaled"),
    Case("transparent-product", "product_transparent", product="images/transparent-product.png"),
    # regions
    Case("mask", "ok", mask="images/mask.png", bbox=None),
    Case("mask-other-size", "mask_size_mismatch", mask="images/mask-other-size.png", bbox=None),
    Case("mask-non-binary", "ok", mask="images/mask-gradient.png", bbox=None, note="white is >= 128"),
    Case("mask-empty", "region_empty", mask="images/mask-empty.png", bbox=None),
    Case("mask-speck", "region_too_small", mask="images/mask-speck.png", bbox=None),
    Case("mask-and-bbox", "region_ambiguous", mask="images/mask.png"),
    Case("no-region", "region_missing", bbox=None),
    Case("bbox-nan", "bad_bbox", bbox=[math.nan, 10.0, 50.0, 50.0]),
    Case("bbox-negative", "bad_bbox", bbox=[-5.0, 10.0, 50.0, 50.0]),
    Case("bbox-inverted", "bad_bbox", bbox=[60.0, 10.0, 20.0, 50.0]),
    Case("bbox-outside", "bad_bbox", bbox=[500.0, 500.0, 600.0, 600.0]),
    Case("bbox-partly-outside", "ok", bbox=[60.0, 40.0, 500.0, 500.0], note="clipped to the photo"),
    Case("bbox-under-8px", "region_too_small", bbox=[10.0, 10.0, 15.0, 15.0]),
    Case("bbox-whole-photo", "ok", bbox=[0.0, 0.0, float(W), float(H)], note="the whole photo is repainted"),
    # pair ids: they name output objects
    Case("../escape", "invalid_pair_id"),
    Case("a/b", "invalid_pair_id"),
    Case("", "invalid_pair_id"),
    Case("x" * 10_000, "invalid_pair_id"),
    Case("caf\u00e9-\u6905\u5b50", "invalid_pair_id"),
    Case(".hidden", "invalid_pair_id"),
    Case("twin", "duplicate_pair_id"),
    Case("twin", "duplicate_pair_id", bbox=[10.0, 10.0, 40.0, 40.0]),
    # URIs outside the allowlist: never fetched
    Case("file-outside-roots", "uri_not_allowed", context="file:///etc/hostname"),
    Case("relative-escape", "uri_not_allowed", context="../outside.jpg"),
    Case("symlink-escape", "uri_not_allowed", context="images/link-outside.jpg"),
    Case("metadata-endpoint", "uri_not_allowed", context="http://169.254.169.254/latest/meta-data/"),
    Case("https-without-flag", "uri_not_allowed", product="https://example.com/p.png"),
    Case("other-scheme", "uri_not_allowed", context="gopher://127.0.0.1/1"),
    Case("empty-uri", "missing_uri", context=""),
]


def _snapshot(root: str) -> set[str]:
    return {os.path.join(d, f) for d, _, files in os.walk(root) for f in files}


def test_every_bad_input_has_its_documented_outcome(ray_address, tmp_path, tiny_model_dir):
    assert len(CASES) >= 25
    catalog = tmp_path / "catalog"
    for rel, data in _files(np.random.default_rng(7)).items():
        (catalog / rel).parent.mkdir(parents=True, exist_ok=True)
        (catalog / rel).write_bytes(data)
    (tmp_path / "outside.jpg").write_bytes((catalog / "images" / "context.jpg").read_bytes())
    os.symlink(tmp_path / "outside.jpg", catalog / "images" / "link-outside.jpg")
    manifest = catalog / "manifest.parquet"
    pq.write_table(
        pa.table(
            {
                "pair_id": [c.pair_id for c in CASES],
                "context_uri": [c.context for c in CASES],
                "product_uri": [c.product for c in CASES],
                "mask_uri": pa.array([c.mask for c in CASES], pa.string()),
                "bbox": pa.array([c.bbox for c in CASES], pa.list_(pa.float64())),
                "case": list(range(len(CASES))),  # pass-through column: ties each output row to its case
            }
        ),
        manifest,
    )
    before = _snapshot(str(tmp_path))
    output = tmp_path / "out"

    code = render(
        render_args(
            str(manifest), str(output), tiny_model_dir, "--run-id", "bad", "--max-failed-fraction", "1.0", *FAST
        )
    )

    assert code == 0
    table = read_manifest(str(output), "bad")
    assert sorted(table["case"].to_pylist()) == list(range(len(CASES)))  # every row accounted for, once
    for row in table.to_pylist():
        case = CASES[row["case"]]
        got = "ok" if row["status"] == "ok" else row["error_code"]
        assert got == case.outcome, (case.pair_id[:40], row["error_code"], row["error_message"])
        if row["status"] == "failed":
            assert row["error_message"] and row["output_uri"] is None
    ok_ids = {c.pair_id for c in CASES if c.outcome == "ok"}
    assert check_ok_rows(table.filter(pc.equal(table["status"], "ok"))) == len(ok_ids)
    rotated = next(r for r in table.to_pylist() if r["pair_id"] == "exif-rotated")
    assert (rotated["width"], rotated["height"]) == (W, H)

    # Nothing outside the output prefix: the only new files are under `output`, and the images
    # folder holds exactly the ok pairs (no key from an invalid pair_id).
    new = _snapshot(str(tmp_path)) - before
    assert new and all(path.startswith(str(output) + os.sep) for path in new), sorted(new)[:5]
    assert sorted(os.listdir(output / "images")) == sorted(f"{pair_id}.png" for pair_id in ok_ids)
    assert sorted(os.listdir(output)) == ["images", "manifest", "report", "runs", "state"]
