#!/usr/bin/env python3
"""STAND-IN RUNNER THAT STOPS ANSWERING, for the daemon's hung-runner detection. Not an engine: it loads no model.

It is tests/standin/runner.py (same flags, same answers), except for a chat request whose last message reads

    "hang before answering"  the request is read, then the whole process stops (SIGSTOP): nothing more is sent,
                             /health included, as with a runner stuck in its engine;
    "hang mid-answer"        the answer's head and first event are streamed, then the process stops the same way.

A stopped process still dies of SIGKILL, which is what the daemon sends a runner it takes as hung.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: runner.py is its neighbour

import runner

from mgr.daemon.protocol import shapes, sse

HANG_BEFORE = "hang before answering"
HANG_MID = "hang mid-answer"


def _stop_here() -> None:
    os.kill(os.getpid(), signal.SIGSTOP)


class HangingHandler(runner.Handler):
    def do_POST(self) -> None:
        if self.path != shapes.CHAT_PATH:
            super().do_POST()
            return
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}"
        body: dict[str, Any] = json.loads(raw)
        messages = body.get("messages") or [{}]
        last = messages[-1].get("content") if isinstance(messages[-1], dict) else None
        if last == HANG_BEFORE:
            _stop_here()
            return
        if last == HANG_MID:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self._write_chunk(sse.encode({"id": "chatcmpl-hung", "object": "chat.completion.chunk", "created": 0,
                                          "model": self.options.model_name, "choices": [{
                                              "index": 0, "delta": {"role": "assistant", "content": "Hello"},
                                              "finish_reason": None}]}))
            _stop_here()
            return
        self.rfile = _Replay(raw)  # type: ignore[assignment]  # the base handler reads the body itself
        super().do_POST()


class _Replay:
    """The body already read, handed to the base handler again."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self, size: int = -1) -> bytes:
        data, self.data = (self.data, b"") if size < 0 else (self.data[:size], self.data[size:])
        return data


def main(argv: list[str] | None = None) -> None:
    runner.Handler = HangingHandler  # type: ignore[misc]  # runner.main serves with `Handler`
    runner.main(argv)


if __name__ == "__main__":
    main()
