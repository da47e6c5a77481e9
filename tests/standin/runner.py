#!/usr/bin/env python3
"""STAND-IN RUNNER for tests: not an engine, it loads no model.

It speaks just enough of the runners' internal protocol (GET /health, POST /v1/chat/completions in OpenAI's
shape) for the scheduler's policy to be tested through its real code path (a real subprocess, real HTTP over
loopback) in milliseconds instead of the seconds a real engine takes to load.

    python tests/standin/runner.py --port N [--load-seconds F] [--fail-load] [--reply TEXT] [--token-delay F]

/health answers 503 while "loading" (the first --load-seconds), then 200. With --fail-load the process
instead prints "stand-in load failure" to stderr and exits with code 3 once --load-seconds have passed.
Stdlib and the runner protocol (mgr.daemon.protocol, a stdlib-only leaf) only, so that it starts fast.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from mgr.daemon.protocol import shapes, sse
from mgr.daemon.protocol.errors import openai_error_body

FAIL_EXIT_CODE = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="stand-in runner for the scheduler's tests (loads no model)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--load-seconds", type=float, default=0.0)
    parser.add_argument("--fail-load", action="store_true")
    parser.add_argument("--reply", default="Hello from the stand-in runner.")
    # reasoning sent before the reply, under vLLM 0.25's name for it ("reasoning"), as a reasoning parser does
    parser.add_argument("--reasoning", default="")
    parser.add_argument("--token-delay", type=float, default=0.0)
    parser.add_argument("--model-name", default="stand-in")
    parser.add_argument("--ctx-size", type=int, default=0, help="only reported back by /health")
    return parser.parse_args(argv)


def split_reply(text: str, parts: int = 4) -> list[str]:
    """A few chunks, as a streaming engine would send tokens; joined they give back `text` exactly."""
    words = text.split(" ")
    size = max(1, -(-len(words) // parts))
    pieces = [" ".join(words[i:i + size]) for i in range(0, len(words), size)]
    return [p if i == 0 else " " + p for i, p in enumerate(pieces)] or [""]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the daemon's pooled httpx client expects
    options: argparse.Namespace
    ready_at: float

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep the runner log to what the tests look for

    def _json(self, status: int, body: Mapping[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    listener_closed = False
    sleep_level = 0  # vLLM's sleep mode: 0 awake, 1 weights in host RAM, 2 weights dropped

    def _error(self, status: int, message: str) -> None:
        self._json(status, openai_error_body(message, status))

    def do_GET(self) -> None:
        if self.path == "/is_sleeping":
            self._json(200, {"is_sleeping": Handler.sleep_level > 0})
        elif self.path != shapes.HEALTH_PATH:
            self._error(404, f"no route {self.path}")
        elif time.monotonic() < self.ready_at:
            self._error(503, "Loading model")
        else:
            self._json(200, {"status": "ok", "n_ctx": self.options.ctx_size})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        if Handler.listener_closed:  # kept-alive connections end unanswered, as a dying server's do
            self.close_connection = True
            return
        if self.path == "/standin/close-listener":  # a dying server: its port refuses, its process lingers
            self._json(200, {})
            Handler.listener_closed = True
            threading.Thread(target=self.server.shutdown, daemon=True).start()
            return
        if self.path.startswith("/sleep"):  # as vLLM's dev endpoints: POST /sleep?level=N, POST /wake_up
            Handler.sleep_level = int(self.path.partition("level=")[2] or 1)
            self._json(200, {})
            return
        if self.path.startswith("/wake_up"):
            Handler.sleep_level = 0
            self._json(200, {})
            return
        if Handler.sleep_level and self.path == shapes.CHAT_PATH:
            self._error(503, "the model is sleeping")
            return
        if self.path != shapes.CHAT_PATH:
            self._error(404, f"no route {self.path}")
            return
        if time.monotonic() < self.ready_at:
            self._error(503, "Loading model")
            return
        pieces = split_reply(self.options.reply)
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:12]}"
        created = int(time.time())
        usage = {"prompt_tokens": len(body.get("messages", [])), "completion_tokens": len(pieces),
                 "total_tokens": len(body.get("messages", [])) + len(pieces)}
        if not body.get("stream"):
            self._json(200, {
                "id": completion_id, "object": "chat.completion", "created": created,
                "model": self.options.model_name,
                "choices": [{"index": 0, "message": {
                    "role": "assistant", "content": self.options.reply,
                    **({"reasoning": self.options.reasoning} if self.options.reasoning else {})},
                    "finish_reason": "stop"}],
                "usage": usage,
            })
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def chunk(choices: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> dict[str, Any]:
            return {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                    "model": self.options.model_name, "choices": choices, **(extra or {})}

        # vLLM 0.25's layout: every field its server set, None too (no tokenizer here: no token ids)
        events: list[bytes] = []
        if self.options.reasoning:
            events += [sse.encode(chunk([{"index": 0, "delta": {"reasoning": piece}, "logprobs": None,
                                          "finish_reason": None, "token_ids": None}]))
                       for piece in split_reply(self.options.reasoning)]
        for i, piece in enumerate(pieces):
            delta = {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
            end = {"finish_reason": "stop", "stop_reason": None} if i == len(pieces) - 1 else {"finish_reason": None}
            events.append(sse.encode(chunk([{"index": 0, "delta": delta, "logprobs": None, **end,
                                             "token_ids": None}])))
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append(sse.encode(chunk([], {"usage": usage})))
        events.append(sse.DONE)
        for i, event in enumerate(events):
            if i and self.options.token_delay:
                time.sleep(self.options.token_delay)
            self._write_chunk(event)
        self._write_chunk(b"")  # the end of the chunked body

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


def main(argv: list[str] | None = None) -> None:
    options = parse_args(argv)
    Handler.options = options
    Handler.ready_at = time.monotonic() + options.load_seconds
    server = ThreadingHTTPServer(("127.0.0.1", options.port), Handler)
    server.daemon_threads = True
    print(f"stand-in runner listening on 127.0.0.1:{options.port}", flush=True)
    if options.fail_load:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        time.sleep(options.load_seconds)
        print("stand-in load failure", file=sys.stderr, flush=True)
        sys.exit(FAIL_EXIT_CODE)
    server.serve_forever()
    if Handler.listener_closed:
        server.server_close()
        while True:  # the process lingers without a listener until it is killed
            time.sleep(3600)


if __name__ == "__main__":
    main()
