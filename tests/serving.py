"""Waiting for a server subprocess to answer HTTP: shared by the tests' daemon and the benchmarks' servers.
Needs only httpx, so the GPU machine's benchmarks can use it without pytest."""

from __future__ import annotations

import subprocess
import time

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
