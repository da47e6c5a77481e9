"""The one small interface every engine's runner shares, and what the scheduler tells a runner to load.

A runner is a subprocess serving the internal protocol (daemon/protocol: OpenAI /v1/chat/completions,
/v1/completions, /v1/embeddings, GET /health) on 127.0.0.1:<port>. The scheduler starts, watches, puts to
sleep and stops runners; the API adapters send requests through `client` (a typed RunnerClient on the
daemon's shared connection pool). Each runner owns its control client (httpx: health, sleep, wake).
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Protocol

import httpx

from mgr.registry.capabilities import Capability
from mgr.registry.catalog import Format
from mgr.registry.vllm_parsers import VllmParsers

from .. import leftovers
from ..protocol.runner_secret import RUNNER_SECRET_ENV, bearer, new_secret
from ..protocol.shapes import HEALTH_PATH
from .http import RunnerClient, RunnerPool
from .process import RunnerProcess

Backend = Literal["llama.cpp", "vllm", "stand-in"]


@dataclasses.dataclass(frozen=True)
class LoadSpec:
    """Everything that decides how a model is loaded. A request that needs a different spec (another
    num_ctx, say) means a reload, as in Ollama."""

    name: str
    digest: str
    format: Format
    model_path: Path
    num_ctx: int
    num_parallel: int
    size: int  # bytes of weights
    # Derived or configured, not part of what makes two specs the same load:
    estimate: int = dataclasses.field(default=0, compare=False)  # bytes it will take once loaded
    layers: int = dataclasses.field(default=0, compare=False)  # transformer blocks, for partial offload
    pinned: tuple[int, ...] | None = dataclasses.field(default=None, compare=False)  # GPUs from the config
    capabilities: tuple[Capability, ...] = dataclasses.field(default=("completion",), compare=False)
    projector: Path | None = dataclasses.field(default=None, compare=False)  # a GGUF vision model's mmproj
    parsers: VllmParsers | None = dataclasses.field(default=None, compare=False)  # a vLLM model's parsers
    # Given at create (a Modelfile's TEMPLATE and ADAPTER): another template or adapter is another load
    chat_template: str | None = None  # a Jinja chat template that replaces the model's own
    adapter: Path | None = None  # a LoRA adapter: a GGUF file (llama.cpp) or a PEFT folder (vLLM)
    # What every request on the model gets unless it says otherwise (SYSTEM, MESSAGE, PARAMETER); not the load's
    system: str = dataclasses.field(default="", compare=False)
    messages: tuple[Mapping[str, str], ...] = dataclasses.field(default=(), compare=False)
    parameters: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)  # Ollama's options


def runner_log_path(log_dir: Path, spec: LoadSpec) -> Path:
    """One log file per model, named after it (safe for a file system)."""
    return log_dir / (re.sub(r"[^A-Za-z0-9._-]+", "_", spec.name) + ".log")


class Runner(Protocol):
    backend: Backend
    spec: LoadSpec
    client: RunnerClient  # the data path: chat, completion, embedding
    supports_sleep: bool  # whether sleep()/wake() work (vLLM's sleep mode)

    @property
    def pid(self) -> int | None:
        """The runner's process (its children are found from it), None before start."""

    async def start(self, timeout: float) -> None:
        """Start the process and return once it is ready; raise LoadFailed otherwise."""

    async def stop(self) -> None:
        """Stop the process group and wait for it to be gone."""

    async def sleep(self, level: int) -> None:
        """Free the GPU but keep the process: level 1 keeps weights in host RAM, level 2 drops them."""

    async def wake(self, level: int) -> None:
        """Undo sleep(level)."""

    async def cached_tokens(self) -> int | None:
        """Prompt tokens the runner holds for later requests (llama.cpp's prompt cache); None where it does not
        say (vLLM keeps its prefix cache to itself)."""

    @property
    def exited(self) -> asyncio.Future[int]:
        """Resolves with the exit code when the process ends, whoever ended it."""


def control_client(secret: str = "") -> httpx.AsyncClient:
    # Runners answer on loopback; a sleep or wake can take minutes, so only connecting has a deadline.
    # trust_env=False: an HTTP(S)_PROXY in the environment must never route loopback runner traffic.
    headers = {"Authorization": bearer(secret)} if secret else {}
    return httpx.AsyncClient(trust_env=False, timeout=httpx.Timeout(None, connect=10.0), headers=headers)


class ProcessRunner:
    """A runner that is one command line; subclasses say which command."""

    backend: Backend = "stand-in"
    supports_sleep = False  # engines with a sleep mode (vLLM) override sleep() and wake()
    secret_env = RUNNER_SECRET_ENV  # the environment variable the runner reads its secret from (vLLM: its own)

    def __init__(self, spec: LoadSpec, pool: RunnerPool, port: int, argv: list[str], env: dict[str, str],
                 log_path: Path) -> None:
        self.spec = spec
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"  # for control calls; requests go through `client`
        # in the environment, not on the command line (which `ps` shows every user): protocol/runner_secret.py
        self.secret = new_secret()
        self.client = pool.client(port, self.secret)
        self.process = RunnerProcess(argv, {**env, self.secret_env: self.secret}, log_path)
        self.control = control_client(self.secret)

    @property
    def pid(self) -> int | None:
        return self.process.pid

    async def start(self, timeout: float) -> None:
        await self.process.start()
        self._record_until_exit()
        await self.process.wait_ready(self.control, self.base_url + HEALTH_PATH, timeout)

    async def stop(self) -> None:
        try:
            await self.process.stop()
        finally:
            await self.control.aclose()

    def _record_until_exit(self) -> None:
        """Recorded while its process lives, so that a daemon that dies without stopping it has the next one
        stop it (daemon/leftovers.py)."""
        pid, exited = self.process.pid, self.process.exited
        if pid is None or exited is None:
            return
        records = leftovers.records_dir(self.process.log_path.parent)
        leftovers.record(records, pid, self.spec.name)
        exited.add_done_callback(lambda _: leftovers.forget(records, pid))

    async def sleep(self, level: int) -> None:
        raise NotImplementedError(f"{self.backend} runners cannot sleep")

    async def wake(self, level: int) -> None:
        raise NotImplementedError(f"{self.backend} runners cannot sleep")

    async def cached_tokens(self) -> int | None:
        return None

    @property
    def exited(self) -> asyncio.Future[int]:
        assert self.process.exited is not None, "runner not started"
        return self.process.exited
