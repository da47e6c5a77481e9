"""Runners a crashed daemon left behind, found and stopped at the next start.

Each runner is recorded when it starts (state_dir/runners/running/<pid>.json: its pid, its process's start
time, its model) and the record removed when it has stopped. A daemon that dies without stopping its runners
(SIGKILL, an OOM kill, a power cut of the service manager) leaves its records; the next daemon stops every
recorded process group still alive before it starts anything. The start time is what makes this safe: a pid
the kernel has since given to another process has another start time, and is never signalled.

This is the belt to two pairs of braces: each runner asks the kernel for SIGKILL when the daemon dies
(runners/process.py, PR_SET_PDEATHSIG), and vLLM runs under runners/guard.py. A runner that outlived both (a
runner started by a thread that then ended, a process that cleared its parent-death signal) is found here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time
from pathlib import Path

import psutil

log = logging.getLogger("mgr.daemon")

STOP_GRACE_SECONDS = 5.0  # SIGTERM, then SIGKILL: a leftover has nobody waiting on its answers


def records_dir(runner_log_dir: Path) -> Path:
    return runner_log_dir / "running"


def _start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def record(directory: Path, pid: int, model: str) -> None:
    """A runner has started: remember it until `forget`. Failing to write is logged, never fatal."""
    started = _start_time(pid)
    if started is None:
        return  # it is gone already
    try:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{pid}.json"
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps({"pid": pid, "start_time": started, "model": model}))
        temporary.replace(path)
    except OSError as e:
        log.warning("could not record runner %d in %s: %s", pid, directory, e)


def forget(directory: Path, pid: int) -> None:
    with contextlib.suppress(OSError):
        (directory / f"{pid}.json").unlink()


def _same_process(pid: int, start_time: float) -> bool:
    started = _start_time(pid)
    return started is not None and abs(started - start_time) < 0.5  # create_time is rounded to clock ticks


def _group_alive(pgid: int) -> bool:
    """Whether the group still runs: its leader not yet a zombie, or, the leader gone, any member left."""
    try:
        if psutil.Process(pgid).status() != psutil.STATUS_ZOMBIE:
            return True
    except psutil.Error:
        pass
    try:
        return any(p.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(p.pid) == pgid and p.pid != pgid
                   for p in psutil.process_iter(["status"]))
    except OSError:
        return False


def stop_leftovers(directory: Path) -> list[tuple[int, str]]:
    """Stop every recorded runner whose process (same pid, same start time) is still alive, with its process
    group; remove every record. Returns (pid, model) of those stopped. Blocking: run it in a thread."""
    try:
        paths = sorted(directory.glob("*.json"))
    except OSError:
        return []
    stopped: list[tuple[int, str]] = []
    for path in paths:
        try:
            entry = json.loads(path.read_text())
            pid, start_time, model = int(entry["pid"]), float(entry["start_time"]), str(entry.get("model", ""))
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("ignoring an unreadable runner record %s", path)
            path.unlink(missing_ok=True)
            continue
        # A runner leads its own process group (runners/process.py: a new session); anything else is not ours.
        if _same_process(pid, start_time) and _pgid(pid) == pid:
            log.warning("%s: a runner (pid %d) left by a daemon that did not stop it; stopping it", model, pid)
            _stop_group(pid)
            stopped.append((pid, model))
        path.unlink(missing_ok=True)
    return stopped


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _stop_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    while _group_alive(pgid) and time.monotonic() < deadline:
        _reap(pgid)
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    _reap(pgid)


def _reap(pid: int) -> None:
    """A leftover whose parent is this process (a test's) is a zombie until waited for; others are reaped by
    init. Either way it no longer runs."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
