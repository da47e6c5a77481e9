"""What engines this installation has, as the daemon would use them: llama.cpp's build (llama-cpp-python's
version and the ggml backends its shared libraries include, read from the file names without loading them),
vLLM (its version, asked of the engine's Python), the GPUs NVML sees, and the store. `mgr doctor` runs
`python -m mgr.daemon.backends` and prints what it reports, so the CLI itself never imports the engines.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from mgr.registry.config import Settings, load_settings

from .errors import EngineUnavailable
from .gpus import NvmlGpus
from .runners.vllm import vllm_version

# ggml's backend libraries (libggml-<name>.so) and what people call them
GGML_BACKENDS = {"cpu": "CPU", "cuda": "CUDA", "hip": "ROCm", "vulkan": "Vulkan", "metal": "Metal", "sycl": "SYCL"}


def llama_cpp() -> dict[str, Any]:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return {"installed": False, "hint": "pip install 'mgr[gguf]' (scripts/install.sh builds it)"}
    libraries = [p.name for p in (Path(spec.origin).parent / "lib").glob("libggml-*")]
    backends = sorted({label for key, label in GGML_BACKENDS.items()
                       if any(name.startswith(f"libggml-{key}.") for name in libraries)})
    return {"installed": True, "version": importlib.metadata.version("llama_cpp_python"),
            "backends": backends or ["CPU"]}


def vllm(settings: Settings) -> dict[str, Any]:
    python = settings.vllm_python or sys.executable
    try:
        version = vllm_version(python)
    except EngineUnavailable as e:
        return {"installed": False, "python": python, "hint": e.message}
    return {"installed": True, "python": python, "version": ".".join(map(str, version))}


def gpus() -> list[dict[str, Any]]:
    return [{"index": g.index, "name": g.name, "total": g.total, "free": g.free} for g in NvmlGpus().gpus()]


def store(settings: Settings) -> dict[str, Any]:
    models = settings.models_dir
    manifests = list((models / "manifests").rglob("*.json")) if (models / "manifests").is_dir() else []
    blobs = [p for p in (models / "blobs").iterdir()] if (models / "blobs").is_dir() else []
    existing = next((p for p in (models, *models.parents) if p.exists()), Path("/"))
    return {"path": str(models), "models": len(manifests), "blobs": len(blobs),
            "bytes": sum(p.stat().st_size for p in blobs if p.is_file()), "free": shutil.disk_usage(existing).free}


def report(settings: Settings) -> dict[str, Any]:
    return {"llama.cpp": llama_cpp(), "vllm": vllm(settings), "gpus": gpus(), "store": store(settings)}


if __name__ == "__main__":
    print(json.dumps(report(load_settings())))
