#!/usr/bin/env bash
# Fill .whl/ (ignored by git) with the wheels the device machine needs beyond its torch and
# transformers: diffusers, pyarrow, pillow, safetensors, pydantic and accelerate at pyproject.toml's
# pins, plus what they pull in but torch and numpy, for CPython 3.12 on manylinux x86_64. The device has no package index:
# bench/gpu/run.sh installs these with `pip install --no-index --find-links .whl`.
#
#     bash bench/gpu/fetch_wheels.sh            # needs PyPI; a few minutes (the pyarrow repack)
#
# Three things keep the folder well under the device tool's 64 MiB (the working tree counts too):
# - numpy and torch are left out: the device has them (transformers requires numpy);
# - pyarrow (55 MB as published) is repacked without what nothing here loads: Arrow Flight, the
#   S3 filesystem, C++ headers, Cython sources, its tests;
# - every wheel over 1 MiB is repacked with LZMA instead of deflate (Python's zipfile, hence pip,
#   reads both; the device's Python needs its lzma module, which run.sh checks first).
# The repacks take minutes; a repacked wheel already in .whl/ is kept while its version is the pin.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-$(test -x .venv/bin/python && echo .venv/bin/python || echo python3)}
WHEELS=.whl

# the pins, read from pyproject.toml (one place for versions)
mapfile -t PINS < <("$PYTHON" - <<'PY'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
wanted = ("diffusers", "pyarrow", "pillow", "safetensors", "pydantic")
for dep in deps:
    name = re.split(r"[=<>\[ ]", dep, maxsplit=1)[0].lower()
    if name in wanted:
        print(dep)
PY
)
[ "${#PINS[@]}" -eq 5 ] || { echo "fetch_wheels: expected 5 pins in pyproject.toml, got: ${PINS[*]}" >&2; exit 2; }

KEPT=$(mktemp -d)
trap 'rm -rf "$KEPT"' EXIT
mv "$WHEELS"/*.whl "$KEPT"/ 2>/dev/null || true
rm -rf "$WHEELS" && mkdir -p "$WHEELS"
"$PYTHON" -m pip download -q --dest "$WHEELS" --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    "${PINS[@]}"
# accelerate (diffusers loads big models through it: without it, every weight is first
# random-initialised) without its dependencies, as they include torch; psutil is the one the
# device may lack
ACCELERATE=$("$PYTHON" -c "import re, tomllib; print(next(d for d in tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'] if re.match('accelerate[=<> ]', d)))")
"$PYTHON" -m pip download -q --dest "$WHEELS" --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --no-deps "$ACCELERATE" psutil
rm -f "$WHEELS"/numpy-*.whl
printf '%s\n' "${PINS[@]}" "$ACCELERATE" psutil > "$WHEELS/requirements.txt"

"$PYTHON" - "$WHEELS" "$KEPT" <<'PY'
import glob, os, sys, zipfile

wheels, kept = sys.argv[1], sys.argv[2]
DROP_PARTS = ("flight", "_s3fs", "libarrow_s3", "/include/", "/tests/", "/src/")


def dropped(wheel: str, name: str) -> bool:
    if not wheel.startswith("pyarrow-"):
        return False
    return any(part in name for part in DROP_PARTS) or name.endswith((".pyx", ".pxd", ".pxi"))


for path in sorted(glob.glob(os.path.join(wheels, "*.whl"))):
    wheel = os.path.basename(path)
    if os.path.getsize(path) < 1 << 20:
        continue
    earlier = os.path.join(kept, wheel)
    if os.path.exists(earlier) and zipfile.ZipFile(earlier).infolist()[0].compress_type == zipfile.ZIP_LZMA:
        os.replace(earlier, path)  # the same version, repacked before
        continue
    source = zipfile.ZipFile(path)
    with zipfile.ZipFile(path + ".lzma", "w", zipfile.ZIP_LZMA) as out:
        for info in source.infolist():
            if dropped(wheel, info.filename):
                continue
            data = source.read(info)
            if info.filename.endswith(".dist-info/RECORD"):  # list only the files still in the wheel
                data = b"".join(line for line in data.splitlines(keepends=True) if not dropped(wheel, line.decode()))
            out.writestr(info, data, compress_type=zipfile.ZIP_LZMA)
    os.replace(path + ".lzma", path)
PY
du -sh "$WHEELS"
ls "$WHEELS"
