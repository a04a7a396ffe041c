#!/usr/bin/env bash
# Fill .whl/ (ignored by git) with the wheels the device machine needs beyond its torch and
# transformers: diffusers, pyarrow, pillow, safetensors, pydantic and accelerate at pyproject.toml's
# pins, plus what they pull in but torch and numpy, for CPython 3.12 on manylinux x86_64. The device has no package index:
# bench/gpu/run.sh installs these with `pip install --no-index --find-links .whl`.
#
#     bash bench/gpu/fetch_wheels.sh            # needs PyPI; a few minutes (the pyarrow repack)
#
# Two things keep the folder well under the device tool's 64 MiB:
# - numpy is left out: transformers requires it, so the device has it;
# - pyarrow (55 MB as published) is repacked without what nothing here loads (Arrow Flight, the
#   S3 filesystem, C++ headers, Cython sources, its tests) and with LZMA instead of deflate
#   (Python's zipfile, hence pip, reads both): about 25 MB. Everything else is as published. The
#   repack takes minutes; a slim pyarrow already in .whl/ is kept when its version is still the pin.
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
mv "$WHEELS"/pyarrow-*.whl "$KEPT"/ 2>/dev/null || true
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

(path,) = glob.glob(os.path.join(sys.argv[1], "pyarrow-*.whl"))
kept = os.path.join(sys.argv[2], os.path.basename(path))
if os.path.exists(kept) and zipfile.ZipFile(kept).infolist()[0].compress_type == zipfile.ZIP_LZMA:
    os.replace(kept, path)  # the same version, already slim
    sys.exit(0)
DROP_PARTS = ("flight", "_s3fs", "libarrow_s3", "/include/", "/tests/", "/src/")


def dropped(name: str) -> bool:
    return any(part in name for part in DROP_PARTS) or name.endswith((".pyx", ".pxd", ".pxi"))


source = zipfile.ZipFile(path)
kept = [info for info in source.infolist() if not dropped(info.filename)]
slim = path + ".slim"
with zipfile.ZipFile(slim, "w", zipfile.ZIP_LZMA) as out:
    for info in kept:
        data = source.read(info)
        if info.filename.endswith(".dist-info/RECORD"):  # list only the files still in the wheel
            data = b"".join(line for line in data.splitlines(keepends=True) if not dropped(line.decode()))
        out.writestr(info, data, compress_type=zipfile.ZIP_LZMA)
os.replace(slim, path)
PY
du -sh "$WHEELS"
ls "$WHEELS"
