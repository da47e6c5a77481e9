"""Unknown routes and methods answer JSON in the called API's shape (Ollama's under /api and elsewhere, OpenAI's
under /v1, Anthropic's under /v1/messages), and /openapi.json describes every route the daemon serves: valid
OpenAPI 3 (openapi-spec-validator), and what the daemon really answers matches the schemas it publishes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from conftest import Daemon
from openapi_spec_validator import validate

from mgr.daemon.api.openapi import served
from mgr.daemon.app import create_app
from mgr.registry.config import Settings

pytestmark = pytest.mark.slow


def ollama_error(answer: httpx.Response) -> str:
    assert answer.headers["content-type"].startswith("application/json"), answer.text
    body = answer.json()
    assert set(body) == {"error"} and isinstance(body["error"], str)
    return str(body["error"])


def openai_error(answer: httpx.Response) -> dict[str, Any]:
    assert answer.headers["content-type"].startswith("application/json"), answer.text
    error = answer.json()["error"]
    assert isinstance(error, dict) and set(error) >= {"message", "type", "param", "code"}
    return error


@pytest.mark.parametrize(("method", "path"), [("GET", "/api/nothing"), ("POST", "/api/chat/more"),
                                              ("GET", "/nothing"), ("DELETE", "/favicon.ico")])
def test_an_unknown_path_is_a_json_404_in_ollamas_shape(daemon: Daemon, method: str, path: str) -> None:
    answer = httpx.request(method, daemon.base_url + path)
    assert answer.status_code == 404
    assert path in ollama_error(answer)


@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/nothing"), ("POST", "/v1/chat"),
                                              ("DELETE", "/v1/nothing/else")])
def test_an_unknown_path_under_v1_is_a_json_404_in_openais_shape(daemon: Daemon, method: str, path: str) -> None:
    answer = httpx.request(method, daemon.base_url + path)
    assert answer.status_code == 404, answer.text
    assert openai_error(answer)["type"] == "not_found_error"


def test_the_openai_client_reads_a_404(daemon: Daemon) -> None:
    client = openai.OpenAI(base_url=daemon.base_url + "/v1", api_key="x")
    with pytest.raises(openai.NotFoundError) as missing:
        client.get("/nothing", cast_to=object)
    assert "no such endpoint: GET /v1/nothing" in missing.value.body["message"]  # type: ignore[index]


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("GET", "/api/chat", "POST"), ("POST", "/api/tags", "GET, HEAD"), ("PUT", "/", "GET, HEAD"),
    ("GET", "/api/delete", "DELETE"),
])
def test_a_wrong_method_is_a_json_405_in_ollamas_shape(daemon: Daemon, method: str, path: str, allowed: str) -> None:
    answer = httpx.request(method, daemon.base_url + path)
    assert answer.status_code == 405
    assert set(answer.headers["allow"].split(", ")) == set(allowed.split(", "))
    assert f"{method} is not allowed on {path}" in ollama_error(answer)


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("GET", "/v1/chat/completions", "POST"), ("DELETE", "/v1/completions", "POST"), ("PUT", "/v1/embeddings", "POST"),
    ("POST", "/v1/models", "GET, HEAD"),
])
def test_a_wrong_method_under_v1_is_a_json_405_in_openais_shape(daemon: Daemon, method: str, path: str,
                                                                allowed: str) -> None:
    answer = httpx.request(method, daemon.base_url + path)
    assert answer.status_code == 405
    assert set(answer.headers["allow"].split(", ")) == set(allowed.split(", "))
    assert f"{method} is not allowed on {path}" in openai_error(answer)["message"]


def test_a_wrong_method_on_anthropics_path_is_in_anthropics_shape(daemon: Daemon) -> None:
    answer = httpx.get(daemon.base_url + "/v1/messages")
    assert answer.status_code == 405
    body = answer.json()
    assert body["type"] == "error" and "not allowed" in body["error"]["message"]


# /openapi.json ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def spec(daemon: Daemon) -> dict[str, Any]:
    answer = httpx.get(daemon.base_url + "/openapi.json")
    assert answer.status_code == 200
    return answer.json()  # type: ignore[no-any-return]


def test_openapi_json_is_valid_openapi_3(spec: dict[str, Any]) -> None:
    validate(spec)  # the OpenAPI 3.1 schema, and every $ref resolves
    assert spec["openapi"].startswith("3.")


def test_openapi_json_lists_every_route_and_method(spec: dict[str, Any], tmp_path: Path) -> None:
    app = create_app(Settings(models_dir=tmp_path / "models", state_dir=tmp_path / "state"))
    routes = served(app.router.routes, app.relay_routes)
    assert len(routes) > 20
    for path, methods in routes:
        described = spec["paths"][path.replace("{model:path}", "{model}")]
        assert {m.lower() for m in methods} <= set(described), path
    ids = [op["operationId"] for entry in spec["paths"].values() for op in entry.values()]
    assert len(ids) == len(set(ids))


def test_the_generation_endpoints_have_their_types(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    generate = spec["paths"]["/api/generate"]["post"]
    assert generate["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/OllamaGenerateRequest")
    assert {"suffix", "context", "template", "raw", "system", "options"} <= set(schemas["OllamaGenerateRequest"]
                                                                               ["properties"])
    assert schemas["OllamaGenerateRequest"]["required"] == ["model"]
    assert "context" in schemas["OllamaGenerateChunk"]["properties"]
    assert "application/x-ndjson" in generate["responses"]["200"]["content"]
    chat = spec["paths"]["/v1/chat/completions"]["post"]
    assert "text/event-stream" in chat["responses"]["200"]["content"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["allOf"][1]["required"] == ["model", "messages"]
    assert "context_length" in schemas["OllamaPsModel"]["required"]


def schema_of(spec: dict[str, Any], path: str, method: str, content: str = "application/json") -> dict[str, Any]:
    schema = spec["paths"][path][method]["responses"]["200"]["content"][content]["schema"]
    return {**schema, "components": spec["components"]}


def check(spec: dict[str, Any], path: str, method: str, answer: Any) -> None:
    jsonschema.Draft202012Validator(schema_of(spec, path, method)).validate(answer)


def test_what_the_daemon_answers_matches_its_schemas(daemon: Daemon, smollm2: str, spec: dict[str, Any]) -> None:
    base = daemon.base_url
    httpx.post(base + "/api/generate", json={"model": "smollm2", "prompt": "", "stream": False}, timeout=120)
    for path in ("/api/version", "/api/tags", "/api/ps", "/api/queue", "/v1/models"):
        check(spec, path, "get", httpx.get(base + path).json())
    check(spec, "/api/show", "post", httpx.post(base + "/api/show", json={"model": "smollm2"}).json())
    options = {"num_predict": 4, "temperature": 0}
    check(spec, "/api/generate", "post", httpx.post(base + "/api/generate", timeout=60, json={
        "model": "smollm2", "prompt": "Hi", "stream": False, "options": options}).json())
    check(spec, "/api/chat", "post", httpx.post(base + "/api/chat", timeout=60, json={
        "model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "stream": False,
        "options": options}).json())
    check(spec, "/api/embed", "post", httpx.post(base + "/api/embed", timeout=60, json={
        "model": "smollm2", "input": "Hi"}).json())
    check(spec, "/v1/chat/completions", "post", httpx.post(base + "/v1/chat/completions", timeout=60, json={
        "model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}).json())
    check(spec, "/v1/completions", "post", httpx.post(base + "/v1/completions", timeout=60, json={
        "model": "smollm2", "prompt": "Hi", "max_tokens": 4}).json())
    check(spec, "/v1/embeddings", "post", httpx.post(base + "/v1/embeddings", timeout=60, json={
        "model": "smollm2", "input": "Hi"}).json())
    chunk = {**schema_of(spec, "/api/generate", "post", "application/x-ndjson")}
    for line in httpx.post(base + "/api/generate", timeout=60, json={
            "model": "smollm2", "prompt": "Hi", "options": options}).text.splitlines():
        jsonschema.Draft202012Validator(chunk).validate(json.loads(line))
    error = {"$ref": "#/components/schemas/OllamaErrorAnswer", "components": spec["components"]}
    jsonschema.Draft202012Validator(error).validate(httpx.get(base + "/api/nothing").json())
