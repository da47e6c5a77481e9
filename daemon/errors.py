"""Errors the daemon answers with, each carrying its HTTP status. The API adapters render them in their own
shape (Ollama: {"error": "..."}; OpenAI: {"error": {"message", "type", "code"}})."""

from __future__ import annotations


class ApiError(Exception):
    status = 500

    def __init__(self, message: str, status: int | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        self.headers = headers or {}


class BadRequest(ApiError):
    status = 400


class NotFound(ApiError):
    status = 404


class QueueFull(ApiError):
    status = 503

    def __init__(self) -> None:
        super().__init__("server busy, please try again. maximum pending requests exceeded",
                         headers={"Retry-After": "1"})


class ClientGone(ApiError):
    status = 499  # nginx's "client closed request"; the client never sees it, the log does


class LoadFailed(ApiError):
    status = 500


class EngineUnavailable(ApiError):
    status = 501
