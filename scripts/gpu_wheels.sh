#!/usr/bin/env bash
# Download the wheels that the GPU machine lacks (scripts/gpu_wheels.txt, pinned) into .whl/, for
# its Python 3.12 on x86-64 Linux, as /work/.library/device/README.md says; .whl/ is ignored by git
# and travels to the device with `carry`. Replaces what .whl/ held (two versions of one package stop
# the install there) and prints the wheels' total size against the 64 MiB that may travel.
#
#   bash scripts/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
git check-ignore -q .whl/any.whl || echo /.whl/ >>"$(git rev-parse --git-path info/exclude)"
rm -rf .whl && mkdir .whl
platforms=()
for platform in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
    manylinux1_x86_64; do
    platforms+=(--platform "$platform")
done
sed -e 's/#.*//' -e '/^[[:space:]]*$/d' scripts/gpu_wheels.txt |
    xargs "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d .whl
"$PYTHON" - <<'PY'
from pathlib import Path

wheels = sorted(Path(".whl").glob("*.whl"))
mib = sum(w.stat().st_size for w in wheels) / 2**20
print(f"{len(wheels)} wheels in .whl/: {mib:.1f} MiB (at most 64 MiB travels with the working tree)")
for wheel in sorted(wheels, key=lambda w: -w.stat().st_size)[:5]:
    print(f"  {wheel.stat().st_size / 2**20:5.1f} MiB  {wheel.name}")
PY
