#!/usr/bin/env bash
# Install PixelDiT and everything it needs into the current Python (use a virtualenv if you like).
# torch is pinned to 2.13.0 (CPU build on the dev/CI machines; on a GPU cluster install the CUDA build of
# the same version first). DeepSpeed is an sdist: build it without its CUDA ops (they JIT-build on GPUs).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install -q --upgrade pip setuptools wheel
"$PY" -m pip install -q torch==2.13.0
DS_BUILD_OPS=0 "$PY" -m pip install -q --no-build-isolation deepspeed
"$PY" -m pip install -q -e ".[test]"
# clean-fid without its dependencies: it asks for torchvision, which this torch build cannot import (pyproject.toml)
"$PY" -m pip install -q --no-deps clean-fid==0.1.35
# pyenv installs console scripts behind shims that only appear after a rehash
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
echo "setup: installed pixeldit into $("$PY" -c 'import sys; print(sys.prefix)')"
