"""Shared fixtures: the real SmolLM2 GGUF, and a real `mgr serve` daemon on a free loopback port with its own
models and state folders."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from serving import NotServing, wait_until_serving

DEFAULT_GGUF = Path.home() / ".cache" / "mgr-test" / "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = "What is the capital of France? Answer with one short sentence."


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    path = Path(os.environ.get("MGR_TEST_GGUF", DEFAULT_GGUF))
    if not path.is_file():
        pytest.fail(f"the test model {path} is missing: run ./scripts/test (it fetches it), or set MGR_TEST_GGUF")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    """A `mgr serve` subprocess and the helpers tests use to talk to it."""

    def __init__(self, root: Path, extra_env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.env = dict(
            os.environ,
            MGR_HOST=f"127.0.0.1:{self.port}",
            MGR_MODELS=str(root / "models"),
            MGR_STATE_DIR=str(root / "state"),
            MGR_CONFIG=str(root / "config.toml"),
            **(extra_env or {}),
        )
        self.log_path = root / "daemon.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mgr.cli", "serve"], env=self.env, stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            wait_until_serving(self.base_url + "/", self.process, 30)
        except NotServing as e:
            raise RuntimeError(f"mgr serve {e}:\n{self.log_path.read_text()}") from None

    def runner_processes(self) -> list[psutil.Process]:
        """The daemon's live runner processes. One that exits while it is being looked at, or is a zombie,
        is skipped: it no longer holds a model."""
        assert self.process is not None
        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        runners = []
        for process in children:
            try:
                if process.status() != psutil.STATUS_ZOMBIE and "mgr.daemon.runners" in " ".join(process.cmdline()):
                    runners.append(process)
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
        return runners

    def runner_pids(self) -> list[int]:
        return [p.pid for p in self.runner_processes()]

    def cli(self, *args: str, input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "mgr.cli", *args], env=self.env, input=input, capture_output=True,
            text=True, timeout=timeout, stdin=None if input is not None else subprocess.DEVNULL,
        )

    def stop(self) -> list[int]:
        """SIGTERM the daemon; returns the pids of runners it had, for the caller to check they are gone."""
        if self.process is None or self.process.poll() is not None:
            return []
        runners = [p.pid for p in self.runner_processes()]
        self.process.terminate()
        try:
            self.process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        return runners


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("mgr"))
    d.start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def smollm2(daemon: Daemon, gguf_path: Path) -> str:
    """The real model, created in the daemon's store through the CLI; returns its name."""
    result = daemon.cli("create", "smollm2", "--from", str(gguf_path))
    assert result.returncode == 0, result.stderr
    return "smollm2:latest"


class DaemonSampler(threading.Thread):
    """Calls `sample(client)` every `interval` seconds against a daemon until `stop_event` is set; an error
    in a sample is kept in `errors` (for the caller to report), never raised in the thread."""

    def __init__(self, daemon: Daemon, interval: float) -> None:
        super().__init__(daemon=True)
        self.target = daemon
        self.interval = interval
        self.stop_event = threading.Event()
        self.samples = 0
        self.errors: list[str] = []

    def run(self) -> None:
        with httpx.Client(base_url=self.target.base_url, timeout=10, trust_env=False) as client:
            while not self.stop_event.is_set():
                started = time.monotonic()
                try:
                    self.sample(client)
                    self.samples += 1
                except Exception as e:
                    self.errors.append(f"{type(e).__name__}: {e}")
                self.stop_event.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def sample(self, client: httpx.Client) -> None:
        raise NotImplementedError


def wait_for(condition, timeout: float = 10.0, interval: float = 0.05) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return bool(condition())
