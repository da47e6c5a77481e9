#!/usr/bin/env bash
# Creates .venv and installs mgr into it with the given extras (default: gguf).
# llama-cpp-python compiles llama.cpp (minutes); pip keeps the built wheel in its cache, so later installs
# reuse it. Where CUDA's compiler (nvcc) is found, llama.cpp is built with CUDA for the GPUs of this machine;
# otherwise the portable CPU build (AVX2, not -march=native, so that a cached wheel never meets a CPU it cannot
# run on). pip's wheel cache does not tell the two builds apart, so a CUDA build keeps its own cache folder.
# CMAKE_ARGS set by you wins over both.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-gguf}
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
nvcc=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null || true)
if [ -n "${CMAKE_ARGS:-}" ]; then
  echo "llama.cpp: building with your CMAKE_ARGS ($CMAKE_ARGS)"
elif [ -n "$nvcc" ] && [ "${CI:-}" != "true" ]; then
  # the GPUs here (CMake's "native"), or every current architecture where no driver answers (a build machine)
  arch=native; nvidia-smi >/dev/null 2>&1 || arch="80;86;89;90"
  export CMAKE_ARGS="-DGGML_CUDA=on -DGGML_NATIVE=OFF -DCMAKE_CUDA_ARCHITECTURES=$arch"
  export CUDACXX=$nvcc PIP_CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/pip-mgr-cuda"
  echo "llama.cpp: building with CUDA ($nvcc, architectures $arch)"
else
  export CMAKE_ARGS=-DGGML_NATIVE=OFF
  echo "llama.cpp: building for the CPU (no CUDA compiler found)"
fi
.venv/bin/python -m pip install -q -e ".[$extras]"
# `mgr` from any folder: a link in ~/.local/bin (on PATH in most login shells); an existing other file is kept.
mkdir -p "$HOME/.local/bin"
if [ ! -e "$HOME/.local/bin/mgr" ] || [ -L "$HOME/.local/bin/mgr" ]; then
  ln -sfn "$PWD/.venv/bin/mgr" "$HOME/.local/bin/mgr"
fi
case ":$PATH:" in *":$HOME/.local/bin:"*) ;; *) echo "add ~/.local/bin to PATH to run mgr from anywhere: export PATH=\"\$HOME/.local/bin:\$PATH\"";; esac
