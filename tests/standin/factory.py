"""STAND-IN runner factory for the scheduler: starts tests/standin/runner.py instead of a real engine.

A real engine takes seconds to load a model; the stand-in takes milliseconds (or as long as a test asks), so
the scheduler's policy can be tested through its real code path: `ProcessRunner` and `RunnerProcess` as the
daemon uses them, a subprocess in its own process group, /health polled over loopback with real httpx.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

from mgr.daemon.placement import CPU, Placement
from mgr.daemon.runners.base import LoadSpec, ProcessRunner, runner_log_path
from mgr.daemon.runners.http import RunnerPool
from mgr.daemon.runners.process import free_port
from mgr.registry.config import Settings
from standin.gpus import StaticGpus

SCRIPT = Path(__file__).with_name("runner.py")


@dataclasses.dataclass(frozen=True)
class StandinOptions:
    """How the stand-in behaves for one model."""

    load_seconds: float = 0.0
    fail_load: bool = False
    reply: str = "Hello from the stand-in runner."
    token_delay: float = 0.0
    sleeps: bool = False  # answers vLLM's sleep-mode endpoints, as a vLLM runner does


class StandinRunner(ProcessRunner):
    backend = "stand-in"

    def __init__(self, spec: LoadSpec, settings: Settings, options: StandinOptions, pool: RunnerPool,
                 placement: Placement = CPU, gpus: StaticGpus | None = None) -> None:
        self.placement = placement
        self.gpus = gpus
        self.supports_sleep = options.sleeps
        port = free_port()
        argv = [
            sys.executable, str(SCRIPT),
            "--port", str(port),
            "--load-seconds", str(options.load_seconds),
            "--reply", options.reply,
            "--token-delay", str(options.token_delay),
            "--model-name", spec.name,
            "--ctx-size", str(spec.num_ctx),
        ]
        if options.fail_load:
            argv.append("--fail-load")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        super().__init__(spec, pool, port, argv, env, runner_log_path(settings.runner_log_dir, spec))

    async def start(self, timeout: float) -> None:
        await super().start(timeout)
        # On imaginary GPUs the stand-in "uses" what the scheduler estimated (or `uses` says), split evenly.
        if self.gpus is not None and self.pid is not None:
            for index in self.placement.gpus:
                self.gpus.allocate(self.pid, index, self.uses // len(self.placement.gpus))

    async def stop(self) -> None:
        await super().stop()
        if self.gpus is not None and self.pid is not None:
            self.gpus.free(self.pid)

    async def sleep(self, level: int) -> None:
        (await self.control.post(f"{self.base_url}/sleep?level={level}")).raise_for_status()
        self._allocate(self.uses // 10)  # asleep, vLLM keeps its CUDA context and little else

    async def wake(self, level: int) -> None:
        (await self.control.post(f"{self.base_url}/wake_up")).raise_for_status()
        self._allocate(self.uses)

    def _allocate(self, total: int) -> None:
        if self.gpus is not None and self.pid is not None:
            for index in self.placement.gpus:
                self.gpus.allocate(self.pid, index, total // len(self.placement.gpus))

    @property
    def uses(self) -> int:
        return self.actual_bytes if self.actual_bytes is not None else self.spec.estimate

    actual_bytes: int | None = None


class StandinFactory:
    """A RunnerFactory for `Scheduler`; options are per model path ("alpha" for "alpha:latest"), and every
    runner it made is kept so that tests can count loads and find the processes."""

    def __init__(self, settings: Settings, options: dict[str, StandinOptions] | None = None,
                 gpus: StaticGpus | None = None, actual_bytes: dict[str, int] | None = None) -> None:
        self.settings = settings
        self.pool = RunnerPool()  # what the daemon's EngineRunners share, here the stand-ins'
        self.options = options or {}
        self.gpus = gpus
        self.actual_bytes = actual_bytes or {}  # per model: what it "really" uses, unlike the estimate
        self.runners: list[StandinRunner] = []

    def __call__(self, spec: LoadSpec, placement: Placement = CPU) -> StandinRunner:
        path = spec.name.rpartition(":")[0] or spec.name
        runner = StandinRunner(spec, self.settings, self.options.get(path, StandinOptions()), self.pool, placement,
                               self.gpus)
        runner.actual_bytes = self.actual_bytes.get(path)
        self.runners.append(runner)
        return runner

    def started(self, model: str) -> list[StandinRunner]:
        """The runners made for one model ("alpha"), oldest first."""
        return [r for r in self.runners if r.spec.name.rpartition(":")[0] == model]

    def pids(self, model: str) -> list[int]:
        return [r.pid for r in self.started(model) if r.pid is not None]
