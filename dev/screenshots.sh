#!/usr/bin/env bash
# Regenerate the README's pictures of the tab (docs/ui-*.jpg): the browser test's page (gradio 3.41.2, as in
# A1111) over the embedded tiny model, driven through a short training in Chromium. Needs dev/setup.sh and
# Debian's chromium. Takes about a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${PORT:-7899}
OUT=$(mktemp -d)
trap 'kill $SERVER 2>/dev/null || true; rm -rf "$OUT"' EXIT
HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False .venv/bin/python tests/browser_app.py --port "$PORT" --out "$OUT/Lora" \
    > "$OUT/server.log" 2>&1 &
SERVER=$!
for _ in $(seq 1 240); do grep -q READY "$OUT/server.log" && break; sleep 0.5; done
grep -q READY "$OUT/server.log" || { cat "$OUT/server.log"; exit 1; }
.venv/bin/python tests/browser_flow.py --url "http://127.0.0.1:$PORT/" --lora-dir "$OUT/Lora" --finish --steps 40 \
    --name pip_v1 --docs docs
ls -l docs/ui-*.jpg
