"""A runner subprocess: started in its own process group with its output in a log file, watched for exit,
polled for readiness, stopped with SIGTERM then SIGKILL.

Runners must never outlive the daemon: each child asks the kernel for SIGKILL when its parent dies
(PR_SET_PDEATHSIG), which also covers a daemon killed with -9, and `stop` signals the whole process group,
which covers the children a runner starts itself (vLLM's engine core and workers).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import socket
import time
from collections import deque
from pathlib import Path

import httpx

from ..errors import LoadFailed

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def kill_group(pid: int) -> None:
    """SIGKILL a runner's whole process group at once: for a runner that no longer answers, where SIGTERM
    would only start a grace period it cannot use."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RunnerProcess:
    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None
        self.exited: asyncio.Future[int] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    async def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(self.argv)}\n".encode())
            log.flush()
            self.process = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=asyncio.subprocess.STDOUT,
                env=self.env, start_new_session=True, preexec_fn=_die_with_parent,
            )
        self.exited = asyncio.ensure_future(self.process.wait())

    def log_tail(self, lines: int = 12) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 64 * 1024))
                tail = deque(f.read().decode("utf-8", errors="replace").splitlines(), maxlen=lines)
        except OSError:
            return ""
        return "\n".join(tail)

    async def wait_ready(self, client: httpx.AsyncClient, health_url: str, timeout: float) -> None:
        """Poll the health URL until it answers 200; fail at once if the process exits."""
        assert self.exited is not None
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            if self.exited.done():
                code = self.exited.result()
                raise LoadFailed(f"the runner exited with code {code} while loading:\n{self.log_tail()}")
            try:
                response = await client.get(health_url, timeout=2.0)
                if response.status_code == 200:
                    return
            except httpx.TransportError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                await self.stop()
                raise LoadFailed(f"the runner was not ready after {timeout:.0f}s (load_timeout):\n{self.log_tail()}")
            await asyncio.wait([self.exited], timeout=delay)
            delay = min(delay * 1.5, 0.25)

    async def stop(self, grace: float = 10.0) -> None:
        if self.process is None or self.exited is None or self.exited.done():
            return
        self._signal(signal.SIGTERM)
        done, _ = await asyncio.wait([self.exited], timeout=grace)
        if not done:
            self._signal(signal.SIGKILL)
            await self.exited
        self._signal(signal.SIGKILL)  # whatever the runner left behind in its group

    def _signal(self, sig: int) -> None:
        assert self.process is not None
        try:
            os.killpg(self.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
