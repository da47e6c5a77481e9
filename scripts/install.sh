#!/usr/bin/env bash
# Creates .venv and installs mgr into it with the given extras (default: gguf).
# llama-cpp-python compiles llama.cpp (minutes); pip keeps the built wheel in its cache, so later installs
# reuse it. The build is portable (AVX2, not -march=native) so that a cached wheel never meets a CPU it
# cannot run on. Set CMAKE_ARGS yourself for a CUDA build (-DGGML_CUDA=on).
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-gguf}
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
CMAKE_ARGS=${CMAKE_ARGS:--DGGML_NATIVE=OFF} .venv/bin/python -m pip install -q -e ".[$extras]"
