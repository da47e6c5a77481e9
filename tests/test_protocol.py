"""The runner protocol's pieces (daemon/protocol): SSE decoding as bytes arrive in any split, the one OpenAI
error builder, and that every layer (the daemon's OpenAI API, its relay, the llama.cpp runner) answers errors
in that one shape. The end-to-end shapes are exercised by test_e2e.py against the real runner."""

from __future__ import annotations

import json

import pytest

from mgr.daemon.protocol import sse
from mgr.daemon.protocol.errors import error_message, openai_error_body


def _events(stream: bytes, split: int) -> tuple[list[dict[str, object]], bool]:
    decoder = sse.SseDecoder()
    events = []
    for start in range(0, len(stream), split):
        events += decoder.feed(stream[start:start + split])
    return events, decoder.done


@pytest.mark.parametrize("split", [1, 2, 7, 64, 10_000])
def test_sse_decoder_gives_the_same_events_however_the_bytes_are_split(split: int) -> None:
    sent = [{"choices": [{"delta": {"content": f"piece {i} \u00e9\u6f22"}}]} for i in range(20)]
    stream = b"".join(sse.encode(e) for e in sent) + b": keep-alive comment\n\n" + sse.DONE
    events, done = _events(stream, split)
    assert events == sent
    assert done


def test_sse_decoder_ignores_events_after_done_and_waits_for_whole_lines() -> None:
    decoder = sse.SseDecoder()
    assert decoder.feed(b'data: {"a": ') == []  # half an event: nothing yet
    assert decoder.feed(b'1}\n\n') == [{"a": 1}]
    assert decoder.feed(sse.DONE + sse.encode({"late": True})) == []
    assert decoder.done


@pytest.mark.parametrize(("status", "kind"), [
    (400, "invalid_request_error"), (401, "authentication_error"), (403, "permission_error"),
    (404, "not_found_error"), (413, "invalid_request_error"), (503, "server_busy"), (500, "server_error"),
    (502, "server_error"),
])
def test_openai_error_body_has_one_shape(status: int, kind: str) -> None:
    body = openai_error_body("what went wrong", status)
    assert body == {"error": {"message": "what went wrong", "type": kind, "param": None, "code": status}}
    named = openai_error_body("no such model", 404, code="model_not_found", param="model")
    assert named["error"]["code"] == "model_not_found" and named["error"]["param"] == "model"


def test_error_message_reads_any_runner_error() -> None:
    assert error_message(json.dumps(openai_error_body("bad prompt", 400)).encode()) == "bad prompt"
    assert error_message(b'{"error": "plain"}') == "plain"  # llama-server's older shape
    assert error_message(b"Internal Server Error") == "Internal Server Error"
    assert error_message(b"") == "the model runner failed"
