#!/usr/bin/env bash
# The GPU check (issue 16) in one go: where the machine lacks sae_lens, install the wheels carried
# in .whl/ (scripts/gpu_wheels.sh downloads them), then scripts/gpu_check.py: the CUDA-marked tests
# and the synthetic bench, into one JSON, $OUT/gpu_check.json (else ./gpu_check.json). Without CUDA
# it runs its CPU form (CUDA tests skipped, small shapes); tests/test_gpu_check.py runs that.
#
#   bash scripts/gpu_check.sh            # on the GPU machine, with .whl carried (README: Ready for the GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
lacks_sae_lens() { ! "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('sae_lens') is None)"; }
if compgen -G ".whl/*.whl" >/dev/null && lacks_sae_lens; then
    # --no-deps: the list is the whole set, pinned; the target folder goes before the machine's own packages
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
exec "$PYTHON" scripts/gpu_check.py
