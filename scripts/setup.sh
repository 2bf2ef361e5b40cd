#!/usr/bin/env bash
# Create .venv and install autodeploy into it, then fetch the embedded default model.
# Works on a clean CPU machine (asks pip for the local torch 2.13.0 CPU wheel, never the CUDA build)
# and where torch >= 2.11 is already installed system-wide (the venv then reuses it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${AUTODEPLOY_VENV:-.venv}

has_torch() { "$1" -c 'import sys, torch; v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(0 if v >= (2, 11) else 1)' 2>/dev/null; }

if [ ! -x "$VENV/bin/python" ]; then
    if has_torch "$PY"; then
        echo "[setup] reusing the system torch: $("$PY" -c 'import torch; print(torch.__version__)')"
        "$PY" -m venv --system-site-packages "$VENV"
    else
        "$PY" -m venv "$VENV"
    fi
fi
VPY="$VENV/bin/python"
if ! has_torch "$VPY"; then
    echo "[setup] installing torch==2.13.0 (CPU wheel)"
    "$VPY" -m pip install -q torch==2.13.0
fi
"$VPY" -m pip install -q -e ".[dev]"
# The GPU image's Triton beside the installed one: tests/test_kernels_compile_sm90.py (GPU_TRITON there) also
# compiles every kernel with it, since its front end refuses code that newer ones accept
GPU_TRITON=3.6.0
if [ ! -d "$VENV/triton-$GPU_TRITON/triton" ]; then
    "$VPY" -m pip install -q --no-deps --target "$VENV/triton-$GPU_TRITON" "triton==$GPU_TRITON" \
        || echo "[setup] triton $GPU_TRITON not installed: its sm_90 compile test will skip"
fi
"$VPY" -m autodeploy.default_model
