"""`python -m mgr.daemon.runners.guard --parent PID -- COMMAND...`: runs COMMAND and takes every process it
leaves in the group down with it.

Why: the kernel's parent-death signal (PR_SET_PDEATHSIG) reaches only the process that asked for it, and
is not inherited. vLLM's API server starts its engine core as a child of its own; after a kill -9 of the
daemon the API server died, but the engine core lived on, re-parented to init, holding the GPU's memory.
The guard is the runner's process-group leader: it asks for SIGTERM when the daemon dies, and on SIGTERM
(the daemon's stop, or its death) passes it to the whole group, then SIGKILLs what is left after a grace
period. When COMMAND exits on its own (a crash), whatever it left behind is killed too. The guard itself
imports nothing of mgr, so it starts in a few milliseconds.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from types import FrameType

GRACE_SECONDS = 10
_PR_SET_PDEATHSIG = 1


def _parent_death_signal(sig: int) -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)
    except OSError:
        pass


def group_members(group: int) -> list[int]:
    """The processes of a process group but this one, from /proc (pgrp is the 5th field of stat)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
        if len(fields) > 2 and int(fields[2]) == group:
            members.append(int(entry))
    return members


def _signal_group(sig: int) -> None:
    for pid in group_members(os.getpgrp()):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[0] != "--parent" or argv[2] != "--":
        print("usage: python -m mgr.daemon.runners.guard --parent PID -- COMMAND...", file=sys.stderr)
        return 2
    parent = int(argv[1])
    _parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent:
        return 1  # the daemon died before the guard could ask to be told

    def on_term(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: a group signal reaches the guard too
        _signal_group(signal.SIGTERM)
        signal.alarm(GRACE_SECONDS)

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        _signal_group(signal.SIGKILL)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    child = subprocess.Popen(argv[3:], preexec_fn=lambda: _parent_death_signal(signal.SIGKILL))
    code = child.wait()
    _signal_group(signal.SIGKILL)  # what the command left behind (vLLM's engine core after a crash)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
