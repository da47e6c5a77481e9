"""Hostile and careless request bodies, against a real daemon with the real llama.cpp runner on SmolLM2: each is
a 400 in the called API's shape (Ollama, OpenAI, Anthropic, Responses) before any work starts, never a 500 or a
hang, and the daemon and the model answer the next request. Non-standard JSON (NaN, Infinity, 1e400), nesting
100,000 deep, keep_alive extremes (and /api/ps and `mgr ps` afterwards), malformed tool calls, stream_options and
chat_template_kwargs of the wrong shape, out-of-range numbers, names ending in a newline, a GGUF whose metadata
nests arrays 5,000 deep, and a 500 whose body carries no internals."""

from __future__ import annotations

import json
import re
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from conftest import Daemon

pytestmark = pytest.mark.slow

ASK = [{"role": "user", "content": "Say hi."}]
# One generation body per API, small: each test below spoils one field of it.
APIS: dict[str, dict[str, Any]] = {
    "/api/chat": {"messages": ASK, "stream": False, "options": {"num_predict": 2}},
    "/v1/chat/completions": {"messages": ASK, "max_tokens": 2},
    "/v1/messages": {"messages": ASK, "max_tokens": 2},
    "/v1/responses": {"input": "Say hi.", "max_output_tokens": 2},
}


def error_text(path: str, response: httpx.Response) -> str:
    """The error's message, checked to be in the shape of the API at `path`."""
    body = response.json()
    if path.startswith("/v1/messages"):
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error", body
        return str(body["error"]["message"])
    if path.startswith("/v1/"):
        assert set(body["error"]) >= {"message", "type", "code"}, body
        assert body["error"]["type"] == "invalid_request_error" and body["error"]["code"] == 400, body
        return str(body["error"]["message"])
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    return body["error"]


def post_raw(daemon: Daemon, path: str, raw: bytes | str, timeout: float = 60) -> httpx.Response:
    return httpx.post(daemon.base_url + path, content=raw, headers={"content-type": "application/json"},
                      timeout=timeout)


def answers(daemon: Daemon, model: str) -> None:
    """The model still answers (the daemon and its runner survived)."""
    reply = httpx.post(daemon.base_url + "/api/chat", timeout=120, json={
        "model": model, "messages": ASK, "stream": False, "options": {"num_predict": 4, "temperature": 0}})
    assert reply.status_code == 200, reply.text
    assert reply.json()["done"] is True


@pytest.fixture(scope="module")
def spare(daemon: Daemon, smollm2: str) -> Iterator[str]:
    """A second name for the model that no test loads: a 400 answered for it shows that nothing was loaded."""
    created = httpx.post(daemon.base_url + "/api/copy", json={"source": smollm2, "destination": "spare"})
    assert created.status_code == 200, created.text
    yield "spare:latest"


def loaded(daemon: Daemon) -> list[str]:
    return [m["name"] for m in httpx.get(daemon.base_url + "/api/ps").json()["models"]]


# strict JSON ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", list(APIS))
@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"])
def test_non_standard_numbers_are_a_400_in_each_apis_shape(daemon: Daemon, spare: str, path: str,
                                                           number: str) -> None:
    raw = json.dumps({"model": spare, **APIS[path], "temperature": 12345}).replace("12345", number)
    response = post_raw(daemon, path, raw)
    assert response.status_code == 400, response.text
    message = error_text(path, response)
    assert "invalid JSON" in message and (number.lstrip("-") in message or "too large" in message), message
    assert spare not in loaded(daemon)  # refused before anything loaded


@pytest.mark.parametrize("path", list(APIS))
def test_nesting_100000_deep_is_a_fast_400(daemon: Daemon, smollm2: str, path: str) -> None:
    for raw in ('{"model": "smollm2", "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
                '{"model": "smollm2", "x": ' + '{"a": ' * 100_000 + "1" + "}" * 100_000 + "}"):
        started = time.monotonic()
        response = post_raw(daemon, path, raw)
        assert time.monotonic() - started < 2.0
        assert response.status_code == 400, response.text[:300]
        assert "nests deeper than 128 levels" in error_text(path, response)
    # a body as deep as the limit allows is read (and answered as what it is)
    fine = httpx.post(daemon.base_url + path, timeout=120, json={
        "model": smollm2, **APIS[path], "metadata_x": json.loads("[" * 120 + "]" * 120)})
    assert fine.status_code == 200, fine.text
    answers(daemon, smollm2)


# keep_alive ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("keep_alive", ["1e308", '"99999999999999h"', "-1", "1" + "0" * 400, '"-99999999999h"',
                                        "9223372036.9"])
def test_keep_alive_extremes_leave_ps_working(daemon: Daemon, smollm2: str, keep_alive: str) -> None:
    raw = '{"model": "smollm2", "prompt": "", "keep_alive": ' + keep_alive + "}"
    response = post_raw(daemon, "/api/generate", raw, timeout=120)
    assert response.status_code == 200, response.text
    ps = httpx.get(daemon.base_url + "/api/ps")
    assert ps.status_code == 200, ps.text
    (entry,) = [m for m in ps.json()["models"] if m["name"] == smollm2]
    expires = entry["expires_at"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", expires), expires
    assert 2200 < int(expires[:4]) < 2400  # forever, as Ollama shows it: about 292 years from now
    table = daemon.cli("ps")
    assert table.returncode == 0, table.stderr
    (row,) = [line for line in table.stdout.splitlines() if line.startswith(smollm2)]
    assert row.rstrip().endswith("Forever"), row
    # and an ordinary keep_alive puts it back to minutes
    assert httpx.post(daemon.base_url + "/api/generate", timeout=120,
                      json={"model": smollm2, "prompt": "", "keep_alive": "5m"}).status_code == 200
    table = daemon.cli("ps")
    assert "minutes from now" in table.stdout, table.stdout


@pytest.mark.parametrize("keep_alive", ["NaN", '"NaN"', '"1e308s"', '"5 minutes"', "true", "[1]", '{"m": 5}'])
def test_keep_alive_that_is_no_duration_is_a_400(daemon: Daemon, spare: str, keep_alive: str) -> None:
    for path in ("/api/generate", "/api/chat", "/api/embed", "/api/load"):
        raw = '{"model": "spare", "prompt": "", "input": "x", "keep_alive": ' + keep_alive + "}"
        response = post_raw(daemon, path, raw)
        assert response.status_code == 400, (path, response.text)
        assert "keep_alive" in error_text(path, response) or "invalid JSON" in error_text(path, response)
    assert spare not in loaded(daemon)
    assert httpx.get(daemon.base_url + "/api/ps").status_code == 200


# fields of the wrong shape ---------------------------------------------------------------------------------
WRONG_FIELDS: list[tuple[str, dict[str, Any], str]] = [
    ("/api/chat", {"messages": [{"role": "assistant", "content": "", "tool_calls": "abc"}]}, "tool_calls"),
    ("/api/chat", {"messages": [{"role": "assistant", "content": "", "tool_calls": ["abc"]}]}, "tool_calls[0]"),
    ("/api/chat", {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": 5}}]}]},
     "arguments"),
    ("/api/chat", {"messages": [{"role": "tool", "content": "x", "tool_name": ["f"]}]}, "tool_name"),
    ("/api/chat", {"messages": ASK, "truncate": "yes"}, "truncate"),
    ("/api/chat", {"messages": ASK, "options": {"repeat_last_n": 50_000_000_000}}, "repeat_last_n"),
    ("/api/chat", {"messages": ASK, "options": {"num_predict": 1e30}}, "num_predict"),
    ("/api/chat", {"messages": ASK, "options": {"num_ctx": 2**40}}, "num_ctx"),
    ("/api/chat", {"messages": ASK, "options": {"temperature": -1}}, "temperature"),
    ("/api/chat", {"messages": ASK, "tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
     "parameters"),
    ("/api/chat", {"messages": {"role": "user"}}, "messages"),
    ("/api/generate", {"prompt": ["hi"]}, "prompt"),
    ("/api/generate", {"prompt": "", "think": "very"}, "think"),
    ("/api/generate", {"prompt": "hi", "context": [1, 2**40]}, "context"),
    ("/api/embed", {"input": "x", "dimensions": 10**30}, "dimensions"),
    ("/api/embed", {"input": {"text": "x"}}, "input"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "", "tool_calls": "abc"}]},
     "tool_calls"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "tool_calls": [{"function": "f"}]}]},
     "tool_calls[0]"),
    ("/v1/chat/completions", {"messages": ASK, "stream": True, "stream_options": "x"}, "stream_options"),
    ("/v1/chat/completions", {"messages": ASK, "stream": True, "stream_options": {"include_usage": "y"}},
     "include_usage"),
    ("/v1/chat/completions", {"messages": ASK, "chat_template_kwargs": "x"}, "chat_template_kwargs"),
    ("/v1/chat/completions", {"messages": ASK, "chat_template_kwargs": [["enable_thinking", False]]},
     "chat_template_kwargs"),
    ("/v1/chat/completions", {"messages": ASK, "chat_template_kwargs": 7}, "chat_template_kwargs"),
    ("/v1/chat/completions", {"messages": ASK, "n": 10**20}, "n must be"),
    ("/v1/chat/completions", {"messages": ASK, "max_tokens": 10**20}, "max_tokens"),
    ("/v1/chat/completions", {"messages": ASK, "logprobs": True, "top_logprobs": 10**9}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": ASK, "logit_bias": {"x": 1}}, "logit_bias"),
    ("/v1/chat/completions", {"messages": ASK, "response_format": "json"}, "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "image_url"),
    ("/v1/chat/completions", {"messages": ASK, "seed": 2**70}, "seed"),
    ("/v1/completions", {"prompt": [1, -5]}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "logprobs": True}, "logprobs"),
    ("/v1/embeddings", {"input": [None]}, "input"),
    ("/v1/embeddings", {"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ("/v1/messages", {"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f",
                                                                       "input": "abc"}]}], "max_tokens": 2}, "input"),
    ("/v1/messages", {"messages": ASK, "max_tokens": 10**20}, "max_tokens"),
    ("/v1/messages", {"messages": ASK, "max_tokens": 2, "top_k": 2**40}, "top_k"),
    ("/v1/responses", {"input": "hi", "max_output_tokens": 10**20}, "max_output_tokens"),
    ("/v1/responses", {"input": "hi", "top_k": "many"}, "top_k"),
    ("/v1/responses", {"input": [{"type": "function_call", "call_id": "c", "name": ["f"]}]}, "name"),
]


@pytest.mark.parametrize(("path", "fields", "named"), WRONG_FIELDS,
                         ids=[f"{p}:{n}:{i}" for i, (p, _, n) in enumerate(WRONG_FIELDS)])
def test_a_field_of_the_wrong_shape_is_a_400_before_any_work(daemon: Daemon, spare: str, path: str,
                                                             fields: dict[str, Any], named: str) -> None:
    started = time.monotonic()
    response = httpx.post(daemon.base_url + path, json={"model": spare, **fields}, timeout=60)
    assert response.status_code == 400, response.text
    assert named.split("[")[0] in error_text(path, response), response.text
    assert time.monotonic() - started < 2.0
    assert spare not in loaded(daemon)  # nothing loaded, nothing generated


def test_the_model_answers_after_every_refusal(daemon: Daemon, smollm2: str) -> None:
    """The same malformed fields sent for a loaded model: still 400s (as the runners check them too), and the
    model goes on answering."""
    answers(daemon, smollm2)
    for path, fields, _ in WRONG_FIELDS:
        response = httpx.post(daemon.base_url + path, json={"model": smollm2, **fields}, timeout=60)
        assert response.status_code == 400, (path, fields, response.text)
    answers(daemon, smollm2)
    assert httpx.get(daemon.base_url + "/api/ps").status_code == 200


# names ---------------------------------------------------------------------------------------------------
NAMES = ["probe\n:latest", "probe:latest\n", "smollm2\n", "smollm2\r", " smollm2", "pro be", "probe\t:x"]
NAMED = [
    ("POST", "/api/create", lambda n: {"model": n, "from": "smollm2"}),
    ("POST", "/api/create", lambda n: {"model": "ok-name", "from": n}),
    ("POST", "/api/copy", lambda n: {"source": "smollm2", "destination": n}),
    ("POST", "/api/copy", lambda n: {"source": n, "destination": "ok-name"}),
    ("POST", "/api/show", lambda n: {"model": n}),
    ("DELETE", "/api/delete", lambda n: {"model": n}),
    ("POST", "/api/chat", lambda n: {"model": n, "messages": ASK}),
    ("POST", "/api/generate", lambda n: {"model": n, "prompt": "hi"}),
    ("POST", "/api/embed", lambda n: {"model": n, "input": "hi"}),
    ("POST", "/api/load", lambda n: {"model": n}),
    ("POST", "/api/unload", lambda n: {"model": n}),
    ("POST", "/api/pull", lambda n: {"model": n}),
    ("POST", "/v1/chat/completions", lambda n: {"model": n, "messages": ASK}),
    ("POST", "/v1/completions", lambda n: {"model": n, "prompt": "hi"}),
    ("POST", "/v1/embeddings", lambda n: {"model": n, "input": "hi"}),
    ("POST", "/v1/messages", lambda n: {"model": n, "messages": ASK, "max_tokens": 2}),
    ("POST", "/v1/responses", lambda n: {"model": n, "input": "hi"}),
]


@pytest.mark.parametrize("name", NAMES)
def test_a_name_with_whitespace_is_refused_everywhere(daemon: Daemon, smollm2: str, name: str) -> None:
    for method, path, body in NAMED:
        response = httpx.request(method, daemon.base_url + path, json=body(name), timeout=60)
        assert response.status_code == 400, (path, name, response.text)
        message = error_text(path, response)
        assert "invalid model name" in message or "invalid model reference" in message, (path, message)
    by_path = httpx.get(daemon.base_url + "/v1/models/" + quote(name, safe=":"))
    assert by_path.status_code in (400, 404), by_path.text  # Starlette's {model:path} never matches a newline
    listing = daemon.cli("list")
    assert listing.returncode == 0 and "ok-name" not in listing.stdout
    assert all(m["name"] == m["name"].strip() and "\n" not in m["name"]
               for m in httpx.get(daemon.base_url + "/api/tags").json()["models"])


def test_a_file_name_or_digest_the_store_refuses_is_a_400_on_every_create(daemon: Daemon, smollm2: str) -> None:
    digest = next(p.name for p in (Path(daemon.env["MGR_MODELS"]) / "blobs").iterdir()).replace("-", ":", 1)
    for body in ({"from": smollm2, "adapters": {"": ""}},
                 {"from": smollm2, "adapters": {"../a.gguf": digest}},
                 {"from": smollm2, "adapters": {"a.gguf": digest + "\n"}},
                 {"files": {"model.gguf\n": digest}},
                 {"files": {"model.gguf": digest + "\n"}},
                 {"files": {"model.gguf": digest.upper()}}):
        response = httpx.post(daemon.base_url + "/api/create", json={"model": "refused", "stream": False, **body})
        assert response.status_code == 400, (body, response.text)
        assert "invalid file name" in response.json()["error"] or "invalid digest" in response.json()["error"]
    assert httpx.head(daemon.base_url + f"/api/blobs/{quote(digest + chr(10))}").status_code == 400
    assert "refused" not in daemon.cli("list").stdout


# a GGUF whose metadata nests arrays 5,000 deep ----------------------------------------------------------------
def _gguf_string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def nested_array_gguf(depth: int) -> bytes:
    """A GGUF header with general.architecture and one key holding arrays nested `depth` deep (one uint32 at
    the bottom), and no tensors."""
    head = b"GGUF" + struct.pack("<IQQ", 3, 0, 2)
    arch = _gguf_string("general.architecture") + struct.pack("<I", 8) + _gguf_string("llama")
    deep = _gguf_string("general.deep") + struct.pack("<I", 9)
    deep += struct.pack("<IQ", 9, 1) * (depth - 1) + struct.pack("<IQ", 4, 1) + struct.pack("<I", 7)
    return head + arch + deep


def test_gguf_metadata_nesting_arrays_5000_deep_is_a_clear_400(daemon: Daemon, smollm2: str) -> None:
    import hashlib

    data = nested_array_gguf(5000)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert httpx.post(daemon.base_url + f"/api/blobs/{digest}", content=data).status_code == 201
    started = time.monotonic()
    created = httpx.post(daemon.base_url + "/api/create", json={"model": "deep", "files": {"deep.gguf": digest}})
    assert created.status_code == 400, created.text
    assert "nests arrays deeper than" in created.json()["error"]
    assert time.monotonic() - started < 5
    assert "deep" not in daemon.cli("list").stdout
    # the same file two levels deep (as llama.cpp writes some keys) is read
    shallow = nested_array_gguf(2)
    digest = "sha256:" + hashlib.sha256(shallow).hexdigest()
    assert httpx.post(daemon.base_url + f"/api/blobs/{digest}", content=shallow).status_code == 201
    created = httpx.post(daemon.base_url + "/api/create", json={"model": "shallow", "files": {"m.gguf": digest}})
    assert created.status_code == 200, created.text
    assert httpx.request("DELETE", daemon.base_url + "/api/delete", json={"model": "shallow"}).status_code == 200


# a 500 -------------------------------------------------------------------------------------------------------
def test_a_500_body_says_internal_error_and_an_id_only(daemon: Daemon, smollm2: str) -> None:
    """A failure mgr did not expect (here: a manifest corrupted on disk) answers 500 with "internal error" and
    a short id, in each API's shape; the id, the exception and its traceback are in the daemon's log."""
    models = Path(daemon.env["MGR_MODELS"])
    assert httpx.post(daemon.base_url + "/api/copy", json={"source": smollm2, "destination": "broken"}).status_code \
        == 200
    (manifest,) = [p for p in (models / "manifests").iterdir() if p.name.startswith("broken")]
    manifest.write_text('{"name": "broken:latest", "format": "gguf", "files": "/secret/path/in/the/store"}')
    try:
        for path, body in (("/api/show", {"model": "broken"}),
                           ("/v1/chat/completions", {"model": "broken", "messages": ASK}),
                           ("/v1/messages", {"model": "broken", "messages": ASK, "max_tokens": 2})):
            response = httpx.post(daemon.base_url + path, json=body, timeout=60)
            assert response.status_code == 500, response.text
            text = response.text
            assert "secret" not in text and "Traceback" not in text and "Error" not in text.replace("error", "")
            found = re.search(r"internal error \(id ([0-9a-f]{8})", text)
            assert found, text
            log = daemon.log_path.read_text()
            assert f"internal error {found.group(1)}" in log
            assert "Traceback" in log.split(f"internal error {found.group(1)}", 1)[1]
    finally:
        manifest.unlink()
    answers(daemon, smollm2)
