"""Stored responses of the Responses API, for `previous_response_id`, GET and DELETE: one JSON file per
response in `<state_dir>/responses/`, so they survive a daemon restart.

Each file holds the Response and every input item the model saw for it (the conversation it continued,
flattened, then its own input), so a continuation reads one file and dropping an older response never breaks a
newer one. The folder is bounded: at most MAX_RESPONSES files and MAX_BYTES in all; past either, the oldest go
first. A file is named `<stamp>-<id>.json`, the stamp a nanosecond clock that only grows, so the order of writes
survives a restart (file times are too coarse: quick writes share one). Files are written to a temporary name
and renamed, so a crash never leaves a half-written response. Calls block (file I/O): the API runs them in a
worker thread; a lock keeps the index and the folder in step. The records are the API's
(api/responses_shapes.StoredResponse); this layer only keeps JSON objects by id."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mgr.registry.errors import MgrError

MAX_RESPONSES = 10_000
MAX_BYTES = 256 * 1024 * 1024
_ID = re.compile(r"resp_[A-Za-z0-9]{1,64}")
_FILE = re.compile(r"(\d{20})-(resp_[A-Za-z0-9]{1,64})\.json")


class ResponseNotFound(MgrError):
    status = 404


@dataclasses.dataclass(frozen=True, slots=True)
class _Entry:
    name: str  # the file's name in the folder
    size: int


class ResponseStore:
    def __init__(self, folder: Path, max_responses: int = MAX_RESPONSES, max_bytes: int = MAX_BYTES) -> None:
        self.folder = folder
        self.max_responses = max_responses
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] | None = None  # by id, oldest first; read on first use
        self._total = 0
        self._stamp = 0  # the last file's stamp

    def put(self, ident: str, record: Mapping[str, Any]) -> None:
        if _ID.fullmatch(ident) is None:
            raise ValueError(f"not a response id: {ident!r}")
        data = json.dumps(record, separators=(",", ":")).encode()
        with self._lock:
            entries = self._index()
            self._stamp = max(time.time_ns(), self._stamp + 1)
            entry = _Entry(f"{self._stamp:020d}-{ident}.json", len(data))
            self.folder.mkdir(parents=True, exist_ok=True)
            temporary = self.folder / f".{entry.name}.tmp"
            temporary.write_bytes(data)
            os.replace(temporary, self.folder / entry.name)
            if ident in entries:
                self._remove(ident)
            entries[ident] = entry
            self._total += entry.size
            # the newest one stays even if it alone is over the byte cap: its client is about to continue it
            while len(entries) > 1 and (len(entries) > self.max_responses or self._total > self.max_bytes):
                self._remove(next(iter(entries)))

    def get(self, ident: str, what: str = "Response") -> dict[str, Any]:
        """The stored response; ResponseNotFound (404) if it was never stored, was deleted or dropped.
        `what` names it in the message ("Previous response" for a continuation, as OpenAI words it)."""
        with self._lock:
            entry = self._index().get(ident)
            if entry is None:
                raise ResponseNotFound(f"{what} with id {ident!r} not found.")
            try:
                record: dict[str, Any] = json.loads((self.folder / entry.name).read_bytes())
            except (OSError, ValueError):
                raise ResponseNotFound(f"{what} with id {ident!r} not found: its stored file is unreadable.") \
                    from None
            return record

    def delete(self, ident: str) -> None:
        with self._lock:
            if ident not in self._index():
                raise ResponseNotFound(f"Response with id {ident!r} not found.")
            self._remove(ident)

    def ids(self) -> list[str]:
        """The stored ids, oldest first."""
        with self._lock:
            return list(self._index())

    def _remove(self, ident: str) -> None:
        entry = self._index().pop(ident)
        self._total -= entry.size
        (self.folder / entry.name).unlink(missing_ok=True)

    def _index(self) -> OrderedDict[str, _Entry]:
        """What is in the folder, oldest first, read once; the caller holds the lock."""
        if self._entries is None:
            found: list[tuple[str, str, int]] = []
            if self.folder.is_dir():
                for file in os.scandir(self.folder):
                    if file.name.endswith(".tmp"):  # a write a crash cut short
                        Path(file.path).unlink(missing_ok=True)
                    elif match := _FILE.fullmatch(file.name):
                        found.append((match[1], match[2], file.stat().st_size))
            found.sort()
            self._entries = OrderedDict((ident, _Entry(f"{stamp}-{ident}.json", size)) for stamp, ident, size in found)
            self._total = sum(entry.size for entry in self._entries.values())
            self._stamp = int(found[-1][0]) if found else 0
        return self._entries
