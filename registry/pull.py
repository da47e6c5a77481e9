"""Pull a model: resolve the reference, list the repo, choose the files, fetch and verify them, write the manifest.

The model becomes visible (store.create writes its manifest) only after every file is verified and in blobs/;
a failed pull leaves no model, only verified blobs (reused by the next attempt, collected later if unused) and
resumable partial files in tmp/.

Progress goes out as Ollama's /api/pull stream does:
    {"status": "pulling manifest"}
    {"status": "pulling <12 hex>", "digest": "sha256:<hex>", "total": N, "completed": M}   per file, ~every 60 ms
    {"status": "verifying sha256 digest"}
    {"status": "writing manifest"}
    {"status": "success"}
plus plain status lines saying which source serves the pull and why an earlier one was skipped.

Two ways to call it from an async handler: `await pull(..., progress=callback)` (callback sync or async), or
`async for event in pull_events(...)`, which raises the pull's error after the last event.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from .catalog import Candidate, Catalog, Format, default_catalog
from .refs import SOURCE_HOSTS, HubReference, Reference, parse_reference
from .select import Selection, select_files
from .sources import (
    AccessDenied,
    RemoteFile,
    RepoListing,
    RepoNotFound,
    SourceConfig,
    SourceError,
    SourceUnreachable,
    describe_attempts,
    list_repo_async,
)
from .store import Manifest, Store
from .transfer import Downloader, FileSpec, TransferOptions

PullEvent = dict[str, Any]
EventSink = Callable[[PullEvent], Awaitable[None] | None]
PROGRESS_INTERVAL = 0.06  # seconds between progress events of one file, as Ollama sends them


@dataclasses.dataclass
class _FileProgress:
    file: RemoteFile
    digest: str | None  # known up front for LFS / ModelScope files, after the download for small HF files
    completed: int = 0
    sent: int = -1

    def event(self) -> PullEvent | None:
        if self.digest is None:
            return None
        return {"status": f"pulling {self.digest[7:19]}", "digest": self.digest, "total": self.file.size,
                "completed": self.completed}


class _Events:
    def __init__(self, sink: EventSink | None) -> None:
        self._sink = sink

    async def emit(self, event: PullEvent) -> None:
        if self._sink is None:
            return
        result = self._sink(event)
        if inspect.isawaitable(result):
            await result


def _candidates(ref: Reference, catalog: Catalog | None, prefer: Format, config: SourceConfig) -> list[Candidate]:
    if isinstance(ref, HubReference):
        return [Candidate(ref.source, ref.repo, None, ref.tag)]
    return (catalog or default_catalog()).resolve(ref, prefer=prefer, sources=config.order)


async def _list_first(candidates: Sequence[Candidate], config: SourceConfig, revision: str | None,
                      events: _Events) -> tuple[Candidate, RepoListing]:
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
                await events.emit({"status": f"{str(e).splitlines()[0]}; trying {nxt.source} ({nxt.repo})"})
    if len(errors) == 1:
        raise errors[0]
    summary = describe_attempts(errors)
    if any(isinstance(e, AccessDenied) for e in errors):
        denied = next(e for e in errors if isinstance(e, AccessDenied))
        raise AccessDenied(f"no source gave access: {summary}\n{str(denied).splitlines()[-1]}")
    if all(isinstance(e, RepoNotFound) for e in errors):
        raise RepoNotFound(f"not found on any source: {summary}")
    raise SourceUnreachable(f"no source could serve it: {summary}")


def _store_path(selection: Selection, file: RemoteFile) -> str:
    # GGUF files are stored by base name (a quantization may sit in a folder); safetensors keep their layout.
    return file.path.rsplit("/", 1)[-1] if selection.format == "gguf" else file.path


async def _fetch_all(downloader: Downloader, listing: RepoListing, selection: Selection, config: SourceConfig,
                     events: _Events) -> dict[str, str]:
    headers = config.download_headers(listing.source)
    progress = [_FileProgress(f, f"sha256:{f.sha256}" if f.sha256 else None) for f in selection.files]
    where = SOURCE_HOSTS[listing.source]

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
            for p in progress:
                event = p.event()
                if event is not None and p.completed != p.sent:
                    p.sent = p.completed
                    await events.emit(event)

    ticker = asyncio.create_task(report())
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(one(p)) for p in progress]
    except BaseExceptionGroup as group_error:
        raise group_error.exceptions[0] from None
    finally:
        ticker.cancel()
    for p in progress:  # every file's last event says completed == total
        event = p.event()
        if event is not None and p.sent != p.completed:
            await events.emit(event)
    return {_store_path(selection, p.file): t.result() for p, t in zip(progress, tasks, strict=True)}


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
    """Pull `reference` into `store` and return its manifest.

    prefer: the format a short name gets when it names none ("gguf" without a usable GPU, "safetensors" where
    vLLM runs). downloader: share one across pulls (the daemon should) so that concurrent pulls of one file
    share a download; without it this pull makes its own. Raises a PullError subclass: InvalidReference,
    UnknownModel, RepoNotFound, AccessDenied, SourceUnreachable, TagNotFound, NoModelFiles, TransferError,
    ChecksumMismatch, DiskFull; InvalidModel (from the store) when the files are not a loadable model.
    """
    config = sources or SourceConfig()
    events = _Events(progress)
    await events.emit({"status": "pulling manifest"})
    ref = parse_reference(reference)
    revision = ref.revision if isinstance(ref, HubReference) else None
    candidate, listing = await _list_first(_candidates(ref, catalog, prefer, config), config, revision, events)
    selection = select_files(listing.files, candidate.tag, prefer=prefer, format=candidate.format,
                             repo=f"{SOURCE_HOSTS[listing.source]}/{listing.repo}")
    at = (listing.commit or listing.revision)[:12]
    await events.emit({"status": f"pulling from {listing.source} ({listing.endpoint}): {listing.repo}@{at}",
                       "source": listing.source, "repo": listing.repo, "commit": listing.commit})

    had = {f"sha256:{f.sha256}" for f in selection.files if f.sha256 and store.has_blob(f"sha256:{f.sha256}")}
    own = downloader is None
    downloader = downloader or Downloader(store, transfer)
    try:
        files = await _fetch_all(downloader, listing, selection, config, events)
    finally:
        if own:
            await downloader.aclose()
    await events.emit({"status": "verifying sha256 digest"})  # each file was verified as it landed
    await events.emit({"status": "writing manifest"})
    source = {
        "hub": listing.source,
        "endpoint": listing.endpoint,
        "repo": listing.repo,
        "revision": listing.revision,
        "commit": listing.commit,
        "files": [f.path for f in selection.files],
        "reference": reference,
        "format": selection.format,
        "quantization": selection.quant,
    }
    try:
        manifest = await asyncio.to_thread(store.create, ref.name, files, source)
    except Exception:
        # The files are not a model the store accepts: drop the blobs this pull added that no model uses.
        await asyncio.to_thread(store.discard_unreferenced, [d for d in files.values() if d not in had])
        raise
    await events.emit({"status": "success"})
    return manifest


_DONE = object()


async def pull_events(store: Store, reference: str, **kwargs: Any) -> AsyncIterator[PullEvent]:
    """`pull` as an async iterator of its events; raises the pull's error after the last event. Stopping the
    iteration (a client that disconnects) cancels the pull; what it fetched stays resumable."""
    queue: asyncio.Queue[Any] = asyncio.Queue()
    task = asyncio.create_task(pull(store, reference, progress=queue.put, **kwargs))
    task.add_done_callback(lambda _: queue.put_nowait(_DONE))
    try:
        while (item := await queue.get()) is not _DONE:
            yield item
        task.result()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait([task])  # let it checkpoint its partial files; its CancelledError is expected
