"""The vLLM runner: vLLM's own OpenAI server, started on loopback with the placement the scheduler chose.

    python -m vllm.entrypoints.openai.api_server --model <store folder> --served-model-name <name>
        --host 127.0.0.1 --port <free> --gpu-memory-utilization <granted share of the GPU's total>
        --max-model-len <num_ctx> --max-num-seqs <num_parallel> --tensor-parallel-size <gpus>
        --enable-sleep-mode [--enable-auto-tool-choice --tool-call-parser <p>] [--reasoning-parser <p>]
        [--chat-template <file>] [--enable-lora --lora-modules <name>=<PEFT folder> --max-lora-rank <r>]

The parsers come from the model (mgr.registry.vllm_parsers: its config.json and chat template; a model of no known
family gets hermes, so that forced tool calls work) unless its config.toml table names them (tool_call_parser,
reasoning_parser; "" = none) or its vllm_args already pass them.

Sleep mode is the warm tier: level 1 moves weights to host RAM (wake in well under a second instead of a
60-120 s cold start), level 2 drops them. Its endpoints exist only with VLLM_SERVER_DEV_MODE=1, which is
why a runner never listens beyond 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx

from mgr.registry.config import Settings
from mgr.registry.vllm_parsers import VllmParsers

from ..errors import EngineUnavailable, RunnerFailed
from ..placement import Placement
from .base import LoadSpec, ProcessRunner, runner_log_path
from .http import RunnerPool
from .process import free_port

VLLM_ENTRYPOINT = "vllm.entrypoints.openai.api_server"


@functools.lru_cache(maxsize=4)
def vllm_version(python: str) -> tuple[int, ...]:
    """vLLM's version in that Python environment, read once; EngineUnavailable when it is not there."""
    result = subprocess.run([python, "-c", "import vllm, sys; sys.stdout.write(vllm.__version__)"],
                            capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise EngineUnavailable(
            "safetensors models need vLLM, which is not installed for " + python +
            ": install it with pip install 'mgr[vllm]' (a CUDA GPU is required)")
    return tuple(int(n) for n in re.findall(r"\d+", result.stdout)[:3])


def vllm_argv(spec: LoadSpec, placement: Placement, port: int, python: str, version: tuple[int, ...],
              extra_args: tuple[str, ...] = (), ray_address: str | None = None,
              parsers: VllmParsers | None = None, chat_template_file: Path | None = None) -> list[str]:
    # GPUs are split into pipeline stages (one per machine with Ray); each stage is tensor parallel
    tensor_parallel = placement.tensor_size
    argv = [
        python, "-m", VLLM_ENTRYPOINT,
        "--model", str(spec.model_path),
        # With an adapter, the model's name is the LoRA's (vLLM applies a LoRA to requests that name it), so
        # every request mgr sends goes through it; the bare base answers to another name.
        "--served-model-name", spec.name if spec.adapter is None else f"{spec.name}-base",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--max-model-len", str(spec.num_ctx),
        "--max-num-seqs", str(spec.num_parallel),
        "--tensor-parallel-size", str(tensor_parallel),
        "--enable-sleep-mode",
    ]
    if placement.memory_fraction is not None:
        argv += ["--gpu-memory-utilization", f"{placement.memory_fraction:.3f}"]
    if ray_address is not None:
        argv += ["--distributed-executor-backend", "ray", "--pipeline-parallel-size", str(placement.pipeline_parallel)]
    # Before 0.10 vLLM logged every request unless told not to; later versions are quiet by default and
    # deprecate the flag.
    if version < (0, 10):
        argv.append("--disable-log-requests")
    # Ollama's per-request `template` reaches vLLM as a request chat_template, which vLLM refuses unless told
    # to trust it: the daemon is the gate (it checks the template before any request gets here).
    if version >= (0, 11):
        argv.append("--trust-request-chat-template")
    # The model's parsers, each unless its extra arguments choose it (one of each flag on the command line)
    if parsers is not None:
        given = {arg.split("=")[0] for arg in extra_args}
        if given & {"--enable-auto-tool-choice", "--tool-call-parser"}:
            parsers = dataclasses.replace(parsers, tool_call_parser=None)
        if "--reasoning-parser" in given:
            parsers = dataclasses.replace(parsers, reasoning_parser=None)
        argv += parsers.argv()
    if chat_template_file is not None:  # the model's TEMPLATE (Jinja), given at create
        argv += ["--chat-template", str(chat_template_file)]
    if spec.adapter is not None:  # the model's ADAPTER: a PEFT LoRA folder
        argv += ["--enable-lora", "--lora-modules", f"{spec.name}={spec.adapter}",
                 "--max-lora-rank", str(lora_rank(spec.adapter))]
    return argv + list(extra_args)


# --max-lora-rank takes one of these (vLLM's MaxLoRARanks); the adapter's rank rounds up to the next
_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def lora_rank(adapter: Path) -> int:
    """The rank vLLM must allow for a PEFT adapter (its adapter_config.json's `r`; vLLM's default, 16, when
    the file does not say)."""
    try:
        rank = int(json.loads((adapter / "adapter_config.json").read_text()).get("r") or 16)
    except (OSError, ValueError, AttributeError):
        rank = 16
    return next((r for r in _LORA_RANKS if r >= rank), rank)


class VllmRunner(ProcessRunner):
    backend = "vllm"
    supports_sleep = True
    secret_env = "VLLM_API_KEY"  # the runner's secret, which vLLM checks on its /v1 routes

    def __init__(self, spec: LoadSpec, settings: Settings, placement: Placement, pool: RunnerPool,
                 python: str | None = None, extra_args: tuple[str, ...] = (), ray_address: str | None = None) -> None:
        self.python = python or sys.executable
        self.extra_args = extra_args
        self.ray_address = ray_address
        env = dict(os.environ, VLLM_SERVER_DEV_MODE="1", PYTHONUNBUFFERED="1")
        # NVLink multicast (NVLS) can put a host's GPUs out of service for everyone; tensor parallel does
        # not need it. The user's own setting wins.
        env.setdefault("NCCL_NVLS_ENABLE", "0")
        if ray_address is not None:
            env["RAY_ADDRESS"] = ray_address  # Ray gives each worker its GPUs
        else:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in placement.gpus)
        # The command line depends on vLLM's version, read (slowly: it imports vLLM) in start().
        super().__init__(spec, pool, free_port(), [], env, runner_log_path(settings.runner_log_dir, spec))
        self.placement = placement

    async def start(self, timeout: float) -> None:
        version = await asyncio.to_thread(vllm_version, self.python)
        # Under the guard (runners/guard.py), so that vLLM's engine core never outlives the daemon
        template_file = None
        if self.spec.chat_template is not None:
            # a file: vLLM reads a --chat-template given inline through unicode_escape, which mangles non-ASCII
            template_file = self.process.log_path.with_suffix(".chat_template.jinja")
            template_file.parent.mkdir(parents=True, exist_ok=True)
            template_file.write_text(self.spec.chat_template)
        self.process.argv = [sys.executable, "-m", "mgr.daemon.runners.guard", "--parent", str(os.getpid()), "--",
                             *vllm_argv(self.spec, self.placement, self.port, self.python, version,
                                        self.extra_args, self.ray_address, self.spec.parsers, template_file)]
        await super().start(timeout)

    async def sleep(self, level: int) -> None:
        await self._post(f"/sleep?level={level}")

    async def wake(self, level: int) -> None:
        await self._post("/wake_up")
        if level == 2:  # level 2 dropped the weights: read them again from the model folder
            await self._post("/collective_rpc", {"method": "reload_weights"})

    async def _post(self, path: str, body: dict[str, object] | None = None) -> None:
        for attempt in (1, 2):
            try:
                response = await self.control.post(self.base_url + path, json=body, timeout=300)
                break
            except httpx.RemoteProtocolError as e:
                # A pooled keep-alive connection the server had already closed: try once on a fresh one.
                if attempt == 2 or self.exited.done():
                    raise RunnerFailed(f"vLLM did not answer {path}: {e}") from None
            except httpx.TransportError as e:
                raise RunnerFailed(f"vLLM did not answer {path}: {e}") from None
        if response.status_code != 200:
            raise RunnerFailed(f"vLLM refused {path}: {response.status_code} {response.text[:300]}")
