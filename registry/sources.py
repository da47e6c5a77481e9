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
import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import quote

import httpx

from .errors import PullError
from .hubs import HUBS, Source, SourceConfig


class SourceError(PullError):
    status = 502


class RepoNotFound(SourceError):
    status = 404


class AccessDenied(SourceError):
    status = 403


class SourceUnreachable(SourceError):
    status = 502


class BadListing(SourceError):
    """The hub listed something mgr's checks refuse (a file name, a hash, a size): nothing is fetched from it.
    502, as the hub's answer is what is wrong; the message says which file and what."""

    status = 502


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


def _unreachable(source: Source, endpoint: str, why: object) -> SourceUnreachable:
    return SourceUnreachable(f"{source} ({endpoint}) is unreachable: {why}")


def _by_status(source: Source, endpoint: str, repo: str, status: int, message: str) -> SourceError:
    if status in (401, 403):
        return AccessDenied(
            f"{source} ({endpoint}) refused access to {repo} (HTTP {status}): {message.strip()}\n"
            f"If the repo is gated or private, {HUBS[source].token_hint}."
        )
    if status == 404:
        return RepoNotFound(f"{repo} was not found on {source} ({endpoint}): {message.strip()}")
    if status == 429 or status >= 500:
        return _unreachable(source, endpoint, f"HTTP {status} {message.strip()}")
    return SourceError(f"{source} ({endpoint}) answered HTTP {status} for {repo}: {message.strip()}")


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
    from huggingface_hub import HfApi, get_hf_file_metadata
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RevisionNotFoundError
    from huggingface_hub.hf_api import RepoFile

    endpoint = config.endpoint(source)
    # token=False keeps huggingface_hub from sending a locally saved token anywhere we did not choose.
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
            raise RepoNotFound(f"{repo} has no revision {revision!r} on {source} ({endpoint})") from None
        raise _by_status(source, endpoint, repo, status, e.server_message or str(e).strip().splitlines()[0]) from None
    except OfflineModeIsEnabled as e:
        raise _unreachable(source, endpoint, f"{e} (HF_HUB_OFFLINE is set)") from None
    except _transport_errors() as e:
        raise _unreachable(source, endpoint, f"{type(e).__name__}: {e}") from None
    listed = []
    for entry in files:
        with _listing_checked(source, endpoint, repo, getattr(entry, "path", None)):
            lfs = entry.lfs
            listed.append(
                RemoteFile(
                    path=str(entry.path),
                    size=_size(entry.size),
                    sha256=str(lfs["sha256"]).lower() if lfs else None,
                    git_sha1=None if lfs else str(entry.blob_id).lower(),
                    url=hf_file_url(endpoint, repo, commit, entry.path),
                )
            )
    return RepoListing(source, endpoint, repo, revision, info.sha, tuple(listed))


@contextlib.contextmanager
def _listing_checked(source: Source, endpoint: str, repo: str, path: object) -> Iterator[None]:
    """An entry of a hub's listing that cannot be read as a file (a size that is no number, a missing field) is
    a BadListing saying which, never an exception of the parsing."""
    try:
        yield
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise BadListing(f"{source} ({endpoint}) listed a file of {repo} that mgr cannot read "
                         f"({str(path)[:200]!r}: {type(e).__name__}: {str(e)[:200]})") from None


def _size(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"size {value!r} is not a whole number")
    size = int(value)
    if size < 0:
        raise ValueError(f"size {size} is negative")
    return size


# -- ModelScope ------------------------------------------------------------------------------------------------
def modelscope_file_url(endpoint: str, repo: str, revision: str, path: str) -> str:
    return f"{endpoint}/api/v1/models/{repo}/repo?Revision={quote(revision, safe='')}&FilePath={quote(path, safe='')}"


def _modelscope_entries(config: SourceConfig, source: Source, repo: str, revision: str) -> list[dict[str, Any]]:
    """Raw file entries (Path, Type, Size, Sha256), through modelscope's own client where installed."""
    endpoint = config.endpoint(source)
    try:
        from modelscope_hub import HubApi
        from modelscope_hub import errors as ms_errors
    except ImportError:
        return _modelscope_entries_httpx(config, source, repo, revision)
    api = HubApi(endpoint=endpoint, token=config.token(source), user_agent={"invoked_by": "mgr"})
    try:
        infos = api.list_repo_files(repo, "model", revision=revision, recursive=True)
    except (ms_errors.NetworkError, ms_errors.ServerError, ms_errors.RateLimitError) as e:
        raise _unreachable(source, endpoint, e) from None
    except ms_errors.APIError as e:
        status = getattr(getattr(e, "response", None), "status_code", None) or {
            ms_errors.NotExistError: 404, ms_errors.AuthenticationError: 401, ms_errors.PermissionDeniedError: 403,
        }.get(type(e), 400)
        raise _by_status(source, endpoint, repo, status, str(e)) from None
    except _transport_errors() as e:
        raise _unreachable(source, endpoint, e) from None
    return [{"Path": f.path, "Type": f.type, "Size": f.size, "Sha256": f.sha256} for f in infos]


def _modelscope_entries_httpx(config: SourceConfig, source: Source, repo: str, revision: str) -> list[dict[str, Any]]:
    endpoint = config.endpoint(source)
    headers = config.download_headers(source)
    url = f"{endpoint}/api/v1/models/{repo}/repo/files"
    try:
        r = httpx.get(url, params={"Revision": revision, "Recursive": "True"}, headers=headers,
                      timeout=config.list_timeout, follow_redirects=True)
    except httpx.TransportError as e:
        raise _unreachable(source, endpoint, e) from None
    try:
        body = r.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    if r.status_code >= 400 or body.get("Success") is False:
        raise _by_status(source, endpoint, repo, r.status_code if r.status_code >= 400 else 404,
                         str(body.get("Message") or r.reason_phrase))
    data = body.get("Data") or {}
    files = (data.get("Files") or []) if isinstance(data, dict) else None
    if not isinstance(files, list) or not all(isinstance(f, dict) for f in files):
        raise BadListing(f"{source} ({endpoint}) answered the listing of {repo} without a list of files")
    return files


def _list_modelscope(config: SourceConfig, source: Source, repo: str, revision: str | None) -> RepoListing:
    endpoint = config.endpoint(source)
    revision = revision or "master"
    files = []
    for item in _modelscope_entries(config, source, repo, revision):
        with _listing_checked(source, endpoint, repo, item.get("Path") if isinstance(item, dict) else item):
            if item.get("Type", "blob") != "blob":
                continue
            sha256 = item.get("Sha256")
            files.append(
                RemoteFile(
                    path=str(item["Path"]),
                    size=_size(item.get("Size") or 0),
                    sha256=str(sha256).lower() if sha256 else None,
                    git_sha1=None,
                    url=modelscope_file_url(endpoint, repo, revision, str(item["Path"])),
                )
            )
    # ModelScope's file listing names no repo-wide commit; the revision asked for is what we record.
    return RepoListing(source, endpoint, repo, revision, None, tuple(files))


def list_repo(config: SourceConfig, source: Source, repo: str, revision: str | None = None) -> RepoListing:
    """List one repo on one source. Raises RepoNotFound, AccessDenied, SourceUnreachable, BadListing or
    SourceError."""
    try:
        if HUBS[source].api == "modelscope":
            return _list_modelscope(config, source, repo, revision)
        return _list_hf(config, source, repo, revision)
    except SourceError:
        raise
    except Exception as e:  # the hub's client choked on what the hub sent (a body that is not the API's JSON)
        raise BadListing(f"{source} ({config.endpoint(source)}) answered the listing of {repo} with something "
                         f"mgr cannot read: {type(e).__name__}: {str(e)[:300]}") from None


async def list_repo_async(config: SourceConfig, source: Source, repo: str, revision: str | None = None) -> RepoListing:
    return await asyncio.to_thread(list_repo, config, source, repo, revision)


def describe_attempts(errors: Sequence[SourceError]) -> str:
    return "; ".join(str(e).splitlines()[0] for e in errors)
