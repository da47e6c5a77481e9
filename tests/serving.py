"""Waiting for a server subprocess to answer HTTP: shared by the tests' daemon and the benchmarks' servers.
Needs only httpx, so the GPU machine's benchmarks can use it without pytest."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx


class NotServing(RuntimeError):
    """The process exited, or did not answer in time."""


def wait_until_serving(url: str, process: subprocess.Popen[bytes], timeout: float, interval: float = 0.1) -> None:
    """Return once GET `url` answers 200; NotServing says whether the process exited or time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            raise NotServing(f"exited with code {process.returncode}")
        time.sleep(interval)
    raise NotServing(f"did not answer {url} within {timeout:.0f}s")


def start_llama_runner(model: Path, log_path: Path, *args: str) -> tuple[subprocess.Popen[bytes], str]:
    """The real llama.cpp runner process on a free loopback port (2 threads); `args` are more of its flags."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "mgr.daemon.runners.llama", "--model", str(model),
                                "--port", str(port), "--threads", "2", *args],
                               stdout=log_path.open("wb"), stderr=subprocess.STDOUT)
    return process, f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def llama_runner(model: Path, log_path: Path, *args: str) -> Iterator[str]:
    """A runner started, ready (its /health answers 200) and stopped afterwards; yields its base URL."""
    process, url = start_llama_runner(model, log_path, *args)
    try:
        try:
            wait_until_serving(url + "/health", process, 90)
        except NotServing as e:
            raise RuntimeError(f"the runner {e}:\n{log_path.read_text()[-3000:]}") from None
        yield url
    finally:
        process.terminate()
        process.wait(timeout=20)
