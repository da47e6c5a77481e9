"""The runner guard (daemon/runners/guard.py): no process a runner starts outlives the daemon. The command
here stands in for vLLM's API server in shape only: a process that starts a child of its own (vLLM's engine
core), both real processes in the guard's group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil

# A "daemon" that starts the guard as the real one does (own session, SIGKILL on parent death), prints the
# guard's pid and waits. The guarded command starts a grandchild that ignores nothing and sleeps.
DAEMON = textwrap.dedent("""
    import ctypes, os, signal, subprocess, sys, time
    def die_with_parent():
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)
    command = [sys.executable, "-c", "import subprocess, sys, time; "
               "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); " + sys.argv[1]]
    guard = subprocess.Popen([sys.executable, "-m", "mgr.daemon.runners.guard", "--parent", str(os.getpid()), "--",
                              *command], start_new_session=True, preexec_fn=die_with_parent)
    print(guard.pid, flush=True)
    sys.exit(guard.wait())
""")


def start(tmp_path: Path, then: str) -> tuple[subprocess.Popen[str], int]:
    script = tmp_path / "daemon.py"
    script.write_text(DAEMON)
    daemon = subprocess.Popen([sys.executable, str(script), then], stdout=subprocess.PIPE, text=True)
    assert daemon.stdout is not None
    guard = int(daemon.stdout.readline())
    deadline = time.monotonic() + 20
    while len(members(guard)) < 3 and time.monotonic() < deadline:  # guard, command, grandchild
        time.sleep(0.05)
    assert len(members(guard)) == 3, members(guard)
    return daemon, guard


def members(group: int) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == group and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (ProcessLookupError, psutil.Error):
            continue
    return found


def gone(group: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while members(group) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not members(group)


def test_kill_9_of_the_daemon_takes_the_grandchild_down(tmp_path: Path) -> None:
    daemon, guard = start(tmp_path, "time.sleep(300)")
    daemon.kill()  # what PDEATHSIG on the runner alone never covered: the engine core, a grandchild
    daemon.wait()
    assert gone(guard, 15), members(guard)


def test_a_crashed_command_leaves_no_child_behind(tmp_path: Path) -> None:
    daemon, guard = start(tmp_path, "time.sleep(0.5); sys.exit(3)")
    assert daemon.wait(timeout=20) == 3  # the command's own exit code comes through the guard
    assert gone(guard, 5), members(guard)


def test_sigterm_to_the_group_stops_everything_and_the_stubborn_are_killed(tmp_path: Path) -> None:
    # the command ignores SIGTERM (as a wedged engine might): the guard's grace period ends in SIGKILL
    daemon, guard = start(tmp_path, "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"
                          .replace("signal.", "__import__('signal')."))
    started = time.monotonic()
    os.killpg(guard, signal.SIGTERM)  # what RunnerProcess.stop sends
    assert gone(guard, 20), members(guard)
    assert time.monotonic() - started < 15
    daemon.wait(timeout=5)
