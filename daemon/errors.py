"""The daemon's own errors: subclasses of the one hierarchy (`mgr.registry.errors.MgrError`, drawn there), each
with the HTTP status it answers with. api/render.py renders any MgrError in the called API's shape."""

from __future__ import annotations

from mgr.registry.errors import MgrError


class BadRequest(MgrError):
    status = 400


class QueueFull(MgrError):
    status = 503

    def __init__(self) -> None:
        super().__init__("server busy, please try again. maximum pending requests exceeded",
                         headers={"Retry-After": "1"})


class ShuttingDown(MgrError):
    status = 503

    def __init__(self) -> None:
        super().__init__("the server is shutting down")


class ClientGone(MgrError):
    status = 499  # nginx's "client closed request"; the client never sees it, the log does


class LoadFailed(MgrError):
    status = 500


class EngineUnavailable(MgrError):
    status = 501


class RunnerFailed(MgrError):
    """The runner stopped, broke its connection or refused a control call."""

    status = 502


class RunnerTimedOut(MgrError):
    """The runner sent nothing for longer than runner_timeout (before its answer) or runner_idle_timeout (within
    it): taken as hung, and started again."""

    status = 504
