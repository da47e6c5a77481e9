"""The daemon's own lifecycle from the CLI: `mgr serve --detach` (`mgr start`), `mgr stop-server`, `mgr status`.

A `mgr serve` records its pid once its port is bound, in the state dir, one file per address it listens on
(`serve-<host>-<port>.json`, with the process's start time), and removes the record when it exits.
`mgr stop-server` and `mgr status` act on the daemon at the address this CLI talks to (MGR_HOST) through
that record alone: the pid, checked against its start time so that a reused pid is never signalled. No
pattern kill: other daemons on other ports, other users' and the service's are never touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from mgr.registry.config import Settings

from .client import APIError, Client, DaemonUnreachable

START_WAIT = 60.0  # seconds a detached daemon has to answer
STOP_WAIT = 60.0  # seconds a stopping daemon has to exit (it drains answers for shutdown_timeout first)


class LifecycleError(Exception):
    """The daemon could not be started or stopped; the message says why and what to do."""


def record_path(settings: Settings) -> Path:
    """The pid record of the daemon at the settings' address."""
    address = re.sub(r"[^A-Za-z0-9.]+", "-", f"{settings.bind_host}-{settings.bind_port}")
    return settings.state_dir / f"serve-{address}.json"


def log_path(settings: Settings) -> Path:
    return settings.state_dir / "serve.log"


def _started_at(pid: int) -> float | None:
    """The process's start time (psutil), None when it is gone."""
    import psutil  # only the lifecycle commands pay for it

    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return None


def write_record(settings: Settings) -> None:
    """Called by `mgr serve` once it listens: this process is the daemon at the settings' address."""
    path = record_path(settings)
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"pid": os.getpid(), "started": _started_at(os.getpid()), "url": settings.base_url}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(path)


def remove_record(settings: Settings) -> None:
    """At the end of `mgr serve`: the record goes, if it is still this process's."""
    path = record_path(settings)
    record = read_record(path)
    if record is not None and record.get("pid") == os.getpid():
        with contextlib.suppress(OSError):
            path.unlink()


def read_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("pid"), int) else None


def recorded_pid(settings: Settings) -> int | None:
    """The pid of the daemon recorded for this address, if that very process is still alive."""
    record = read_record(record_path(settings))
    if record is None:
        return None
    pid = int(record["pid"])
    started = _started_at(pid)
    if started is None or (record.get("started") is not None and abs(started - float(record["started"])) > 1.0):
        return None  # gone, or the pid now belongs to another process
    return pid


def _answers(client: Client) -> dict[str, Any] | None:
    try:
        return client.request_json("GET", "/api/version")
    except (DaemonUnreachable, APIError):
        return None


def start(settings: Settings, client: Client, serve_args: list[str]) -> int:
    """`mgr serve --detach`: start `mgr serve` in its own session, log to the state dir, return once it answers."""
    running = recorded_pid(settings)
    if _answers(client) is not None:
        owner = f" (pid {running})" if running else ""
        print(f"mgr is already running at {settings.base_url}{owner}")
        return 0
    log = log_path(settings)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as output:
        child = subprocess.Popen(
            [sys.executable, "-m", "mgr.cli", "serve", *serve_args], stdin=subprocess.DEVNULL, stdout=output,
            stderr=subprocess.STDOUT, start_new_session=True,  # Ctrl+C in this terminal does not reach it
        )
    deadline = time.monotonic() + START_WAIT
    while time.monotonic() < deadline:
        if child.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            said = " / ".join(tail) or "no output"
            raise LifecycleError(f"mgr serve exited at start (code {child.returncode}): {said} (log: {log})")
        if _answers(client) is not None:
            print(f"mgr is running at {settings.base_url} (pid {child.pid}), log in {log}")
            print("Stop it with: mgr stop-server")
            return 0
        time.sleep(0.1)
    raise LifecycleError(f"mgr serve (pid {child.pid}) did not answer within {START_WAIT:.0f}s; see {log}")


def stop(settings: Settings, client: Client) -> int:
    """`mgr stop-server`: SIGTERM to the recorded daemon of this address, then wait until it has gone."""
    pid = recorded_pid(settings)
    if pid is None:
        if _answers(client) is not None:
            raise LifecycleError(
                f"the mgr at {settings.base_url} was not started by `mgr serve` with this state dir "
                f"({settings.state_dir}), so its pid is unknown: stop it where it runs (Ctrl+C, or "
                "`sudo systemctl stop mgr` for the service)")
        print(f"mgr is not running at {settings.base_url}")
        return 0
    os.kill(pid, signal.SIGTERM)  # the daemon drains: answers in flight get shutdown_timeout to finish
    deadline = time.monotonic() + STOP_WAIT
    while time.monotonic() < deadline:
        if _started_at(pid) is None or _is_zombie(pid):
            print(f"stopped mgr at {settings.base_url} (pid {pid})")
            return 0
        time.sleep(0.1)
    raise LifecycleError(f"mgr (pid {pid}) is still stopping after {STOP_WAIT:.0f}s; see {log_path(settings)}")


def _is_zombie(pid: int) -> bool:
    import psutil

    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return True


def status(settings: Settings, client: Client) -> int:
    """`mgr status`: whether the daemon at this CLI's address answers, its pid, version and loaded models.
    Exit 0 when it answers, 1 when not."""
    pid = recorded_pid(settings)
    version = _answers(client)
    if version is None:
        print(f"mgr is not running at {settings.base_url}" + (f" (pid {pid} does not answer)" if pid else ""))
        print("Start it with: mgr serve --detach")
        return 1
    owner = f"pid {pid}" if pid else "pid unknown: not started by this user's `mgr serve`"
    shown = version.get("mgr_version") or version.get("version") or "?"
    print(f"mgr {shown} is running at {settings.base_url} ({owner})")
    try:
        loaded = client.request_json("GET", "/api/ps").get("models") or []
    except APIError:
        loaded = []
    print(f"models loaded: {', '.join(str(m.get('name')) for m in loaded) or 'none'}")
    return 0
