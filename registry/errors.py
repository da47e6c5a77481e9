"""The one error hierarchy of mgr: every failure a client can be told about is an `MgrError` carrying the HTTP
status it answers with. The API layer renders any of them in the called API's shape, in one place.

    MgrError (status 500)
    ├── registry: InvalidName (400), InvalidModel (400) > UnreadableFile, InvalidFile (400), ModelNotFound (404),
    │             BlobNotFound (400), DigestMismatch (400), ModelfileError (400), ExternalFileChanged (409),
    │             ImportPathError (400/403/404, importers.py), and the pull's steps:
    │   └── PullError
    │       ├── InvalidReference (400), UnknownModel (404), TagNotFound (404), NoModelFiles (422),
    │       │   InvalidOllamaManifest (502, ollama.py)
    │       ├── SourceError: RepoNotFound (404), AccessDenied (403), SourceUnreachable (502), BadListing (502)
    │       └── TransferError (502): ChecksumMismatch, DiskFull (507), TransferStopped (503)
    └── daemon (daemon/errors.py): BadRequest (400), QueueFull (503), ShuttingDown (503), ClientGone (499),
        │   LoadFailed (500), EngineUnavailable (501), RunnerFailed (502), RunnerTimedOut (504)
        └── elsewhere in the daemon: Unauthorized (401), Forbidden (403), BodyTooLarge (413) in guards.py;
            RayUnavailable (503) in ray_cluster.py; NoRoute (404/405) in api/openapi.py; ResponseNotFound (404)
            in responses_store.py; NoRunnerLog (404) in api/ui.py

Each class is defined next to the code that raises it; they share this base so that the daemon catches one type
and answers with `status`, `headers` and `str(error)`, which always says what to do next. The registry never
imports the daemon, so the base lives here, in the lower layer.
"""

from __future__ import annotations


class MgrError(Exception):
    status: int = 500

    def __init__(self, message: str = "", status: int | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status
        self.headers: dict[str, str] = headers or {}

    @property
    def message(self) -> str:
        return str(self)


class PullError(MgrError):
    """Anything a pull can fail with, before or while it fetches."""
