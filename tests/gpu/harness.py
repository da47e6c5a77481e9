"""What the multi-check GPU scripts share: a daemon started with its own folders and config, soft checks
(every check runs, each prints PASS/FAIL with what it measured; the script exits 1 if any failed), GPU memory
per GPU and per process from NVML, and closed-loop completion load for throughput. Runs on the GPU machine only."""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pynvml

QUESTION = "What is the capital of France? Answer with one short sentence."
FAILED: list[str] = []


def say(message: str) -> None:
    print(message, flush=True)


def check(condition: bool, message: str) -> bool:
    say(("PASS " if condition else "FAIL ") + message)
    if not condition:
        FAILED.append(message)
    return condition


class Skipped(Exception):
    pass


@contextlib.contextmanager
def section(title: str, wanted: bool = True) -> Iterator[bool]:
    """A group of checks: an exception inside fails the group and the script goes on with the next. Yields
    whether the group is wanted: a group not wanted (a rerun of some groups) is skipped by its body's
    `if not wanted: raise Skipped` (a context manager cannot skip its body itself)."""
    say(f"== {title}" + ("" if wanted else " (skipped)"))
    try:
        yield wanted
    except Skipped:
        pass
    except Exception as e:  # reported as a failed check, and the script goes on
        check(False, f"{title}: {type(e).__name__}: {e}")


def skip_unless(wanted: bool) -> None:
    if not wanted:
        raise Skipped


def used_mib(index: int) -> int:
    return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).used) >> 20


def process_mib(pids: set[int]) -> dict[int, int]:
    """MiB of GPU memory the given processes hold, by GPU index."""
    held: dict[int, int] = {}
    for index in range(pynvml.nvmlDeviceGetCount()):
        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(pynvml.nvmlDeviceGetHandleByIndex(index)):
            if p.pid in pids and p.usedGpuMemory:
                held[index] = held.get(index, 0) + (int(p.usedGpuMemory) >> 20)
    return held


def gpu_holders() -> dict[int, list[int]]:
    """Every process holding memory on each GPU."""
    return {index: [p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(
        pynvml.nvmlDeviceGetHandleByIndex(index))] for index in range(pynvml.nvmlDeviceGetCount())}


def wait(condition: Callable[[], Any], timeout: float) -> float | None:
    """Seconds until the condition held, or None if it never did within the timeout."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            return None
        time.sleep(0.2)
    return time.monotonic() - start


class Daemon:
    def __init__(self, root: Path, config: str, port: int = 11434, **env: str) -> None:
        self.root = root
        self.url = f"http://127.0.0.1:{port}"
        root.mkdir(parents=True, exist_ok=True)
        (root / "config.toml").write_text(config)
        self.env = dict(os.environ, MGR_HOST=f"127.0.0.1:{port}", MGR_MODELS=str(root / "models"),
                        MGR_STATE_DIR=str(root / "state"), MGR_CONFIG=str(root / "config.toml"),
                        MGR_CONTEXT_LENGTH="2048", **env)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.root / "daemon.log").open("ab")
        # from the state folder: a run's working tree is replaced between calls (../shared/gpu/README.md)
        self.process = subprocess.Popen([sys.executable, "-m", "mgr.cli", "serve"], env=self.env, stdout=log,
                                        stderr=subprocess.STDOUT, cwd=self.root)
        if wait(self.up, 60) is None:
            raise RuntimeError("the daemon did not answer within 60 s")

    def up(self) -> bool:
        try:
            return httpx.get(self.url + "/", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def mgr(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mgr.cli", *args], env=self.env, capture_output=True, text=True,
                              timeout=600, stdin=subprocess.DEVNULL, cwd=self.root)

    def ps(self) -> list[dict[str, Any]]:
        return httpx.get(self.url + "/api/ps", timeout=10).json()["models"]

    def entry(self, name: str) -> dict[str, Any] | None:
        return next((m for m in self.ps() if m["name"].split(":")[0] == name), None)

    def chat(self, model: str, api: str = "ollama", **extra: Any) -> str:
        if api == "ollama":
            response = httpx.post(self.url + "/api/chat", timeout=900, json={
                "model": model, "stream": False, "options": {"temperature": 0, "num_predict": 40},
                "messages": [{"role": "user", "content": QUESTION}], **extra})
            if response.status_code != 200:
                return f"HTTP {response.status_code}: {response.text[:400]}"
            return str(response.json()["message"]["content"])
        response = httpx.post(self.url + "/v1/chat/completions", timeout=900, json={
            "model": model, "temperature": 0, "max_tokens": 40, "messages": [{"role": "user", "content": QUESTION}],
            **extra})
        if response.status_code != 200:
            return f"HTTP {response.status_code}: {response.text[:400]}"
        return str(response.json()["choices"][0]["message"]["content"])

    def descendants(self) -> list[psutil.Process]:
        assert self.process is not None
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.Error:
            return []

    def servers(self, marker: str = "vllm.entrypoints.openai.api_server") -> list[psutil.Process]:
        """Runner processes (the vLLM API servers or mgr's llama.cpp runners), not their guards."""
        found = []
        for p in self.descendants():
            try:
                argv = " ".join(p.cmdline())
            except psutil.Error:
                continue
            if marker in argv and "runners.guard" not in argv:
                found.append(p)
        return found

    def tree(self, process: psutil.Process) -> set[int]:
        try:
            return {process.pid, *(c.pid for c in process.children(recursive=True))}
        except psutil.Error:
            return {process.pid}

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def runner_logs(self, lines: int = 20) -> None:
        for log_file in sorted((self.root / "state" / "runners").glob("*.log")):
            say(f"----- {log_file.name} (last lines)")
            say("\n".join(log_file.read_text(errors="replace").splitlines()[-lines:]))


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def paired_throughput(ours: str, theirs: str, model: str | tuple[str, str], streams: int, rounds: int = 5,
                      max_tokens: int = 128, keys: tuple[str, str] = ("", "")) -> tuple[float, float, float]:
    """Output tokens/s at `streams` concurrent streamed completions against two servers, rounds alternating
    (ours, theirs, ours, ...) so that drift of the machine falls on both: (our median, their median, the median
    of the per-round ratios). Each round is a closed loop of 4 x streams requests from mgr's own load generator
    (several processes, a minimal HTTP reader), so the client is not what is measured; one warm-up round each.
    `model`: one name for both, or each server's own; `keys`: a bearer key for each ("" for none)."""
    from mgr.cli import loadgen

    models = (model, model) if isinstance(model, str) else model
    prompts = loadgen.random_prompts(4 * streams, 24)
    sides = []
    for url, name, key in zip((ours, theirs), models, keys):
        endpoint = loadgen.Endpoint(url, "openai", "completion",
                                    (("Authorization", f"Bearer {key}"),) if key else ())
        sides.append((endpoint, [loadgen.request_body("openai", "completion", name, prompt, max_tokens, True,
                                                      {"temperature": 0}) for prompt in prompts]))
    for endpoint, bodies in sides:
        loadgen.run_cell(endpoint, bodies[:streams], streams)
    rates: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        for rate, (endpoint, bodies) in zip(rates, sides):
            cell = loadgen.run_cell(endpoint, bodies, streams)
            if cell.errors:
                raise RuntimeError(f"{endpoint.url}: {cell.errors} requests failed: {cell.first_errors}")
            if cell.saturated:
                say(f"  note: the load generator was saturated measuring {endpoint.url}")
            rate.append(cell.output_throughput)
    ratios = [a / b for a, b in zip(*rates)]
    return statistics.median(rates[0]), statistics.median(rates[1]), statistics.median(ratios)


