"""Pull a model in two steps: plan it (resolve the reference, list the repo, choose the files), then fetch it
(download and verify the files, write the manifest).

Every failure that is the caller's to fix or to ask again about (a bad reference 400; an unknown model, repo or
tag 404; a gated or private repo 401/403; a repo without model files 422; every hub unreachable, or a listing
that names a file or a hash mgr refuses, 502) is raised by `plan_pull`, before a byte is downloaded. What fetching
can fail with (TransferError, ChecksumMismatch, DiskFull; InvalidModel when the files are not a model the store
accepts) happens once the download is under way.

The model becomes visible (store.create writes its manifest) only after every file is verified and in blobs/;
a failed pull leaves no model, only verified blobs (reused by the next attempt, collected later if unused) and
resumable partial files in tmp/.

Progress goes out as Ollama's /api/pull stream does:
    {"status": "pulling manifest"}
    {"status": "pulling from <source> (<endpoint>): <repo>@<commit>", "source": ..., "repo": ..., "commit": ...}
    {"status": "pulling <12 hex>", "digest": "sha256:<hex>", "total": N, "completed": M}   per file, ~every 60 ms
    {"status": "verifying sha256 digest"}
    {"status": "writing manifest"}
    {"status": "success"}
plus a status line for each source skipped while planning, saying why ("...; trying hf-mirror (owner/repo)").
The planning events are kept in the plan (`PullPlan.planned`), so a stream that starts after planning still
begins with them.

A model in Ollama's registry (`ollama://llama3.2:3b`, `registry.ollama.ai/library/...`; a short name not in the
catalog when MGR_SOURCES names `ollama`) is planned from its manifest (registry/ollama.py): its file layers are
the files to fetch, through the same downloader; its text layers (system, params, messages, license) are read and
verified while planning and become what the model carries, as a create's would.

Three ways to call it:
    manifest = await pull(store, reference, progress=callback)      plan and fetch; callback sync or async
    plan = await plan_pull(store, reference)                         plan only: raises the 4xx errors
    manifest = await plan.fetch(downloader, progress=callback)       then fetch
    async for event in plan.events(downloader): ...                  or fetch as a stream (planning events first)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import json
import re
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any, NotRequired, TypedDict

from .catalog import Candidate, Catalog, Format, UnknownModel, default_catalog
from .hubs import HUBS, USER_AGENT, Source, SourceConfig
from .ollama import MANIFEST_MEDIA_TYPE, OllamaManifest, blob_url, customization, manifest_url, read_verified
from .refs import HubReference, OllamaReference, Reference, ShortReference, ollama_reference, parse_reference
from .selection import Selection, select_files
from .sources import (
    AccessDenied,
    BadListing,
    RemoteFile,
    RepoListing,
    RepoNotFound,
    SourceError,
    SourceUnreachable,
    _by_status,
    _transport_errors,
    _unreachable,
    describe_attempts,
    list_repo_async,
)
from .store import Customization, Manifest, Store, check_file_path
from .transfer import Downloader, FileSpec, TransferOptions

PROGRESS_INTERVAL = 0.06  # seconds between progress events of one file, as Ollama sends them


class StatusEvent(TypedDict):
    """A step of the pull, or a note on the way ("...; trying hf-mirror (owner/repo)")."""

    status: str


class SourceEvent(TypedDict):
    """Where the files come from: sent once, after planning."""

    status: str
    source: Source
    repo: str
    commit: str | None


class FileEvent(TypedDict):
    """One file's progress."""

    status: str  # "pulling <12 hex of the digest>"
    digest: str  # "sha256:<hex>"
    total: int
    completed: int
    file: NotRequired[str]  # the file's path in the repo (mgr's addition: `mgr pull` labels its bars with it)


PullEvent = StatusEvent | SourceEvent | FileEvent
EventSink = Callable[[PullEvent], Awaitable[None] | None]


async def _emit(sink: EventSink | None, event: PullEvent) -> None:
    if sink is None:
        return
    result = sink(event)
    if inspect.isawaitable(result):
        await result


# -- planning -----------------------------------------------------------------------------------------------------
def _candidates(ref: HubReference | ShortReference, catalog: Catalog | None, prefer: Format,
                config: SourceConfig) -> list[Candidate]:
    if isinstance(ref, HubReference):
        return [Candidate(ref.source, ref.repo, None, ref.tag)]
    return (catalog or default_catalog()).resolve(ref, prefer=prefer, sources=config.order)


async def _list_first(candidates: Sequence[Candidate], config: SourceConfig, revision: str | None,
                      note: Callable[[PullEvent], Awaitable[None]]) -> tuple[Candidate, RepoListing]:
    """The first candidate whose source answers. For a short name every kind of source failure moves on: a repo
    gated on one hub is often free on another, and the hubs' copies are not always named alike."""
    errors: list[SourceError] = []
    for i, candidate in enumerate(candidates):
        try:
            return candidate, await list_repo_async(config, candidate.source, candidate.repo, revision)
        except SourceError as e:
            errors.append(e)
            if i + 1 < len(candidates):
                nxt = candidates[i + 1]
                await note({"status": f"{str(e).splitlines()[0]}; trying {nxt.source} ({nxt.repo})"})
    if len(errors) == 1:
        raise errors[0]
    summary = describe_attempts(errors)
    if any(isinstance(e, AccessDenied) for e in errors):
        denied = next(e for e in errors if isinstance(e, AccessDenied))
        raise AccessDenied(f"no source gave access: {summary}\n{str(denied).splitlines()[-1]}")
    if all(isinstance(e, RepoNotFound) for e in errors):
        raise RepoNotFound(f"not found on any source: {summary}")
    raise SourceUnreachable(f"no source could serve it: {summary}")


async def plan_pull(
    store: Store,
    reference: str,
    *,
    sources: SourceConfig | None = None,
    catalog: Catalog | None = None,
    prefer: Format = "gguf",
    progress: EventSink | None = None,
) -> PullPlan:
    """Decide what pulling `reference` into `store` means: which source, which repo at which commit, which files.

    prefer: the format a short name gets when it names none ("gguf" without a usable GPU, "safetensors" where
    vLLM runs). progress: receives the planning events as they happen (they are in the plan's `planned` too).
    Raises a PullError subclass, each with its HTTP `status`: InvalidReference (400), UnknownModel (404),
    RepoNotFound (404), AccessDenied (403), SourceUnreachable (502), TagNotFound (404), NoModelFiles (422).
    """
    config = sources or SourceConfig()
    planned: list[PullEvent] = []

    async def note(event: PullEvent) -> None:
        planned.append(event)
        await _emit(progress, event)

    await note({"status": "pulling manifest"})
    ref: Reference = parse_reference(reference)
    candidates: list[Candidate] = []
    if not isinstance(ref, OllamaReference):
        try:
            candidates = _candidates(ref, catalog, prefer, config)
        except UnknownModel:
            if not isinstance(ref, ShortReference) or "ollama" not in config.order:
                raise
            # not in the catalog, and the settings let short names go to Ollama's registry, as `ollama pull` would
            ref = ollama_reference(ref.text, "library", ref.family, ref.tag)
    if isinstance(ref, OllamaReference):
        return await _plan_ollama(store, reference, ref, config, note, planned)
    revision = ref.revision if isinstance(ref, HubReference) else None
    candidate, listing = await _list_first(candidates, config, revision, note)
    selection = select_files(listing.files, candidate.tag, prefer=prefer, format=candidate.format,
                             repo=f"{HUBS[listing.source].host}/{listing.repo}")
    _check_selected(selection, listing)
    at = (listing.commit or listing.revision)[:12]
    await note({"status": f"pulling from {listing.source} ({listing.endpoint}): {listing.repo}@{at}",
                "source": listing.source, "repo": listing.repo, "commit": listing.commit})
    return PullPlan(store, reference, ref.name, listing, selection, config, tuple(planned))


def _read_ollama(config: SourceConfig, ref: OllamaReference) -> tuple[OllamaManifest, dict[str, bytes], str | None]:
    """The manifest, its text layers' bytes by media type (each verified), and the quantization its config names.
    Raises RepoNotFound, AccessDenied, SourceUnreachable, InvalidOllamaManifest, ChecksumMismatch."""
    import httpx

    endpoint = config.endpoint("ollama")
    where = f"ollama ({endpoint}) {ref.repo}:{ref.tag}"
    headers = {**config.download_headers("ollama"), "User-Agent": USER_AGENT}

    def read(client: httpx.Client, url: str, limit: int, accept: str | None = None) -> bytes:
        with client.stream("GET", url, headers={"Accept": accept} if accept else {}) as response:
            if response.status_code != 200:
                response.read()
                raise _by_status("ollama", endpoint, f"{ref.repo}:{ref.tag}", response.status_code,
                                 response.text[:300])
            data = bytearray()
            for chunk in response.iter_bytes():
                data += chunk
                if len(data) > limit:
                    break
            return bytes(data)

    try:
        with httpx.Client(headers=headers, follow_redirects=True, timeout=config.list_timeout) as client:
            manifest = OllamaManifest.parse(read(client, manifest_url(endpoint, ref.repo, ref.tag), 1 << 20,
                                                 MANIFEST_MEDIA_TYPE), where)
            manifest.file_layers(where)  # one model layer, or refused before anything else is read

            def read_layer(url: str, limit: int) -> bytes:
                return read(client, url, limit)

            texts = {layer.media_type: read_verified(read_layer, blob_url(endpoint, ref.repo, layer.digest), layer,
                                                     where) for layer in manifest.text_layers()}
            quant = None
            if manifest.config is not None and manifest.config.size <= 1 << 20:
                config_blob = read_verified(read_layer, blob_url(endpoint, ref.repo, manifest.config.digest),
                                            manifest.config, where)
                with contextlib.suppress(ValueError, AttributeError):
                    quant = json.loads(config_blob).get("file_type") or None
    except _transport_errors() as e:
        raise _unreachable("ollama", endpoint, e) from None
    return manifest, texts, quant if isinstance(quant, str) else None


async def _plan_ollama(store: Store, reference: str, ref: OllamaReference, config: SourceConfig,
                       note: Callable[[PullEvent], Awaitable[None]], planned: list[PullEvent]) -> PullPlan:
    endpoint = config.endpoint("ollama")
    manifest, texts, quant = await asyncio.to_thread(_read_ollama, config, ref)
    layers = manifest.file_layers(f"ollama ({endpoint}) {ref.repo}:{ref.tag}")
    custom, notes = customization(texts)
    for layer in manifest.text_layers():  # read and verified already: shown as Ollama shows every layer
        await note({"status": f"pulling {layer.hex[:12]}", "digest": layer.digest, "total": layer.size,
                    "completed": layer.size})
    for text in notes:
        await note({"status": f"{ref.name}: {text}"})
    files = tuple(RemoteFile(name, layer.size, layer.hex, None, blob_url(endpoint, ref.repo, layer.digest))
                  for name, layer in layers.items())
    commit = manifest.digest.removeprefix("sha256:")
    listing = RepoListing("ollama", endpoint, ref.repo, ref.tag, commit, files)
    selection = Selection("gguf", files, quant)
    _check_selected(selection, listing)
    await note({"status": f"pulling from ollama ({endpoint}): {ref.repo}:{ref.tag}@{commit[:12]}",
                "source": "ollama", "repo": ref.repo, "commit": commit})
    return PullPlan(store, reference, ref.name, listing, selection, config, tuple(planned), custom,
                    frozenset(name for name in layers if name == "adapter.gguf"))


_SHA256 = re.compile(r"[0-9a-f]{64}")
_GIT_SHA1 = re.compile(r"[0-9a-f]{40}")


def _check_selected(selection: Selection, listing: RepoListing) -> None:
    """The files to fetch, as the store and the downloader will take them, checked before the 200 and before a
    byte is downloaded: a name the store refuses, or a hash that is not one (it names the partial file in tmp/
    and the blob), is the hub's listing at fault: BadListing (502), saying which file and what."""
    where = f"{listing.source} ({listing.endpoint}) lists {listing.repo}'s file"
    stored: dict[str, str] = {}
    for file in selection.files:
        name = _store_path(selection, file)
        try:
            check_file_path(name)
        except ValueError:
            raise BadListing(f"{where} {file.path[:200]!r}, whose name mgr's store refuses (relative paths of "
                             "letters, digits, '.', '_', '+' and '-'): nothing was downloaded") from None
        if file.sha256 is not None and not _SHA256.fullmatch(file.sha256):
            raise BadListing(f"{where} {file.path!r} with the sha256 {file.sha256[:80]!r}, which is not 64 hex "
                             "digits: nothing was downloaded")
        if file.git_sha1 is not None and not _GIT_SHA1.fullmatch(file.git_sha1):
            raise BadListing(f"{where} {file.path!r} with the git blob id {file.git_sha1[:80]!r}, which is not 40 "
                             "hex digits: nothing was downloaded")
        if name.lower() in stored:
            raise BadListing(f"{where}s {stored[name.lower()]!r} and {file.path!r}, which would both be stored as "
                             f"{name!r}: nothing was downloaded")
        stored[name.lower()] = file.path


# -- fetching -----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _FileProgress:
    file: RemoteFile
    digest: str | None  # known up front for LFS / ModelScope files, after the download for small HF files
    completed: int = 0
    sent: int = -1

    def event(self) -> FileEvent | None:
        if self.digest is None:
            return None
        return {"status": f"pulling {self.digest[7:19]}", "digest": self.digest, "total": self.file.size,
                "completed": self.completed, "file": self.file.path}


def _store_path(selection: Selection, file: RemoteFile) -> str:
    # GGUF files are stored by base name (a quantization may sit in a folder); safetensors keep their layout.
    return file.path.rsplit("/", 1)[-1] if selection.format == "gguf" else file.path


async def _fetch_all(downloader: Downloader, listing: RepoListing, selection: Selection, config: SourceConfig,
                     progress: EventSink | None) -> dict[str, str]:
    headers = config.download_headers(listing.source)
    files = [_FileProgress(f, f"sha256:{f.sha256}" if f.sha256 else None) for f in selection.files]
    where = HUBS[listing.source].host

    async def one(p: _FileProgress) -> str:
        spec = FileSpec(p.file.url, p.file.size, p.file.sha256, p.file.git_sha1,
                        f"{where}/{listing.repo}/{p.file.path}", headers)

        def update(completed: int, _total: int) -> None:
            p.completed = completed

        digest = await downloader.fetch(spec, update)
        p.digest, p.completed = digest, p.file.size
        return digest

    async def report() -> None:
        while True:
            # Sleep first: by then a resumed download has reported the bytes it already has, so the first
            # event of a file says where it starts rather than 0.
            await asyncio.sleep(PROGRESS_INTERVAL)
            for p in files:
                event = p.event()
                if event is not None and p.completed != p.sent:
                    p.sent = p.completed
                    await _emit(progress, event)

    ticker = asyncio.create_task(report())
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(one(p)) for p in files]
    except BaseExceptionGroup as group_error:
        raise group_error.exceptions[0] from None
    finally:
        ticker.cancel()
    for p in files:  # every file's last event says completed == total
        event = p.event()
        if event is not None and p.sent != p.completed:
            await _emit(progress, event)
    return {_store_path(selection, p.file): t.result() for p, t in zip(files, tasks, strict=True)}


@dataclasses.dataclass(frozen=True)
class PullPlan:
    """A pull decided by `plan_pull`: the model's name, the source and commit, the files. Fetch it once."""

    store: Store
    reference: str  # as asked: recorded in the manifest
    name: str  # the model's name in the store: "hf.co/owner/repo:Q4_K_M"
    listing: RepoListing
    selection: Selection
    sources: SourceConfig
    planned: tuple[PullEvent, ...]  # the events of planning, in order: "pulling manifest" ... "pulling from ..."
    custom: Customization | None = None  # what the model carries beyond its files (an Ollama model's layers)
    adapter_files: frozenset[str] = frozenset()  # fetched files that are the model's adapter, not its files

    async def fetch(self, downloader: Downloader | None = None, *, progress: EventSink | None = None,
                    transfer: TransferOptions | None = None) -> Manifest:
        """Download and verify the files, then write the manifest; `progress` gets the events after planning.

        downloader: share one across pulls (the daemon does) so that concurrent pulls of one file share a
        download; without it this pull makes its own (with `transfer`). Raises TransferError, ChecksumMismatch,
        DiskFull, or InvalidModel (from the store) when the files are not a loadable model.
        """
        store, listing, selection = self.store, self.listing, self.selection
        had = {f"sha256:{f.sha256}" for f in selection.files if f.sha256 and store.has_blob(f"sha256:{f.sha256}")}
        own = downloader is None
        fetcher = downloader or Downloader(store, transfer)
        try:
            files = await _fetch_all(fetcher, listing, selection, self.sources, progress)
        finally:
            if own:
                await fetcher.aclose()
        await _emit(progress, {"status": "verifying sha256 digest"})  # each file was verified as it landed
        await _emit(progress, {"status": "writing manifest"})
        source: dict[str, Any] = {
            "hub": listing.source,
            "endpoint": listing.endpoint,
            "repo": listing.repo,
            "revision": listing.revision,
            "commit": listing.commit,
            "files": [f.path for f in selection.files],
            "reference": self.reference,
            "format": selection.format,
            "quantization": selection.quant,
        }
        model_files = {path: digest for path, digest in files.items() if path not in self.adapter_files}
        custom = self.custom
        if custom is not None and self.adapter_files:
            custom = dataclasses.replace(custom, adapters={p: files[p] for p in self.adapter_files})
        try:
            manifest = await asyncio.to_thread(store.create, self.name, model_files, source, custom)
        except Exception:
            # The files are not a model the store accepts: drop the blobs this pull added that no model uses.
            await asyncio.to_thread(store.discard_unreferenced, [d for d in files.values() if d not in had])
            raise
        await _emit(progress, {"status": "success"})
        return manifest

    async def events(self, downloader: Downloader | None = None, *,
                     transfer: TransferOptions | None = None) -> AsyncGenerator[PullEvent, None]:
        """The whole pull's events, the planning ones first, as `fetch` makes progress; raises fetch's error
        after the last event. The download starts at the first step of the iteration; stopping the iteration
        (aclose: a client that disconnects) cancels it, and what it fetched stays resumable."""
        queue: asyncio.Queue[PullEvent | None] = asyncio.Queue()  # None: the fetch is over
        task = asyncio.create_task(self.fetch(downloader, progress=queue.put_nowait, transfer=transfer))
        task.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            for event in self.planned:
                yield event
            while (item := await queue.get()) is not None:
                yield item
            task.result()
        finally:
            if not task.done():
                task.cancel()
                await asyncio.wait([task])  # let it checkpoint its partial files; its CancelledError is expected


async def pull(
    store: Store,
    reference: str,
    *,
    sources: SourceConfig | None = None,
    catalog: Catalog | None = None,
    prefer: Format = "gguf",
    progress: EventSink | None = None,
    downloader: Downloader | None = None,
    transfer: TransferOptions | None = None,
) -> Manifest:
    """Plan and fetch: pull `reference` into `store` and return its manifest. `progress` gets every event as it
    happens; errors are those of `plan_pull`, then those of `PullPlan.fetch`."""
    plan = await plan_pull(store, reference, sources=sources, catalog=catalog, prefer=prefer, progress=progress)
    return await plan.fetch(downloader, progress=progress, transfer=transfer)
