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
# The project with its "standalone" extra (the command line: diffusers, peft, accelerate, CLIP's vocabulary).
.venv/bin/python -m pip install -q -c constraints.txt -e ".[standalone]"
.venv/bin/python -c "import torch, diffusers, peft, ldm, gradio; print('environment ready: torch', torch.__version__, 'gradio', gradio.__version__)"
# A second environment with Forge's gradio 4.40.0 for the tab tests (gradio 3 and 4 cannot share one).
[ -x .venv-gradio4/bin/python ] || "$PY" -m venv .venv-gradio4
.venv-gradio4/bin/python -m pip install -q --upgrade pip
.venv-gradio4/bin/python -m pip install -q -c constraints.txt -r requirements-gradio4.txt
.venv-gradio4/bin/python -c "import gradio; print('gradio 4 environment ready:', gradio.__version__)"
# Chromium for the browser tests (Debian's package; Playwright drives it and downloads no browser of its own).
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
        echo "chromium ready: $(chromium --version)"
    else
        echo "note: no chromium: the browser tests will be skipped (sudo apt-get install chromium)"
    fi
fi
