"""What the engine thread does when something fails, so that one request can never take the model down.

A failure while a request is being started or sampled is that request's error: 400 when the request itself
is at fault (BadRequest, text that is not Unicode), else 500 with a short message (the traceback goes to the
runner's log, not to the client); the engine goes on with the others. A failure anywhere else in the engine
loop means the engine cannot go on: the runner process exits at once with ENGINE_FAILED, so that the daemon's
crash handling starts a new one. A live process over a dead engine (its /health still saying ok while every
request hangs) is what this replaces.

Tests inject failures through a hook that exists only when the runner starts with MGR_RUNNER_FAULTS=1 in its
environment: a request's `mgr_fault` field then names where to fail ("start", "sample" or "engine").
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any, Literal

from .sampling import BadRequest

log = logging.getLogger("mgr.runner")

ENGINE_FAILED = 70  # the runner's exit code when its engine thread cannot go on (EX_SOFTWARE)
FAULTS_ENV = "MGR_RUNNER_FAULTS"
Fault = Literal["start", "sample", "engine"]
_FAULTS: tuple[Fault, ...] = ("start", "sample", "engine")


class InjectedFault(RuntimeError):
    """The test hook's failure: an exception the engine did not expect, raised where a test asked."""


def requested_fault(body: dict[str, Any]) -> Fault | None:
    """The failure a test asks for, honoured only when the runner was started with MGR_RUNNER_FAULTS=1."""
    if os.environ.get(FAULTS_ENV) != "1":
        return None
    fault = body.get("mgr_fault")
    if fault is None:
        return None
    for known in _FAULTS:
        if fault == known:
            return known
    raise BadRequest(f"mgr_fault must be one of {', '.join(_FAULTS)}")


def failing_after_first(sample: Callable[[Any], None]) -> Callable[[Any], None]:
    """A sequence's sampler that samples its first token, then fails: a failure in the middle of an answer."""
    calls = 0

    def failing(slot: Any) -> None:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise InjectedFault("injected while sampling a token (test hook)")
        sample(slot)

    return failing


def request_error(error: BaseException) -> tuple[int, str]:
    """The status and message a request's own failure is answered with."""
    if isinstance(error, BadRequest):
        return 400, str(error)
    if isinstance(error, UnicodeError):
        return 400, "the request's text is not valid Unicode (a lone UTF-16 surrogate?); send whole characters"
    log.error("a request failed in the engine; the engine goes on", exc_info=error)
    return 500, f"the model runner failed on this request ({type(error).__name__}); the runner log has the details"


def engine_cannot_go_on(error: BaseException) -> None:
    """End the process: its engine thread is gone, and a runner that answers /health without an engine hangs
    every request sent to it."""
    log.critical("the engine thread failed and cannot go on; the runner exits so that it is started again",
                 exc_info=error)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(ENGINE_FAILED)
