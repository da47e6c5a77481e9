"""Fuzzing every endpoint the daemon describes in /openapi.json (the Ollama, OpenAI, Anthropic and Responses APIs,
and the model, blob and status endpoints) with schemathesis, against a real daemon and the real llama.cpp runner
on SmolLM2: bodies that follow the schema (positive) and bodies that break it (negative), each sent with a
per-request timeout. No answer may be a 500 or say "internal error" (a pull may be a 502: its hub is down on
purpose), none may hang, an error is in the called API's shape, a 200 is what it says it is (JSON, NDJSON or SSE
lines that parse), and at the end the daemon is up, `mgr ps` works and the model answers.

Schemathesis (4.x) makes the examples: its hypothesis strategies per operation, driven here by hypothesis's
`given` with a fixed seed and max_examples per operation (half following the schema, half breaking it), so the
run is the same every time and takes ~2-3 minutes on 2 cores. The schema it reads is the daemon's own, with
changes for time, not for leniency: the model fields name the real models (a negative example names anything),
create, copy, delete and unload name only models called fuzz*, keep_alive never unloads, and in what is sent
the generation sizes are clamped (at most 8 new tokens, n at most 2, the model's own context), as a model
reload or a 2,048-token answer costs seconds. The model's own num_predict is 8, for a request that sets none.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from conftest import Daemon
from fakehub import dead_endpoint
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

pytestmark = pytest.mark.slow

REQUEST_TIMEOUT = 60.0  # a generation of 8 tokens takes well under a second; a load a few
MODEL_NAMES = ["smollm2", "smollm2:latest", "spare"]
# (method, path) -> examples per generation mode: the generation endpoints cost a model call each
# The run is the same every time (a fixed seed); MGR_FUZZ_SEED and MGR_FUZZ_SCALE (a multiplier of the examples)
# explore further by hand.
SEED = int(os.environ.get("MGR_FUZZ_SEED", "13"))
SCALE = float(os.environ.get("MGR_FUZZ_SCALE", "1"))
CHEAP = 50
GENERATING = 60
SLOW = {"/api/pull": 8}  # a pull tries each (unreachable) hub in turn
SIZE_KEYS = {"max_tokens": 8, "max_completion_tokens": 8, "num_predict": 8, "max_output_tokens": 8,
             "budget_tokens": 1100, "n": 2, "best_of": 2}


@pytest.fixture(scope="module")
def fuzzed(gguf_path: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A daemon whose hubs are unreachable (a fuzzed pull fails fast), with SmolLM2 as smollm2 and spare."""
    dead = dead_endpoint()
    d = Daemon(tmp_path_factory.mktemp("fuzz"), extra_env={
        "MGR_HF_ENDPOINT": dead, "MGR_HF_MIRROR_ENDPOINT": dead, "MGR_MODELSCOPE_ENDPOINT": dead})
    d.start()
    created = d.cli("create", "smollm2", "--from", str(gguf_path))
    assert created.returncode == 0, created.stderr
    # what a request that names no length gets (a negative example may leave the length out): 8 tokens
    short = httpx.post(d.base_url + "/api/create", json={"model": "smollm2", "from": "smollm2", "stream": False,
                                                         "parameters": {"num_predict": 8}})
    assert short.status_code == 200, short.text
    assert httpx.post(d.base_url + "/api/copy", json={"source": "smollm2", "destination": "spare"}).status_code == 200
    yield d
    d.stop()


def fuzz_schema(raw: dict[str, Any]) -> dict[str, Any]:
    """The daemon's /openapi.json as the fuzzer reads it: model fields name the real models (or any string);
    create, copy and delete name only models called fuzz*."""
    schema = copy.deepcopy(raw)
    real = {"enum": MODEL_NAMES}  # negative examples break it: any other name
    fuzz_only = {"type": "string", "pattern": "^fuzz[a-z0-9]{0,8}$"}
    for component in schema["components"]["schemas"].values():
        properties = component.get("properties", {})
        for key in ("model", "source", "from"):
            if properties.get(key) == {"type": "string"}:
                properties[key] = real
        if "images" in properties:  # SmolLM2 sees none: an image is a 400 (which negative examples still get)
            properties["images"] = {"type": "array", "maxItems": 0}
    for name in ("OllamaCreateRequest", "OllamaCopyRequest"):
        properties = schema["components"]["schemas"][name]["properties"]
        for key in ("model", "name", "destination"):
            if key in properties:
                properties[key] = fuzz_only
    for method, path in (("delete", "/api/delete"), ("post", "/api/unload")):  # unloading costs a reload
        body = schema["paths"][path][method]["requestBody"]["content"]["application/json"]
        body["schema"] = {"type": "object", "properties": {"model": fuzz_only, "name": fuzz_only}}
    for component in schema["components"]["schemas"].values():
        if "keep_alive" in component.get("properties", {}):  # one that unloads costs a reload too
            component["properties"]["keep_alive"] = {"enum": ["5m", "1h", -1, 600]}
    return schema


def clamped(value: Any) -> Any:
    """The body with its generation sizes clamped where they are numbers (other types stay, for the 400s):
    the answer's length, the number of choices, the context (left to the model's), and keep_alive."""
    if isinstance(value, list):
        return [clamped(item) for item in value]
    if not isinstance(value, dict):
        return value
    out = {}
    for key, item in value.items():
        number = isinstance(item, (int, float)) and not isinstance(item, bool)
        if key in SIZE_KEYS and number and not 1 <= item <= SIZE_KEYS[key]:
            item = SIZE_KEYS[key] if key != "budget_tokens" else 1024
        elif key == "num_ctx" and number:
            continue  # another context size is another load of the model
        elif key == "keep_alive" and number and item >= 0:
            item = 300
        out[key] = clamped(item)
    return out


def send(base_url: str, case: Any) -> httpx.Response:
    kwargs: dict[str, Any] = {"params": case.query or None, "headers": case.headers or None}
    body = case.body
    if isinstance(body, (bytes, bytearray)):
        kwargs["content"] = bytes(body)
    elif body is not None and not isinstance(body, schemathesis.core.NotSet):
        kwargs["json"] = clamped(body)
    return httpx.request(case.method, base_url + case.formatted_path, timeout=REQUEST_TIMEOUT, **kwargs)


def check(path: str, response: httpx.Response, sent: str) -> None:
    status, text = response.status_code, response.text
    assert status != 500 and "internal error" not in text, f"{sent}\n-> {status} {text[:2000]}"
    assert status < 500 or (path == "/api/pull" and status == 502), f"{sent}\n-> {status} {text[:2000]}"
    kind = response.headers.get("content-type", "")
    if response.request.method == "HEAD":
        return
    if status >= 400:
        body = response.json()
        if path.startswith("/v1/messages"):
            assert body["type"] == "error" and body["error"]["message"], sent
        elif path.startswith("/v1/"):
            code = body["error"]["code"]
            assert body["error"]["message"] and (code == status or isinstance(code, str)), sent
        else:
            assert isinstance(body["error"], str) and body["error"], sent
    elif "application/json" in kind and text:
        json.loads(text)
    elif "ndjson" in kind:
        lines = [json.loads(line) for line in text.splitlines() if line]
        assert lines and (lines[-1].get("done") or lines[-1].get("status") or lines[-1].get("error")), sent
    elif "event-stream" in kind:
        for line in text.splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                json.loads(line[6:])


def operations() -> list[tuple[str, str]]:
    from mgr.daemon.api.openapi import OPERATIONS

    return sorted(OPERATIONS)


GENERATION = {"/api/chat", "/api/generate", "/api/embed", "/api/embeddings", "/api/load", "/v1/chat/completions",
              "/v1/completions", "/v1/embeddings", "/v1/messages", "/v1/messages/count_tokens", "/v1/responses"}


@pytest.fixture(scope="module")
def schema(fuzzed: Daemon) -> Any:
    described = httpx.get(fuzzed.base_url + "/openapi.json").json()
    return schemathesis.openapi.from_dict(fuzz_schema(described))


@pytest.mark.parametrize(("method", "path"), operations(), ids=[f"{m} {p}" for m, p in operations()])
def test_no_request_breaks_the_daemon(fuzzed: Daemon, schema: Any, method: str, path: str) -> None:
    operation = schema[path][method]
    examples = int(SCALE * (SLOW.get(path) or (GENERATING if path in GENERATION else CHEAP)))
    strategy = st.one_of(operation.as_strategy(GenerationMode.POSITIVE),
                         operation.as_strategy(GenerationMode.NEGATIVE))

    @settings(max_examples=2 * examples, deadline=None, database=None, phases=(Phase.explicit, Phase.generate),
              suppress_health_check=list(HealthCheck), print_blob=True)
    @seed(SEED)
    @given(strategy)
    def fuzz(case: Any) -> None:
        sent = f"{case.method} {case.formatted_path} query={case.query} body={_short(case.body)}"
        try:
            response = send(fuzzed.base_url, case)
        except httpx.TimeoutException:
            pytest.fail(f"no answer within {REQUEST_TIMEOUT:.0f}s: {sent}")
        check(path, response, sent)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    statuses: dict[int, int] = {}
    fuzz()
    assert fuzzed.process is not None and fuzzed.process.poll() is None, "the daemon exited"
    if path in GENERATION:  # the fuzzer reached the model, not only the checks in front of it
        assert statuses.get(200), f"no example was answered: {dict(sorted(statuses.items()))}"


def _short(body: Any) -> str:
    if isinstance(body, schemathesis.core.NotSet):
        return "(none)"
    try:
        text = json.dumps(clamped(body)) if not isinstance(body, (bytes, bytearray)) else repr(bytes(body)[:100])
    except (TypeError, ValueError):
        text = repr(body)
    return text[:1500]


def test_the_daemon_is_up_and_the_model_answers_after_the_fuzzing(fuzzed: Daemon) -> None:
    assert fuzzed.process is not None and fuzzed.process.poll() is None
    assert httpx.get(fuzzed.base_url + "/api/version").status_code == 200
    table = fuzzed.cli("ps")
    assert table.returncode == 0, table.stderr
    answer = httpx.post(fuzzed.base_url + "/api/chat", timeout=120, json={
        "model": "smollm2", "messages": [{"role": "user", "content": "Say hi."}], "stream": False,
        "options": {"num_predict": 4, "temperature": 0}})
    assert answer.status_code == 200 and answer.json()["done"] is True, answer.text
    assert "internal error" not in fuzzed.log_path.read_text()
