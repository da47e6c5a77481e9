#!/usr/bin/env bash
# Creates .venv and installs mgr into it with the given extras (default: gguf).
# llama-cpp-python compiles llama.cpp (minutes); pip keeps the built wheel in its cache, so later installs
# reuse it. Where CUDA's compiler (nvcc) and an NVIDIA GPU are found, llama.cpp is built with CUDA for the GPUs of
# this machine (falling back to the CPU build if that fails; MGR_CUDA=1 builds with CUDA without a GPU and never
# falls back); otherwise the portable CPU build (AVX2, not -march=native, so that a cached wheel never meets a CPU it cannot
# run on). pip's wheel cache does not tell the two builds apart, so a CUDA build keeps its own cache folder.
# CMAKE_ARGS set by you wins over both.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-gguf}
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
nvcc=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null || true)
gpu=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU" || true)
cpu_build() {
  export CMAKE_ARGS=-DGGML_NATIVE=OFF
  unset CUDACXX PIP_CACHE_DIR
  echo "llama.cpp: building for the CPU ($1)"
}
if [ -n "${CMAKE_ARGS:-}" ]; then
  echo "llama.cpp: building with your CMAKE_ARGS ($CMAKE_ARGS)"
elif [ -n "$nvcc" ] && [ "${CI:-}" != "true" ] && { [ "$gpu" -gt 0 ] || [ "${MGR_CUDA:-}" = 1 ]; }; then
  # a toolkit without a GPU (a machine that only has nvcc) gets the CPU build, unless MGR_CUDA=1 asks (a build
  # machine): then every current architecture, since no driver says which
  arch=native; [ "$gpu" -gt 0 ] || arch="80;86;89;90"
  export CMAKE_ARGS="-DGGML_CUDA=on -DGGML_NATIVE=OFF -DCMAKE_CUDA_ARCHITECTURES=$arch"
  export CUDACXX=$nvcc PIP_CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/pip-mgr-cuda"
  echo "llama.cpp: building with CUDA ($nvcc, architectures $arch)"
elif [ -n "$nvcc" ] && [ "${CI:-}" != "true" ]; then
  cpu_build "CUDA's compiler is here but no NVIDIA GPU answers; MGR_CUDA=1 builds with CUDA anyway"
else
  cpu_build "no CUDA compiler found"
fi
if ! .venv/bin/python -m pip install -q -e ".[$extras]"; then
  case "$CMAKE_ARGS" in
    *GGML_CUDA=on*) [ "${MGR_CUDA:-}" != 1 ] || exit 1
      cpu_build "the CUDA build failed: see above"
      .venv/bin/python -m pip install -q -e ".[$extras]" ;;
    *) exit 1 ;;
  esac
fi
# `mgr` from any folder: a link in ~/.local/bin (on PATH in most login shells); an existing other file is kept.
mkdir -p "$HOME/.local/bin"
if [ ! -e "$HOME/.local/bin/mgr" ] || [ -L "$HOME/.local/bin/mgr" ]; then
  ln -sfn "$PWD/.venv/bin/mgr" "$HOME/.local/bin/mgr"
fi
case ":$PATH:" in *":$HOME/.local/bin:"*) ;; *) echo "add ~/.local/bin to PATH to run mgr from anywhere: export PATH=\"\$HOME/.local/bin:\$PATH\"";; esac
