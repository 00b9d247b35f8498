#!/usr/bin/env bash
# Create .venv with everything the demo and the tests need. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -r requirements-dev.txt
# ldm (the Stability-AI code A1111 runs for SD1/SD2), without its heavy pinned dependencies.
.venv/bin/python -m pip install -q --no-deps stable-diffusion-sdkit==2.1.5
.venv/bin/python -c "import torch, diffusers, peft, ldm; print('environment ready: torch', torch.__version__)"
