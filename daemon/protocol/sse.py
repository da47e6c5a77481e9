"""Server-sent events as the runner protocol uses them: `data: <json>\\n\\n` per event, `data: [DONE]` last."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

DONE = b"data: [DONE]\n\n"


def encode(event: Mapping[str, Any]) -> bytes:
    """One event carrying a JSON object."""
    return b"data: " + json.dumps(event).encode() + b"\n\n"


class SseDecoder:
    """Incremental decoder: feed it the bytes as they arrive, get the JSON objects of complete events.
    `done` turns true at `data: [DONE]`; lines that are not `data:` (comments, keep-alives) are skipped."""

    def __init__(self) -> None:
        self._pending = b""
        self.done = False

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        lines = (self._pending + data).split(b"\n")
        self._pending = lines.pop()  # an incomplete last line waits for the rest
        events: list[dict[str, Any]] = []
        for line in lines:
            if self.done or not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self.done = True
                continue
            events.append(json.loads(payload))
        return events
