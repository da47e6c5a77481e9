"""Which runner serves which model format, and the command line each one gets."""

from __future__ import annotations

import os
import sys

import httpx
import psutil

from mgr.registry.catalog import Format
from mgr.registry.config import Settings

from ..placement import Placement
from ..protocol.shapes import HEALTH_PATH
from .base import LoadSpec, ProcessRunner, runner_log_path
from .http import RunnerPool
from .process import free_port
from .vllm import VllmRunner

DEFAULT_PARALLEL: dict[Format, int] = {"gguf": 4, "safetensors": 256}  # vLLM's own max-num-seqs default


def default_threads() -> int:
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


class LlamaCppRunner(ProcessRunner):
    backend = "llama.cpp"

    def __init__(self, spec: LoadSpec, settings: Settings, placement: Placement, pool: RunnerPool) -> None:
        port = free_port()
        argv = [
            sys.executable, "-m", "mgr.daemon.runners.llama",
            "--model", str(spec.model_path),
            "--served-model-name", spec.name,
            "--port", str(port),
            "--parallel", str(spec.num_parallel),
            "--ctx-size", str(spec.num_ctx),
            "--threads", str(settings.num_thread or default_threads()),
            "--gpu-layers", str(placement.gpu_layers),
        ]
        if spec.projector is not None:
            argv += ["--mmproj", str(spec.projector)]
        if spec.chat_template is not None:  # the model's TEMPLATE (Jinja), given at create
            argv += ["--chat-template", spec.chat_template]
        if spec.adapter is not None:  # the model's ADAPTER: a GGUF LoRA
            argv += ["--lora", str(spec.adapter)]
        if not settings.cache_prompt:
            argv += ["--no-cache-prompt"]
        env = dict(os.environ, GGML_NO_BACKTRACE="1", PYTHONUNBUFFERED="1")
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in placement.gpus)  # "" = the CPU
        super().__init__(spec, pool, port, argv, env, runner_log_path(settings.runner_log_dir, spec))

    async def cached_tokens(self) -> int | None:
        """The tokens its slots hold for later prompts (its /health), None when it does not answer at once."""
        try:
            health = (await self.control.get(self.base_url + HEALTH_PATH, timeout=2.0)).json()
        except (httpx.HTTPError, ValueError):
            return None
        count = health.get("cached_tokens") if isinstance(health, dict) else None
        return count if isinstance(count, int) else None


class EngineRunners:
    """The daemon's RunnerFactory: a llama.cpp runner for GGUF, a vLLM runner for safetensors, all on one
    connection pool."""

    def __init__(self, settings: Settings, pool: RunnerPool) -> None:
        self.settings = settings
        self.pool = pool

    def __call__(self, spec: LoadSpec, placement: Placement) -> ProcessRunner:
        if spec.format == "gguf":
            return LlamaCppRunner(spec, self.settings, placement, self.pool)
        overrides = self.settings.for_model(spec.name)
        return VllmRunner(spec, self.settings, placement, self.pool, python=self.settings.vllm_python,
                          extra_args=overrides.vllm_args,
                          ray_address=self.settings.ray_address if placement.ray else None)
