"""Our download engine: parallel Range parts, resumable across any interruption, verified, into the store.

One file is cut into parts of `part_size` bytes; up to `connections` parts are fetched at once, each with its
own `Range` request, written in place (pwrite) into one preallocated partial file in the store's tmp/ folder:

    tmp/<key>.partial      the bytes, at their final offsets
    tmp/<key>.parts.json   each part's start, end and how many of its bytes are written; how many are durable
    tmp/<key>.lock         flock: one downloader per file, also across processes

<key> is the expected sha256 (or `gitsha1-<hex>` for small Hugging Face files whose only hash is the git blob
id). The state is written two ways. A checkpoint (every `checkpoint_interval` seconds or `checkpoint_bytes`)
fsyncs the data first and records it as durable: after a power loss a pull resumes from what is really on disk.
A mark (every `mark_bytes`, from the worker threads, no fsync) records what has been written: after a kill -9
the kernel still holds those pages, so a pull resumes from them, having lost only what was in flight. Which
counts a resume trusts depends on the machine's boot id, kept in the state: the written ones within the same
boot, the durable ones after a reboot. Either way a pull never fetches again the bytes it may trust.

Each part's bytes travel in a worker thread: a Range GET through `rangeget` (1 MiB per recv, the GIL
released while the kernel copies), pwrite, and hashing, so the event loop only keeps the books. Where an
HTTP(S) proxy is configured, a client was handed in, or a server answers in a way rangeget does not handle,
parts go through httpx on the event loop instead, as they all did before.

Dropped connections, 5xx and 429 (honouring Retry-After) are retried with exponential backoff; so is a stall
(no byte for `stall_timeout` seconds). Redirects are followed (the hubs send LFS files to a CDN). The file is
hashed while it downloads (the contiguous prefix written so far, read back from the page cache), checked
against the hub's sha256 (or git blob sha1), and renamed into blobs/sha256-<hex>; a mismatch fetches the file
once more from scratch, then fails loudly. Blobs the store already has are not fetched; two pulls of one file
in this process share one download.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import email.utils
import errno
import fcntl
import functools
import hashlib
import json
import os
import random
import re
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import httpx

from . import rangeget
from .errors import PullError
from .store import Store

Progress = Callable[[int, int], None]  # (completed bytes, total bytes) of one file

_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_WRITE_BUFFER = 1 << 20  # bytes per recv and pwrite
_ABORT_GRACE = 5.0  # seconds a cancel waits for a part's thread (all it does but a DNS lookup stops at once)


class TransferError(PullError):
    status = 502


class ChecksumMismatch(TransferError):
    pass


class DiskFull(TransferError):
    status = 507


class TransferStopped(TransferError):
    """The downloader was stopped (the daemon is shutting down): what was fetched stays, for a resume."""

    status = 503


class _Retry(Exception):
    """A failure worth another attempt; `wait` is what the server asked for (Retry-After), if anything."""

    def __init__(self, why: str, wait: float | None = None) -> None:
        super().__init__(why)
        self.wait = wait


@dataclasses.dataclass(frozen=True)
class TransferOptions:
    connections: int = 4  # parallel Range requests for one file
    part_size: int = 32 << 20  # the unit of parallel work; resume is exact to the byte regardless
    max_streams: int = 8  # Range requests in flight for all files of one Downloader together
    retries: int = 8  # attempts of one part without any progress before the pull fails
    backoff: float = 0.5  # first retry delay in seconds, doubled each attempt
    max_backoff: float = 30.0
    stall_timeout: float = 30.0  # seconds without a byte before the connection is dropped and retried
    connect_timeout: float = 20.0
    checkpoint_interval: float = 1.0  # seconds between fsync + state writes while downloading
    # ... or sooner, once this many more bytes of the file are in: what a power loss can cost, and what the last
    # fsync, which the pull waits for, has left to write (a fast link fills the page cache otherwise).
    checkpoint_bytes: int = 16 << 20
    # A mark (no fsync: a small file written and renamed, ~0.1 ms) once this many more bytes are written: what
    # a kill -9 can cost, with what was in flight (a recv of up to 1 MiB per connection, and the socket's
    # buffers). Checkpoints alone lost up to a second's worth: 80 MB at 20 MB/s on each of 4 connections.
    mark_bytes: int = 1 << 20
    max_retry_after: float = 120.0  # longest Retry-After honoured as given


@dataclasses.dataclass(frozen=True)
class FileSpec:
    """One file to fetch and what it must hash to."""

    url: str
    size: int
    sha256: str | None  # hex
    git_sha1: str | None  # hex, of "blob <size>\0" + data (Hugging Face non-LFS files)
    label: str  # for messages: "hf.co/owner/repo/config.json"
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def key(self) -> str:
        if self.sha256:
            return self.sha256
        if self.git_sha1:
            return f"gitsha1-{self.git_sha1}"
        # The hub gave no hash: the file can only be checked by size; key it by its URL.
        return "url-" + hashlib.sha256(self.url.encode()).hexdigest()[:40]


def _is_disk_full(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, errno.EDQUOT)


def _disk_full(spec: FileSpec, partial: Path, e: OSError) -> DiskFull:
    return DiskFull(
        f"disk full while downloading {spec.label} ({spec.size} bytes) into {partial.parent}: {e.strerror}. "
        "The bytes fetched so far are kept; free some space and pull again to resume."
    )


def _retry_after(value: str | None, cap: float) -> float | None:
    if not value:
        return None
    try:
        return min(cap, max(0.0, float(value)))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
        return min(cap, max(0.0, when.timestamp() - time.time()))
    except (TypeError, ValueError):
        return None


@dataclasses.dataclass
class _Part:
    start: int
    end: int  # exclusive
    done: int = 0

    @property
    def length(self) -> int:
        return self.end - self.start


class _Closed(Exception):
    """The partial file was closed: a worker thread left behind by a cancel must not touch it any more."""


class _PartialFile:
    """The partial file and its part state; everything about resuming lives here. Thread-safe: parts are
    written from worker threads while the event loop checkpoints and may close the file."""

    def __init__(self, tmp_dir: Path, spec: FileSpec, part_size: int) -> None:
        self.spec = spec
        self.path = tmp_dir / f"{spec.key}.partial"
        self.state_path = tmp_dir / f"{spec.key}.parts.json"
        self._users = threading.Condition()  # guards `_in_use` and `_closing`
        self._in_use = 0  # I/O calls on the fd in progress
        self._closing = False
        self._checkpointing = threading.Lock()  # one checkpoint at a time: a later snapshot is never overwritten
        self._marking = threading.Lock()  # one mark at a time; a thread that finds it taken does not wait
        self.boot = _boot_id()  # None where it cannot be known: then only durable counts are ever recorded
        self.durable: list[int] = []  # per part, what the last checkpoint's fsync made durable
        loaded = self._load()
        self.parts = loaded or self._fresh(part_size)
        if not loaded or len(self.durable) != len(self.parts):  # a fresh file, or a state from before marks
            self.durable = [p.done for p in self.parts]
        self._front = 0  # parts before this one are complete: `done` only grows, so the cursor only moves on
        self.checkpointed = self.completed  # bytes the last checkpoint recorded (or is recording)
        self.marked = self.checkpointed  # bytes the last mark recorded
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if os.fstat(self.fd).st_size != spec.size:
                os.ftruncate(self.fd, spec.size)
                if spec.size:
                    try:
                        # Reserve the space now, so that a full disk fails at once rather than after gigabytes.
                        os.posix_fallocate(self.fd, 0, spec.size)
                    except OSError as e:
                        if _is_disk_full(e):
                            raise
                        # Filesystems without fallocate (EOPNOTSUPP) still work; they just fail later when full.
        except BaseException:
            os.close(self.fd)
            raise

    def _fresh(self, part_size: int) -> list[_Part]:
        size = self.spec.size
        parts = [_Part(s, min(s + part_size, size)) for s in range(0, size, part_size)]
        self.path.unlink(missing_ok=True)
        return parts

    def _load(self) -> list[_Part] | None:
        try:
            state = json.loads(self.state_path.read_text())
            if state.get("key") != self.spec.key or state.get("size") != self.spec.size or not self.path.exists():
                return None
            parts = [_Part(int(s), int(e), int(d)) for s, e, d in state["parts"]]
            durable = state.get("durable")
            if durable is not None:
                if len(durable) != len(parts):
                    return None
                self.durable = [min(int(done), part.done) for part, done in zip(parts, durable, strict=True)]
                if state.get("boot") is None or state.get("boot") != self.boot:
                    # another boot: the pages written after the last fsync may never have reached the disk
                    for part, done in zip(parts, self.durable, strict=True):
                        part.done = done
            if any(not 0 <= p.done <= p.length for p in parts):
                return None
            # The hasher follows the prefix through the parts in order: they must tile the file.
            tiled = [p.start for p in parts] == [0] + [p.end for p in parts[:-1]]
            if not tiled or (parts[-1].end if parts else 0) != self.spec.size:
                return None
            return parts
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @property
    def completed(self) -> int:
        return sum(p.done for p in self.parts)

    def frontier(self) -> int:
        """Where the contiguous prefix of written bytes ends: what the hasher may read. Called twice per MiB
        received: it resumes from the first incomplete part instead of walking every part again."""
        front = self._front
        while front < len(self.parts) and self.parts[front].done >= self.parts[front].length:
            front += 1
        self._front = front  # threads may race here; a stale value only means a longer walk next time
        return self.parts[front].start + self.parts[front].done if front < len(self.parts) else self.spec.size

    @contextlib.contextmanager
    def _fd(self) -> Iterator[int]:
        """The fd for one I/O call. close() waits for the calls in progress, so that no thread ever writes to a
        closed fd (or, worse, to another file that reused its number)."""
        with self._users:
            if self._closing:
                raise _Closed
            self._in_use += 1
        try:
            yield self.fd
        finally:
            with self._users:
                self._in_use -= 1
                self._users.notify_all()

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        with self._fd() as fd:
            view = memoryview(data)
            while view:
                written = os.pwrite(fd, view, offset)
                view, offset = view[written:], offset + written

    def read_into(self, offset: int, view: memoryview) -> None:
        with self._fd() as fd:
            while view:
                n = os.preadv(fd, [view], offset)
                if not n:
                    raise OSError(errno.EIO, f"{self.path} ends before byte {offset}")
                view, offset = view[n:], offset + n

    def checkpoint(self) -> None:
        """Make the bytes counted so far durable, then record them. Thread-safe; called from worker threads too."""
        with self._checkpointing:
            try:
                with self._fd() as fd:
                    snapshot = [p.done for p in self.parts]  # before the fsync: never claims more
                    self.checkpointed = sum(snapshot)
                    os.fdatasync(fd)
                    self.durable = snapshot
                    self._record(self.state_path.with_suffix(".tmp"), sync=True)
            except _Closed:
                return

    def mark(self, every_bytes: int) -> None:
        """Record the bytes written so far, without an fsync (they survive the process, not the machine), once
        `every_bytes` more are in. Thread-safe; never waits (another thread's mark in progress will do)."""
        if self.boot is None or self.completed - self.marked < every_bytes or not self._marking.acquire(blocking=False):
            return
        try:
            with self._fd():
                self.marked = self._record(self.state_path.with_suffix(".mark"), sync=False)
        except _Closed:
            return
        finally:
            self._marking.release()

    def _record(self, tmp: Path, sync: bool) -> int:
        """Write the state: the written counts (where the boot is known), and the durable ones. A mark and a
        checkpoint may replace each other's file in either order: each only ever understates what is on disk.
        Returns the written bytes it recorded."""
        written = [p.done for p in self.parts] if self.boot is not None else list(self.durable)
        with tmp.open("w") as f:
            json.dump({"key": self.spec.key, "size": self.spec.size, "url": self.spec.url, "boot": self.boot,
                       "parts": [[p.start, p.end, done] for p, done in zip(self.parts, written, strict=True)],
                       "durable": self.durable}, f)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, self.state_path)
        return sum(written)

    def close(self) -> None:
        with self._users:
            self._closing = True
            while self._in_use:
                self._users.wait()
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1

    def discard(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)
        self.state_path.unlink(missing_ok=True)


class _PrefixHasher:
    """The sha256 (and git blob sha1 where asked) of a partial file, computed while it downloads.

    Parts arrive out of order, so the hash follows the contiguous prefix written so far: whichever download
    thread extends it reads the new bytes back (from the page cache they were just written to) and hashes
    them. The digest is ready right after the last byte instead of after another pass over the whole file;
    a resumed download hashes the bytes it already had once, when the prefix reaches them."""

    CHUNK = 4 << 20

    def __init__(self, partial: _PartialFile, want_sha1: bool) -> None:
        self._partial = partial
        self._lock = threading.Lock()
        self._hashed = 0  # the file's first `_hashed` bytes are in the digests
        self._sha256 = hashlib.sha256()
        self._sha1 = hashlib.sha1(b"blob %d\0" % partial.spec.size) if want_sha1 else None
        self._buffer: memoryview | None = None  # allocated on first use: files waiting for a stream hold none

    def advance(self, wait: bool = False) -> None:
        """Hash what the prefix has gained. Without `wait`, leaves it to another thread that is at it already."""
        while self._lock.acquire(blocking=wait):
            try:
                self._hash_to(self._partial.frontier())
            finally:
                self._lock.release()
            # A writer may have extended the prefix while we held the lock, and found it taken: look again.
            if self._hashed >= self._partial.frontier():
                return

    def finish(self) -> tuple[str, str | None]:
        """The digests of the whole file, once every part is written: (sha256 hex, git blob sha1 hex or None)."""
        self.advance(wait=True)
        assert self._hashed == self._partial.spec.size, "finish() before every part was written"
        self._buffer = None
        return self._sha256.hexdigest(), self._sha1.hexdigest() if self._sha1 is not None else None

    def _hash_to(self, end: int) -> None:
        while self._hashed < end:
            if self._buffer is None:
                self._buffer = memoryview(bytearray(min(self.CHUNK, self._partial.spec.size)))
            view = self._buffer[: min(self.CHUNK, end - self._hashed)]
            self._partial.read_into(self._hashed, view)
            self._sha256.update(view)
            if self._sha1 is not None:
                self._sha1.update(view)
            self._hashed += len(view)


class _FileLock:
    """flock on tmp/<key>.lock: one downloader per file across processes; the kernel frees it if we die."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = -1

    async def acquire(self, poll: float = 0.2) -> None:
        while True:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                while True:
                    try:
                        fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        await asyncio.sleep(poll)
                # The holder before us removes the file when it is done; a lock on a removed file locks nothing.
                with contextlib.suppress(FileNotFoundError):
                    if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                        return
            except BaseException:
                os.close(self.fd)
                self.fd = -1
                raise
            os.close(self.fd)
            self.fd = -1

    def release(self, remove: bool = False) -> None:
        if self.fd >= 0:
            if remove:
                self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = -1


@dataclasses.dataclass
class _Flight:
    """A download in progress that several pulls may wait on."""

    task: asyncio.Task[str] | None = None
    completed: int = 0
    listeners: list[Progress] = dataclasses.field(default_factory=list)
    waiters: int = 0

    def report(self, completed: int, total: int) -> None:
        self.completed = completed
        for listener in list(self.listeners):
            listener(completed, total)


class Downloader:
    """Fetches files into one store. Make one per daemon and share it: it owns the HTTP connection pools, the
    limit on parallel requests and the registry of downloads in flight (keyed by sha256)."""

    def __init__(self, store: Store, options: TransferOptions | None = None,
                 client: httpx.AsyncClient | None = None) -> None:
        self.store = store
        self.options = options or TransferOptions()
        self._client = client
        self._own_client = client is None
        self._http = rangeget.Client(self.options.connect_timeout, self.options.stall_timeout)
        self._threads: concurrent.futures.ThreadPoolExecutor | None = None  # the direct path's workers
        # rangeget speaks to servers directly: with a proxy configured, or a client handed in (a mock transport,
        # custom TLS), every part goes through httpx instead; so does a file whose server rangeget cannot handle.
        self._direct = client is None and not _proxy_configured()
        self._via_httpx: set[str] = set()  # URLs
        self._streams: asyncio.Semaphore | None = None
        self._flights: dict[str, _Flight] = {}
        self._stopped: str | None = None  # why `stop` was called: every fetch fails with it from then on

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            o = self.options
            self._client = httpx.AsyncClient(
                follow_redirects=True,
                # The read timeout is the stall timeout: httpx applies it to each wait for more bytes.
                timeout=httpx.Timeout(connect=o.connect_timeout, read=o.stall_timeout, write=o.stall_timeout,
                                      pool=None),
                limits=httpx.Limits(max_connections=max(o.max_streams * 2, 8), max_keepalive_connections=o.max_streams),
                trust_env=True,
            )
        return self._client

    async def aclose(self) -> None:
        for flight in list(self._flights.values()):
            if flight.task is not None:
                flight.task.cancel()
        self._http.close()
        if self._threads is not None:
            self._threads.shutdown(wait=False)
            self._threads = None
        if self._client is not None and self._own_client:
            await self._client.aclose()
            self._client = None

    def stop(self, reason: str) -> None:
        """Fail every download in flight, and every later one, with TransferStopped(reason); what was fetched
        is checkpointed on the way out, so that a later pull resumes from it."""
        self._stopped = reason
        for flight in list(self._flights.values()):
            if flight.task is not None:
                flight.task.cancel()

    async def __aenter__(self) -> Downloader:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- public ----------------------------------------------------------------------------------------------
    async def fetch(self, spec: FileSpec, progress: Progress | None = None) -> str:
        """Download (or find) one file; returns its digest "sha256:<hex>" once it is in the store's blobs."""
        if (stopped := self._stopped) is not None:
            raise TransferStopped(stopped)
        if spec.sha256 and self.store.has_blob(f"sha256:{spec.sha256}"):
            if progress:
                progress(spec.size, spec.size)
            return f"sha256:{spec.sha256}"
        flight = self._flights.get(spec.key)
        if flight is None:
            flight = _Flight()
            flight.task = asyncio.create_task(self._download(spec, flight), name=f"download {spec.label}")
            self._flights[spec.key] = flight
            flight.task.add_done_callback(functools.partial(self._landed, spec.key, flight))
        task = flight.task
        assert task is not None
        if progress:
            flight.listeners.append(progress)
            progress(flight.completed, spec.size)
        flight.waiters += 1
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if self._stopped is not None and task.cancelled() and (current is None or not current.cancelling()):
                raise TransferStopped(self._stopped) from None  # stopped, not cancelled by our caller
            flight.waiters -= 1
            if flight.waiters == 0 and not task.done():
                # The last pull waiting on it gave up: stop downloading (what is on disk stays for a resume).
                task.cancel()
                if self._flights.get(spec.key) is flight:
                    del self._flights[spec.key]
            raise
        finally:
            if progress in flight.listeners:
                flight.listeners.remove(progress)

    def _landed(self, key: str, flight: _Flight, task: asyncio.Task[str]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        if not task.cancelled():
            task.exception()  # retrieved here, so an error nobody awaits is not logged as lost

    # -- one file --------------------------------------------------------------------------------------------
    async def _download(self, spec: FileSpec, flight: _Flight) -> str:
        tmp_dir = self.store.tmp_dir
        lock = _FileLock(tmp_dir / f"{spec.key}.lock")
        await lock.acquire()
        success = False
        try:
            for attempt in (1, 2):
                if spec.sha256 and self.store.has_blob(f"sha256:{spec.sha256}"):
                    # Another process finished it while we waited, or we were stopped between the rename into
                    # blobs/ and removing the state: either way only leftovers remain.
                    for leftover in (f"{spec.key}.partial", f"{spec.key}.parts.json"):
                        (tmp_dir / leftover).unlink(missing_ok=True)
                    flight.report(spec.size, spec.size)
                    success = True
                    return f"sha256:{spec.sha256}"
                try:
                    partial = _PartialFile(tmp_dir, spec, self.options.part_size)
                except OSError as e:
                    if _is_disk_full(e):
                        raise _disk_full(spec, tmp_dir / f"{spec.key}.partial", e) from None
                    raise
                try:
                    sha256, sha1 = await self._fill(spec, partial, flight)
                finally:
                    partial.close()
                problem = None
                if spec.sha256 and sha256 != spec.sha256:
                    problem = f"sha256 {sha256}, expected {spec.sha256}"
                elif not spec.sha256 and spec.git_sha1 and sha1 != spec.git_sha1:
                    problem = f"git blob sha1 {sha1}, expected {spec.git_sha1}"
                if problem is None:
                    await asyncio.to_thread(self.store.adopt_blob, partial.path, f"sha256:{sha256}")
                    partial.state_path.unlink(missing_ok=True)
                    success = True
                    return f"sha256:{sha256}"
                partial.discard()
                if attempt == 2:
                    raise ChecksumMismatch(
                        f"{spec.label} ({spec.url}) failed verification twice: the downloaded bytes have {problem}. "
                        "The hub or something between it and this machine is serving wrong data; try another "
                        "source (MGR_HF_ENDPOINT, MGR_HF_MIRROR_ENDPOINT, MGR_MODELSCOPE_ENDPOINT) or later."
                    )
                flight.report(0, spec.size)  # starting over
            raise AssertionError("unreachable")
        finally:
            lock.release(remove=success)

    async def _fill(self, spec: FileSpec, partial: _PartialFile, flight: _Flight) -> tuple[str, str | None]:
        """Fetch every missing byte of the partial file, checkpointing on the way and on any exit; returns its
        digests: sha256, and the git blob sha1 where the hub gave only that."""
        hasher = _PrefixHasher(partial, want_sha1=spec.git_sha1 is not None)
        due = asyncio.Event()  # set when `checkpoint_bytes` more are in
        ticker = asyncio.create_task(self._checkpoints(partial, due))
        try:
            await self._fetch_parts(spec, partial, hasher, flight, due)
            # In threads, side by side: the last fsync and the end of the hash, while other files' parts go on.
            _, digests = await asyncio.gather(asyncio.to_thread(_last_checkpoint, partial),
                                              asyncio.to_thread(hasher.finish))
            return digests
        except BaseException:
            _last_checkpoint(partial)  # synchronous: it must happen even while we are being cancelled
            raise
        finally:
            ticker.cancel()

    async def _checkpoints(self, partial: _PartialFile, due: asyncio.Event) -> None:
        """Checkpoint every `checkpoint_interval` seconds, or as soon as `due` says enough bytes came in."""
        lock_path = partial.path.with_suffix(".lock")
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(due.wait(), self.options.checkpoint_interval)
            due.clear()
            try:
                await asyncio.to_thread(partial.checkpoint)
                # The store's garbage collection removes tmp files untouched for an hour; keep the lock fresh.
                os.utime(lock_path)
            except OSError:
                return  # the data writes report a full disk themselves; the final checkpoint retries once

    async def _fetch_parts(self, spec: FileSpec, partial: _PartialFile, hasher: _PrefixHasher, flight: _Flight,
                           checkpoint_due: asyncio.Event) -> None:
        queue = [p for p in partial.parts if p.done < p.length]
        flight.report(partial.completed, spec.size)

        def advanced() -> None:
            completed = partial.completed
            flight.report(completed, spec.size)
            if completed - partial.checkpointed >= self.options.checkpoint_bytes:
                checkpoint_due.set()

        async def worker() -> None:
            while queue:
                await self._fetch_part(spec, partial, hasher, queue.pop(0), advanced)

        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(min(self.options.connections, len(queue))):
                    group.create_task(worker())
        except BaseExceptionGroup as group_error:
            # Report the first real failure, not the group; the others are usually the same cause.
            raise group_error.exceptions[0] from None

    async def _fetch_part(self, spec: FileSpec, partial: _PartialFile, hasher: _PrefixHasher, part: _Part,
                          advanced: Callable[[], None]) -> None:
        o = self.options
        if self._streams is None:
            self._streams = asyncio.Semaphore(o.max_streams)
        failures = 0
        async with self._streams:
            while part.done < part.length:
                before = part.done
                try:
                    await self._stream_part(spec, partial, hasher, part, advanced)
                    if part.done < part.length:
                        raise _Retry(f"the connection closed after {part.done - before} bytes")
                except (_Retry, httpx.TransportError, rangeget.TransportError) as e:
                    failures = 0 if part.done > before else failures + 1
                    if failures > o.retries:
                        raise TransferError(
                            f"giving up on {spec.label} after {o.retries} retries without progress: "
                            f"{type(e).__name__}: {e}. Pull again to resume from byte {partial.completed}."
                        ) from None
                    wait = e.wait if isinstance(e, _Retry) and e.wait is not None else None
                    if wait is None:
                        wait = min(o.max_backoff, o.backoff * 2 ** max(failures - 1, 0)) * random.uniform(0.5, 1.0)
                    await asyncio.sleep(wait)

    async def _stream_part(self, spec: FileSpec, partial: _PartialFile, hasher: _PrefixHasher, part: _Part,
                           advanced: Callable[[], None]) -> None:
        """One Range request for the rest of the part: directly where we can, else through httpx."""
        if self._direct and spec.url not in self._via_httpx:
            try:
                await self._stream_part_direct(spec, partial, hasher, part, advanced)
                return
            except rangeget.Unsupported:
                self._via_httpx.add(spec.url)
        await self._stream_part_httpx(spec, partial, part, advanced)

    # -- the direct path: each request in a worker thread ------------------------------------------------------
    async def _stream_part_direct(self, spec: FileSpec, partial: _PartialFile, hasher: _PrefixHasher,
                                  part: _Part, advanced: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()
        abort = rangeget.Abort()

        def notify() -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: this thread was left behind by a cancel
                loop.call_soon_threadsafe(advanced)

        if self._threads is None:
            # Reused threads: starting one blocks the event loop until the new thread runs (milliseconds on a
            # busy machine, per part). Twice the streams, so that threads a cancel left behind in a DNS lookup
            # (see _outlast) do not hold up the parts after them.
            self._threads = concurrent.futures.ThreadPoolExecutor(self.options.max_streams * 2, "mgr-transfer")
        future = loop.run_in_executor(self._threads, self._receive_part, spec, partial, hasher, part, abort, notify)
        try:
            await asyncio.wait([future])  # unlike `await future`, being cancelled here leaves the future be
        except asyncio.CancelledError:
            abort.abort()
            # The thread counts what it wrote before it stops; wait for it so that the final checkpoint has it.
            await _outlast(future, _ABORT_GRACE)
            raise
        future.result()

    def _receive_part(self, spec: FileSpec, partial: _PartialFile, hasher: _PrefixHasher, part: _Part,
                      abort: rangeget.Abort, advanced: Callable[[], None]) -> None:
        """Worker thread: GET the rest of the part into the partial file, hashing as the file's prefix grows."""
        offset = part.start + part.done
        headers = {**spec.headers, "Range": f"bytes={offset}-{part.end - 1}", "Accept-Encoding": "identity"}
        response = self._http.get(spec.url, headers, abort)
        try:
            skip = self._range_check(spec, offset, response.status, response.headers)
            if skip is None:
                raise _refused(spec, response.status, response.url, response.read(300))
            buffer = memoryview(bytearray(min(_WRITE_BUFFER, part.length)))
            while skip:  # the server ignored Range and sends the whole file: drop what we already have
                n = response.readinto(buffer[:skip])
                if not n:
                    return
                skip -= n
            while part.done < part.length:
                n = response.readinto(buffer[: part.length - part.done])
                if not n:
                    return  # the connection closed early: the caller tries again from here
                self._store(spec, partial, part, buffer[:n])
                advanced()
                partial.mark(self.options.mark_bytes)
                hasher.advance()
        finally:
            response.close()

    # -- through httpx, on the event loop --------------------------------------------------------------------
    async def _stream_part_httpx(self, spec: FileSpec, partial: _PartialFile, part: _Part,
                                 advanced: Callable[[], None]) -> None:
        offset = part.start + part.done
        headers = {**spec.headers, "Range": f"bytes={offset}-{part.end - 1}", "Accept-Encoding": "identity"}
        async with self.client.stream("GET", spec.url, headers=headers) as response:
            skip = self._range_check(spec, offset, response.status_code, response.headers)
            if skip is None:
                raise _refused(spec, response.status_code, response.url, await response.aread())
            buffer = bytearray()
            try:
                async for chunk in response.aiter_raw():
                    if skip:
                        dropped = min(skip, len(chunk))
                        chunk, skip = chunk[dropped:], skip - dropped
                    buffer += chunk[: part.length - part.done - len(buffer)]
                    if len(buffer) >= _WRITE_BUFFER or part.done + len(buffer) >= part.length:
                        self._store(spec, partial, part, buffer)
                        buffer = bytearray()
                        advanced()
                        partial.mark(self.options.mark_bytes)
                    if part.done >= part.length:
                        break
            finally:
                # Whatever arrived before a drop or a cancel is kept: it is on disk before it is counted.
                if buffer:
                    self._store(spec, partial, part, buffer)
                    advanced()

    # -- shared ----------------------------------------------------------------------------------------------
    def _range_check(self, spec: FileSpec, offset: int, status: int, headers: Mapping[str, str]) -> int | None:
        """How many leading body bytes to drop: 0 for the 206 asked for, `offset` for a 200 with the whole file.
        None for an error status not worth retrying. Raises _Retry, or TransferError when the file changed."""
        if status in _RETRY_STATUS:
            raise _Retry(f"HTTP {status}", _retry_after(headers.get("retry-after"), self.options.max_retry_after))
        if status == 206:
            match = _CONTENT_RANGE.match(headers.get("content-range", ""))
            if not match or int(match.group(1)) != offset:
                raise TransferError(f"{spec.label}: asked for bytes from {offset}, the server sent "
                                    f"{headers.get('content-range')!r}")
            if match.group(3) != "*" and int(match.group(3)) != spec.size:
                raise TransferError(f"{spec.label} is {match.group(3)} bytes on the server but {spec.size} in "
                                    "the listing: the repo changed during the pull; pull again")
            return 0
        if status == 200:
            length = headers.get("content-length")
            if length is not None and int(length) != spec.size:
                raise TransferError(f"{spec.label} is {length} bytes on the server but {spec.size} in the "
                                    "listing: the repo changed during the pull; pull again")
            return offset
        return None

    @staticmethod
    def _store(spec: FileSpec, partial: _PartialFile, part: _Part, data: bytes | bytearray | memoryview) -> None:
        """Write the bytes that follow the part's done ones, then count them: a counted byte is in the file
        (durable at the next checkpoint's fsync, which is what the state file records)."""
        try:
            partial.write(part.start + part.done, data)
        except OSError as e:
            if _is_disk_full(e):
                raise _disk_full(spec, partial.path, e) from None
            raise
        part.done += len(data)


def _boot_id() -> str | None:
    """This boot of the machine (Linux): pages written before a kill -9 are still there within it."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _last_checkpoint(partial: _PartialFile) -> None:
    try:
        partial.checkpoint()
    except OSError as e:
        if not _is_disk_full(e):  # a full disk is reported by the data writes, which it stopped
            raise


def _refused(spec: FileSpec, status: int, url: object, body: bytes) -> TransferError:
    hint = " (gated or private: give a token)" if status in (401, 403) else ""
    return TransferError(f"{spec.label}: HTTP {status} from {url}{hint}: {body[:300].decode(errors='replace')}")


def _proxy_configured() -> bool:
    """Whether httpx, which honours the environment (trust_env), could send a request through a proxy."""
    proxies = urllib.request.getproxies()
    return any(proxies.get(scheme) for scheme in ("http", "https", "all"))


async def _outlast(future: asyncio.Future[None], grace: float) -> None:
    """Wait, through further cancels, for an aborted worker thread to stop: at most `grace` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while not future.done() and (left := deadline - loop.time()) > 0:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait([future], timeout=left)
    # What it raises now (mostly the connection we shut down) is expected: retrieve it, so it is not logged as lost.
    future.add_done_callback(lambda f: f.cancelled() or f.exception())
