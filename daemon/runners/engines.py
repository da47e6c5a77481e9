"""Which runner serves which model format, and the command line each one gets."""

from __future__ import annotations

import os
import re
import sys

import psutil

from ..config import Settings
from ..errors import EngineUnavailable
from .base import LoadSpec, ProcessRunner
from .process import free_port

DEFAULT_PARALLEL = {"gguf": 4, "safetensors": 256}  # vLLM's own max-num-seqs default for safetensors


def default_threads() -> int:
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def _log_name(spec: LoadSpec) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", spec.name) + ".log"


class LlamaCppRunner(ProcessRunner):
    backend = "llama.cpp"

    def __init__(self, spec: LoadSpec, settings: Settings) -> None:
        port = free_port()
        argv = [
            sys.executable, "-m", "mgr.daemon.runners.llama",
            "--model", str(spec.model_path),
            "--served-model-name", spec.name,
            "--port", str(port),
            "--parallel", str(spec.num_parallel),
            "--ctx-size", str(spec.num_ctx),
            "--threads", str(settings.num_thread or default_threads()),
        ]
        env = dict(os.environ, GGML_NO_BACKTRACE="1", PYTHONUNBUFFERED="1")
        super().__init__(spec, port, argv, env, settings.runner_log_dir / _log_name(spec))


def make_runner(spec: LoadSpec, settings: Settings) -> ProcessRunner:
    if spec.format == "gguf":
        return LlamaCppRunner(spec, settings)
    raise EngineUnavailable(
        f"model {spec.name!r} is a safetensors model, which needs the vLLM engine; "
        "it is not available in this version of mgr yet (GGUF models run on llama.cpp)"
    )
