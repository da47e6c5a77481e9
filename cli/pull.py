"""`mgr pull REF`: ask the daemon to download a model and show its NDJSON progress stream.

The daemon sends Ollama's /api/pull events: status-only lines (`{"status": "pulling manifest"}`), per-file
progress (`{"status": "pulling <12 hex>", "digest": "sha256:...", "total": N, "completed": M}`, about every
60 ms per file, files interleaved when they download in parallel) and finally `{"status": "success"}`.

On a terminal each file gets a rich progress bar labelled with the file's name (rich is imported here, lazily:
every other command must start without paying for it), and a spinner turns while the daemon plans the pull.
Elsewhere (a pipe, a log) only changes are printed: a status once, and per file one line when it starts and one
when it is complete, so a 10 GB pull does not write thousands of lines. A failure is one line that says what
to do (an unreachable hub: which settings choose another); a pull cut off says how to resume it.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import time
from collections import deque
from collections.abc import Iterator, Mapping
from typing import Any, TextIO

from .client import APIError, Client, ConnectionLost
from .format import human_size, short_id
from .terminal import Spinner

RATE_WINDOW = 5.0  # seconds of samples behind a speed: long enough to be steady, short enough to follow changes
INTERRUPTED = "interrupted; run the same command again to resume"
CUT_OFF = "the pull stopped before it finished ({}); what was fetched is kept: run the same command again to resume"
_UNREACHABLE = re.compile(r"\((https?://[^)\s]+)\) is unreachable")


def pull_error(message: str) -> str:
    """The daemon's pull error as one line that says what to do. Hubs that cannot be reached (offline, a
    firewall) name the settings that choose others; any other error keeps its first line."""
    hosts = [re.sub(r"^https?://", "", url).rstrip("/") for url in _UNREACHABLE.findall(message)]
    if hosts:
        return (f"cannot reach {', '.join(dict.fromkeys(hosts))} from the daemon (offline, or a proxy needed?): "
                "set MGR_HF_ENDPOINT to a mirror or MGR_SOURCES to the hubs it can reach where `mgr serve` runs, "
                "or put a file there yourself: mgr create NAME --from FILE.gguf")
    first = message.strip().splitlines()[0] if message.strip() else "the pull failed"
    return first if len(first) <= 400 else first[:400] + "..."


def file_label(event: Mapping[str, Any]) -> str:
    """What a file's bar and lines are called: its name in the repo (the daemon sends it), else its digest's
    first 12 digits, as Ollama shows layers."""
    name = str(event.get("file") or "").rsplit("/", 1)[-1]
    return name or short_id(str(event.get("digest") or ""))


# -- pure parts: speed, ETA, the progress text, the plain renderer ------------------------------------------------


class RateMeter:
    """Bytes per second over the last RATE_WINDOW seconds of (time, completed) samples."""

    def __init__(self, window: float = RATE_WINDOW) -> None:
        self.window = window
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, now: float, completed: int) -> None:
        self._samples.append((now, completed))
        # Keep one sample older than the window, so that the span measured is always about `window` long.
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window:
            self._samples.popleft()

    def rate(self) -> float:
        if len(self._samples) < 2:
            return 0.0
        (t0, c0), (t1, c1) = self._samples[0], self._samples[-1]
        return max(c1 - c0, 0) / (t1 - t0) if t1 > t0 else 0.0


def format_eta(seconds: float | None) -> str:
    """A remaining time like Ollama's: "45s", "2m10s", "1h2m3s"; "" when unknown."""
    if seconds is None or seconds != seconds or seconds < 0 or seconds == float("inf"):
        return ""
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def progress_text(completed: int, total: int, rate: float) -> str:
    """What follows a file's bar: "420 MB/1.2 GB  35 MB/s  23s" (speed and ETA left out while unknown)."""
    parts = [f"{human_size(completed)}/{human_size(total)}"]
    if completed < total and rate > 0:
        parts.append(f"{human_size(rate)}/s")
        parts.append(format_eta((total - completed) / rate))
    return "  ".join(parts)


def is_file_event(event: Mapping[str, Any]) -> bool:
    """A per-file progress event (it names a digest), as opposed to a status-only line."""
    return bool(event.get("digest")) and isinstance(event.get("total"), int)


@dataclasses.dataclass
class FileState:
    total: int
    # Bytes already counted when the file first showed up: a resumed download, a blob already held (or, for a
    # fresh file, the first ~60 ms). Left out of the speed, which would otherwise be wildly high on a resume.
    first: int
    completed: int
    done: bool = False


@dataclasses.dataclass
class PullTally:
    """What the stream said so far: the files by digest, and whether it ended in success."""

    files: dict[str, FileState] = dataclasses.field(default_factory=dict)
    succeeded: bool = False

    def add(self, event: Mapping[str, Any]) -> tuple[FileState | None, bool, bool]:
        """Record one event. Returns (the file's state or None, whether the file is new, whether it just completed)."""
        if event.get("status") == "success":
            self.succeeded = True
        if not is_file_event(event):
            return None, False, False
        total, completed = int(event["total"]), int(event.get("completed") or 0)
        state = self.files.get(event["digest"])
        new = state is None
        if state is None:
            state = self.files[event["digest"]] = FileState(total, completed, completed)
        state.total, state.completed = total, max(state.completed, completed)
        finished = not state.done and state.completed >= state.total
        state.done = state.done or finished
        return state, new, finished

    @property
    def size(self) -> int:
        return sum(f.total for f in self.files.values())

    @property
    def transferred(self) -> int:
        """Bytes this run downloaded (resumed and already-held bytes excluded): what the speed is measured on."""
        return sum(max(f.completed - f.first, 0) for f in self.files.values())

    def all_done(self) -> bool:
        return all(f.done for f in self.files.values())


class PlainRenderer:
    """The lines to print for each event when stdout is not a terminal."""

    def __init__(self) -> None:
        self.tally = PullTally()
        self._last_status = ""

    def lines(self, event: Mapping[str, Any]) -> list[str]:
        state, new, finished = self.tally.add(event)
        if state is None:
            status = str(event.get("status") or "")
            if not status or status == self._last_status:
                return []
            self._last_status = status
            return [status]
        self._last_status = ""  # a status repeated after the files is news again
        name, size = file_label(event), human_size(state.total)
        out = []
        # No "resuming" note: the daemon's first event of a fresh file already counts ~60 ms of bytes, so a
        # resumed file cannot be told from a fast new one.
        if new:
            out.append(f"pulling {name}: {size}")
        if finished:
            out.append(f"pulled {name} ({size})")
        return out


def summary(name: str, tally: PullTally, seconds: float) -> str:
    """`pulled smollm2 (1.2 GB, 3 files) in 34.1s (35.2 MB/s)`; the speed counts only the bytes this run fetched."""
    files = len(tally.files)
    noun = "file" if files == 1 else "files"
    if files and not tally.transferred:  # every byte was already here: no speed to speak of
        return f"{name} is up to date ({human_size(tally.size)}, {files} {noun}, nothing to download)"
    speed = tally.transferred / seconds / 1e6 if seconds > 0 else 0.0
    return f"pulled {name} ({human_size(tally.size)}, {files} {noun}) in {seconds:.1f}s ({speed:.1f} MB/s)"


# -- the command ----------------------------------------------------------------------------------------------


def _plain(events: Iterator[dict[str, Any]], out: TextIO) -> PullTally:
    renderer = PlainRenderer()
    for event in events:
        for line in renderer.lines(event):
            print(line, file=out, flush=True)
    return renderer.tally


def _bars(events: Iterator[dict[str, Any]], out: TextIO) -> PullTally:
    """One rich bar per file; status lines print above the bars while files download, below once they are done."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskID, TextColumn
    from rich.table import Column

    console = Console(file=out)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        # Wide enough for "1.2 GB/15 GB  35 MB/s  1h2m3s": the bars keep their width as speed and ETA come and go.
        TextColumn("{task.fields[info]}", table_column=Column(min_width=32, no_wrap=True)),
        console=console,
        refresh_per_second=8,
    )
    tally = PullTally()
    tasks: dict[str, tuple[TaskID, RateMeter]] = {}
    last_status = ""
    try:
        for event in events:
            state, new, _ = tally.add(event)
            if state is None:
                status = str(event.get("status") or "")
                if status and status != last_status:
                    last_status = status
                    if progress.live.is_started and tally.all_done():
                        progress.stop()  # the bars stay on screen; what follows goes below them
                    (progress.console if progress.live.is_started else console).print(status, highlight=False)
                continue
            digest = str(event["digest"])
            if new:
                if not progress.live.is_started:
                    for task, _ in tasks.values():  # restarted after a stop: the old bars are already printed
                        progress.update(task, visible=False)
                    progress.start()
                task = progress.add_task(f"pulling {file_label(event)}", total=state.total, info="")
                tasks[digest] = (task, RateMeter())
            task, meter = tasks[digest]
            meter.add(time.monotonic(), state.completed)
            info = progress_text(state.completed, state.total, meter.rate())
            progress.update(task, completed=state.completed, total=state.total, info=info)
    finally:
        progress.stop()  # also on Ctrl+C and errors: the terminal gets its cursor back
    return tally


def pull_model(
    client: Client, reference: str, *, insecure: bool = False, tty: bool = False,
    out: TextIO | None = None, err: TextIO | None = None,
) -> int:
    """Run one pull through the daemon. Returns 0 on success, 130 on Ctrl+C; raises APIError for failures."""
    out, err = out or sys.stdout, err or sys.stderr  # looked up now, not at import: tests replace them
    started = time.monotonic()
    body: dict[str, Any] = {"model": reference, "stream": True}
    if insecure:
        body["insecure"] = True
    # The daemon answers once it has planned the pull (the hub listed, the files chosen): seconds, offline
    # longer. A terminal sees a spinner meanwhile, not a blank screen.
    waiting = Spinner(out).start() if tty else None
    if waiting is not None:
        out.write(f"pulling manifest for {reference} ")
        out.flush()
    try:
        try:
            stream = client.stream_ndjson("POST", "/api/pull", body)
            first = next(stream, None)
        finally:
            if waiting is not None:
                waiting.stop()
                out.write("\r\x1b[K")
                out.flush()
        events = _chain(first, stream)
        try:
            tally = _bars(events, out) if tty else _plain(events, out)
        finally:
            stream.close()
    except KeyboardInterrupt:
        # Closing the connection stops the daemon's pull; the bytes it fetched stay in its store, resumable.
        print(INTERRUPTED, file=err, flush=True)
        return 130
    except ConnectionLost as e:
        raise APIError(CUT_OFF.format(e.message)) from None
    except APIError as e:
        raise APIError(pull_error(e.message), e.status) from None
    if not tally.succeeded:
        raise APIError(CUT_OFF.format("the daemon ended the stream without its last line"))
    print(summary(reference, tally, time.monotonic() - started), file=out, flush=True)
    return 0


def _chain(first: dict[str, Any] | None, rest: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    if first is not None:
        yield first
    yield from rest
