"""List a repo on a hub: its commit and every file with its size, hash and download URL.

Hugging Face and hf-mirror are read through huggingface_hub's HfApi (revision -> commit, then the recursive
tree at that commit, so every file comes from one snapshot); ModelScope through modelscope_hub's HubApi (the
client modelscope 1.40 delegates to), or plain httpx against the same endpoint when that package is missing.
Listing is synchronous (both clients are); `list_repo_async` runs it in a worker thread.

Errors say which source was asked and what to do: RepoNotFound, AccessDenied (gated or private: the hub's
message and how to give a token), SourceUnreachable (connection failed, timed out, 5xx or 429: a short name
falls back to the next source).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

import httpx

from .errors import PullError
from .refs import Source

SOURCES: tuple[Source, ...] = ("hf", "hf-mirror", "modelscope")
DEFAULT_ENDPOINTS: Mapping[Source, str] = {
    "hf": "https://huggingface.co",
    "hf-mirror": "https://hf-mirror.com",
    "modelscope": "https://modelscope.cn",
}
# Listing is a few small requests: a source that does not answer in this long is treated as unreachable.
LIST_TIMEOUT = 20.0
USER_AGENT = "mgr/0.1"


class SourceError(PullError):
    http_status = 502

    def __init__(self, message: str, *, source: str = "", repo: str = "") -> None:
        super().__init__(message)
        self.source = source
        self.repo = repo


class RepoNotFound(SourceError):
    http_status = 404


class AccessDenied(SourceError):
    http_status = 403


class SourceUnreachable(SourceError):
    http_status = 502


def _saved_hf_token() -> str | None:
    """The token `hf auth login` saved, so that a logged-in user can pull gated models without more setup."""
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # an unreadable token file must not stop pulls of public models
        return None


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """Endpoints, tokens and the order in which a short name tries the sources."""

    hf_endpoint: str = DEFAULT_ENDPOINTS["hf"]
    hf_mirror_endpoint: str = DEFAULT_ENDPOINTS["hf-mirror"]
    modelscope_endpoint: str = DEFAULT_ENDPOINTS["modelscope"]
    hf_token: str | None = None
    # A separate token for the mirror: sending the Hugging Face token to a third party must be a choice.
    hf_mirror_token: str | None = None
    modelscope_token: str | None = None
    order: tuple[Source, ...] = SOURCES
    list_timeout: float = LIST_TIMEOUT

    def endpoint(self, source: Source) -> str:
        value = {"hf": self.hf_endpoint, "hf-mirror": self.hf_mirror_endpoint, "modelscope": self.modelscope_endpoint}
        return value[source].rstrip("/")

    def token(self, source: Source) -> str | None:
        if source == "hf":
            return self.hf_token or _saved_hf_token()  # a user logged in with `hf auth login` needs nothing more
        return {"hf-mirror": self.hf_mirror_token, "modelscope": self.modelscope_token}[source]

    def download_headers(self, source: Source) -> dict[str, str]:
        token = self.token(source)
        headers = {"User-Agent": USER_AGENT}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    path: str  # in the repo: "model-Q4_K_M.gguf", "sub/x.safetensors"
    size: int
    sha256: str | None  # hex; HF LFS files and every ModelScope file
    git_sha1: str | None  # hex; HF small (non-LFS) files, whose only hash is the git blob id
    url: str


@dataclasses.dataclass(frozen=True)
class RepoListing:
    source: Source
    endpoint: str
    repo: str
    revision: str  # as asked ("main", "master", a tag)
    commit: str | None  # the snapshot listed, when the hub says
    files: tuple[RemoteFile, ...]


_TOKEN_HINT = {
    "hf": "set HF_TOKEN (or MGR_HF_TOKEN) to a token from https://huggingface.co/settings/tokens of an account "
    "that has accepted the model's licence on its page",
    "hf-mirror": "set MGR_HF_MIRROR_TOKEN to a Hugging Face token (the mirror passes it on; it is not sent there "
    "unless you set it) after accepting the model's licence on huggingface.co",
    "modelscope": "set MGR_MODELSCOPE_TOKEN (or MODELSCOPE_API_TOKEN) to a token from "
    "https://modelscope.cn/my/myaccesstoken of an account that has access",
}


def _unreachable(source: Source, endpoint: str, repo: str, why: object) -> SourceUnreachable:
    return SourceUnreachable(f"{source} ({endpoint}) is unreachable: {why}", source=source, repo=repo)


def _by_status(source: Source, endpoint: str, repo: str, status: int, message: str) -> SourceError:
    if status in (401, 403):
        return AccessDenied(
            f"{source} ({endpoint}) refused access to {repo} (HTTP {status}): {message.strip()}\n"
            f"If the repo is gated or private, {_TOKEN_HINT[source]}.",
            source=source,
            repo=repo,
        )
    if status == 404:
        return RepoNotFound(f"{repo} was not found on {source} ({endpoint}): {message.strip()}",
                            source=source, repo=repo)
    if status == 429 or status >= 500:
        return _unreachable(source, endpoint, repo, f"HTTP {status} {message.strip()}")
    return SourceError(f"{source} ({endpoint}) answered HTTP {status} for {repo}: {message.strip()}",
                       source=source, repo=repo)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level failures of any of the HTTP stacks the hub clients use."""
    import requests

    errors: list[type[BaseException]] = [httpx.TransportError, requests.ConnectionError, requests.Timeout, OSError]
    try:
        import httpx2  # huggingface_hub >= 1.x transport

        errors.append(httpx2.TransportError)
    except ImportError:
        pass
    return tuple(errors)


# -- Hugging Face and hf-mirror --------------------------------------------------------------------------------
def hf_file_url(endpoint: str, repo: str, commit: str, path: str) -> str:
    return f"{endpoint}/{repo}/resolve/{quote(commit, safe='')}/{quote(path)}"


def _list_hf(config: SourceConfig, source: Source, repo: str, revision: str | None) -> RepoListing:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RevisionNotFoundError
    from huggingface_hub.hf_api import RepoFile

    endpoint = config.endpoint(source)
    # token=False keeps huggingface_hub from sending a locally saved token anywhere we did not choose.
    from huggingface_hub import get_hf_file_metadata

    token = config.token(source) or False
    api = HfApi(endpoint=endpoint, token=token, library_name="mgr")
    revision = revision or "main"
    try:
        info = api.model_info(repo, revision=revision, timeout=config.list_timeout)
        commit = info.sha or revision
        entries = list(api.list_repo_tree(repo, recursive=True, revision=commit))
        files = [e for e in entries if isinstance(e, RepoFile)]
        if info.gated and files:
            # A gated repo lists without a token but refuses its files: ask for one file now, so that the pull
            # fails (or falls back to another source) before it starts, with the hub's own words.
            probe = min(files, key=lambda f: f.size)
            get_hf_file_metadata(hf_file_url(endpoint, repo, commit, probe.path), token=token,
                                 timeout=config.list_timeout, endpoint=endpoint)
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else 0
        if isinstance(e, RevisionNotFoundError):
            raise RepoNotFound(f"{repo} has no revision {revision!r} on {source} ({endpoint})",
                               source=source, repo=repo) from None
        raise _by_status(source, endpoint, repo, status, e.server_message or str(e).strip().splitlines()[0]) from None
    except OfflineModeIsEnabled as e:
        raise _unreachable(source, endpoint, repo, f"{e} (HF_HUB_OFFLINE is set)") from None
    except _transport_errors() as e:
        raise _unreachable(source, endpoint, repo, f"{type(e).__name__}: {e}") from None
    listed = []
    for entry in files:
        lfs = entry.lfs
        listed.append(
            RemoteFile(
                path=entry.path,
                size=int(entry.size),
                sha256=str(lfs["sha256"]).lower() if lfs else None,
                git_sha1=None if lfs else str(entry.blob_id).lower(),
                url=hf_file_url(endpoint, repo, commit, entry.path),
            )
        )
    return RepoListing(source, endpoint, repo, revision, info.sha, tuple(listed))


# -- ModelScope ------------------------------------------------------------------------------------------------
def modelscope_file_url(endpoint: str, repo: str, revision: str, path: str) -> str:
    return f"{endpoint}/api/v1/models/{repo}/repo?Revision={quote(revision, safe='')}&FilePath={quote(path, safe='')}"


def _modelscope_entries(config: SourceConfig, repo: str, revision: str) -> list[dict[str, Any]]:
    """Raw file entries (Path, Type, Size, Sha256), through modelscope's own client where installed."""
    endpoint = config.endpoint("modelscope")
    try:
        from modelscope_hub import HubApi
        from modelscope_hub import errors as ms_errors
    except ImportError:
        return _modelscope_entries_httpx(config, repo, revision)
    api = HubApi(endpoint=endpoint, token=config.token("modelscope"), user_agent={"invoked_by": "mgr"})
    try:
        infos = api.list_repo_files(repo, "model", revision=revision, recursive=True)
    except (ms_errors.NetworkError, ms_errors.ServerError, ms_errors.RateLimitError) as e:
        raise _unreachable("modelscope", endpoint, repo, e) from None
    except ms_errors.APIError as e:
        status = getattr(getattr(e, "response", None), "status_code", None) or {
            ms_errors.NotExistError: 404, ms_errors.AuthenticationError: 401, ms_errors.PermissionDeniedError: 403,
        }.get(type(e), 400)
        raise _by_status("modelscope", endpoint, repo, status, str(e)) from None
    except _transport_errors() as e:
        raise _unreachable("modelscope", endpoint, repo, e) from None
    return [{"Path": f.path, "Type": f.type, "Size": f.size, "Sha256": f.sha256} for f in infos]


def _modelscope_entries_httpx(config: SourceConfig, repo: str, revision: str) -> list[dict[str, Any]]:
    endpoint = config.endpoint("modelscope")
    headers = config.download_headers("modelscope")
    url = f"{endpoint}/api/v1/models/{repo}/repo/files"
    try:
        r = httpx.get(url, params={"Revision": revision, "Recursive": "True"}, headers=headers,
                      timeout=config.list_timeout, follow_redirects=True)
    except httpx.TransportError as e:
        raise _unreachable("modelscope", endpoint, repo, e) from None
    try:
        body = r.json()
    except ValueError:
        body = {}
    if r.status_code >= 400 or body.get("Success") is False:
        raise _by_status("modelscope", endpoint, repo, r.status_code if r.status_code >= 400 else 404,
                         str(body.get("Message") or r.reason_phrase))
    return list((body.get("Data") or {}).get("Files") or [])


def _list_modelscope(config: SourceConfig, repo: str, revision: str | None) -> RepoListing:
    endpoint = config.endpoint("modelscope")
    revision = revision or "master"
    files = []
    for item in _modelscope_entries(config, repo, revision):
        if item.get("Type", "blob") != "blob":
            continue
        sha256 = item.get("Sha256")
        files.append(
            RemoteFile(
                path=str(item["Path"]),
                size=int(item.get("Size") or 0),
                sha256=str(sha256).lower() if sha256 else None,
                git_sha1=None,
                url=modelscope_file_url(endpoint, repo, revision, str(item["Path"])),
            )
        )
    # ModelScope's file listing names no repo-wide commit; the revision asked for is what we record.
    return RepoListing("modelscope", endpoint, repo, revision, None, tuple(files))


def list_repo(config: SourceConfig, source: Source, repo: str, revision: str | None = None) -> RepoListing:
    """List one repo on one source. Raises RepoNotFound, AccessDenied, SourceUnreachable or SourceError."""
    if source == "modelscope":
        return _list_modelscope(config, repo, revision)
    return _list_hf(config, source, repo, revision)


async def list_repo_async(config: SourceConfig, source: Source, repo: str, revision: str | None = None) -> RepoListing:
    return await asyncio.to_thread(list_repo, config, source, repo, revision)


def describe_attempts(errors: Sequence[SourceError]) -> str:
    return "; ".join(str(e).splitlines()[0] for e in errors)
