"""Keys, Host and Origin guards (daemon/guards.py) against a real `mgr serve` with keys set, the real SmolLM2
runner and the real client libraries: who may call, from which page, and what a runner port lets through."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import ollama
import openai
import psutil
import pytest
from conftest import Daemon, wait_for
from test_vllm_runner import daemon_url, runner_process  # noqa: F401  (the fixture: a daemon with stand-in vLLM)

KEY, OTHER_KEY = "sk-mgr-test-key-one", "sk-mgr-test-key-two"
FILE_KEY = "sk-mgr-from-the-keys-file"
CONFIGURED_ORIGIN = "https://chat.example.org"
FOREIGN_ORIGIN = "https://evil.example.com"
AUTH = {"Authorization": f"Bearer {KEY}"}
HI = [{"role": "user", "content": "Say hi."}]


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("guarded")
    d = Daemon(root, extra_env={"MGR_API_KEYS": f"{KEY}, {OTHER_KEY}", "MGR_ORIGINS": CONFIGURED_ORIGIN,
                                "MGR_API_KEY": ""})
    d.start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def model(guarded: Daemon, gguf_path: Path) -> str:
    created = cli(guarded, KEY, "create", "smollm2", "--from", str(gguf_path))
    assert created.returncode == 0, created.stderr
    return "smollm2"


def cli(daemon: Daemon, key: str | None, *args: str) -> Any:
    env = dict(daemon.env)
    env.pop("MGR_API_KEY", None)
    if key is not None:
        env["MGR_API_KEY"] = key
    saved, daemon.env = daemon.env, env
    try:
        return daemon.cli(*args)
    finally:
        daemon.env = saved


# -- keys ----------------------------------------------------------------------------------------------------

def test_root_needs_no_key(guarded: Daemon) -> None:
    assert httpx.get(guarded.base_url + "/").status_code == 200
    assert httpx.head(guarded.base_url + "/").status_code == 200


@pytest.mark.parametrize("path", ["/api/tags", "/api/version", "/v1/models", "/openapi.json"])
def test_a_missing_or_wrong_key_is_401_and_a_right_one_in_either_header_passes(guarded: Daemon, path: str) -> None:
    missing = httpx.get(guarded.base_url + path)
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert "missing API key" in missing.text
    for wrong in ({"Authorization": "Bearer sk-nope"}, {"x-api-key": "sk-nope"}, {"Authorization": KEY},
                  {"Authorization": f"Basic {KEY}"}, {"Authorization": f"Bearer {KEY}x"}):
        answer = httpx.get(guarded.base_url + path, headers=wrong)
        assert answer.status_code == 401, wrong
        assert "invalid API key" in answer.text
    for right in (AUTH, {"Authorization": f"bearer {OTHER_KEY}"}, {"x-api-key": KEY}):
        assert httpx.get(guarded.base_url + path, headers=right).status_code == 200, right


def test_the_401_is_drawn_in_each_apis_shape(guarded: Daemon) -> None:
    ollama_shape = httpx.post(guarded.base_url + "/api/chat", json={"model": "smollm2", "messages": HI})
    assert ollama_shape.status_code == 401
    assert set(ollama_shape.json()) == {"error"}
    # the relay paths are plain ASGI ahead of the router: the guard stands in front of them too
    openai_shape = httpx.post(guarded.base_url + "/v1/chat/completions", json={"model": "smollm2", "messages": HI})
    assert openai_shape.status_code == 401
    assert openai_shape.json()["error"]["type"] == "authentication_error"
    assert openai_shape.json()["error"]["code"] == 401
    anthropic_shape = httpx.post(guarded.base_url + "/v1/messages", json={"model": "smollm2", "messages": HI})
    assert anthropic_shape.status_code == 401
    message = anthropic_shape.json()["error"]["message"]
    assert anthropic_shape.json() == {"type": "error", "error": {"type": "authentication_error", "message": message}}


def test_the_cli_sends_mgr_api_key(guarded: Daemon, model: str) -> None:
    listed = cli(guarded, KEY, "list")
    assert listed.returncode == 0, listed.stderr
    assert "smollm2" in listed.stdout
    refused = cli(guarded, None, "list")
    assert refused.returncode == 1
    assert "MGR_API_KEY" in refused.stderr and "API key" in refused.stderr
    wrong = cli(guarded, "sk-wrong", "list")
    assert wrong.returncode == 1
    assert "invalid API key" in wrong.stderr


def test_the_real_clients_with_the_key(guarded: Daemon, model: str) -> None:
    answer = ollama.Client(host=guarded.base_url, headers=AUTH).chat(
        model=model, messages=HI, options={"num_predict": 8, "temperature": 0})
    assert answer.message.content
    chat = openai.OpenAI(base_url=guarded.base_url + "/v1", api_key=KEY).chat.completions.create(
        model=model, messages=HI, max_tokens=8, temperature=0)  # type: ignore[arg-type]
    assert chat.choices[0].message.content
    message = anthropic.Anthropic(base_url=guarded.base_url, api_key=OTHER_KEY).messages.create(
        model=model, messages=HI, max_tokens=8)  # type: ignore[arg-type]
    assert message.content and message.content[0].type == "text"


def test_the_real_clients_without_it(guarded: Daemon, model: str) -> None:
    with pytest.raises(ollama.ResponseError) as refused:
        ollama.Client(host=guarded.base_url).list()
    assert refused.value.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=guarded.base_url + "/v1", api_key="sk-wrong", max_retries=0).chat.completions.create(
            model=model, messages=HI, max_tokens=8)  # type: ignore[arg-type]
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=guarded.base_url, api_key="sk-wrong", max_retries=0).messages.create(
            model=model, messages=HI, max_tokens=8)  # type: ignore[arg-type]


def test_a_runner_port_refuses_a_request_without_its_secret(guarded: Daemon, model: str) -> None:
    # the daemon's own requests reach it (this one loads it)
    loaded = httpx.post(guarded.base_url + "/api/generate", headers=AUTH, timeout=120,
                        json={"model": model, "prompt": "Hi", "stream": False, "options": {"num_predict": 4}})
    assert loaded.status_code == 200, loaded.text
    runner = next(p for p in guarded.runner_processes() if "mgr.daemon.runners.llama" in " ".join(p.cmdline()))
    command_line = runner.cmdline()
    port = int(command_line[command_line.index("--port") + 1])
    secret = _environment(runner)["MGR_RUNNER_SECRET"]
    assert len(secret) >= 32
    assert not any(secret in arg for arg in command_line)  # never where `ps` shows it
    runner_url = f"http://127.0.0.1:{port}"
    body = {"model": model, "messages": HI, "max_tokens": 4}
    for headers in ({}, {"Authorization": "Bearer guessed"}, AUTH):  # the daemon's keys are not the runner's
        skipped = httpx.post(runner_url + "/v1/chat/completions", json=body, headers=headers, timeout=60)
        assert skipped.status_code == 401, headers
        assert skipped.json()["error"]["type"] == "authentication_error"
    assert httpx.get(runner_url + "/health").status_code == 200  # health stays open
    with_secret = httpx.post(runner_url + "/v1/chat/completions", json=body, timeout=60,
                             headers={"Authorization": f"Bearer {secret}"})
    assert with_secret.status_code == 200, with_secret.text
    again = httpx.post(guarded.base_url + "/v1/chat/completions", headers=AUTH, timeout=60, json=body)
    assert again.status_code == 200, again.text


def _environment(process: psutil.Process) -> dict[str, str]:
    raw = Path(f"/proc/{process.pid}/environ").read_bytes()
    return dict(item.decode().partition("=")[::2] for item in raw.split(b"\0") if b"=" in item)


def test_a_keys_file(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"# one a line\n\n{FILE_KEY}\n")
    os.chmod(keys, 0o600)
    d = Daemon(tmp_path, extra_env={"MGR_API_KEYS_FILE": str(keys), "MGR_API_KEYS": ""})
    d.start()
    try:
        assert httpx.get(d.base_url + "/api/tags").status_code == 401
        assert httpx.get(d.base_url + "/api/tags", headers={"x-api-key": FILE_KEY}).status_code == 200
        assert httpx.get(d.base_url + "/api/tags", headers={"Authorization": "Bearer # one a line"}).status_code == 401
    finally:
        d.stop()


# -- Host ----------------------------------------------------------------------------------------------------

def test_a_foreign_host_is_403_even_with_a_key(guarded: Daemon, model: str) -> None:
    """DNS rebinding: a page on evil.example.com whose name now points at 127.0.0.1."""
    for method, path, body in (("GET", "/api/tags", None), ("DELETE", "/api/delete", {"model": model}),
                               ("GET", "/", None), ("POST", "/v1/chat/completions", {"model": model})):
        answer = httpx.request(method, guarded.base_url + path, json=body,
                               headers={**AUTH, "Host": f"evil.example.com:{guarded.port}"})
        assert answer.status_code == 403, (method, path)
        assert "loopback host" in answer.text
    assert model + ":latest" in [m["name"] for m in httpx.get(guarded.base_url + "/api/tags", headers=AUTH)
                                 .json()["models"]]  # the DELETE did nothing
    for host in (f"localhost:{guarded.port}", "localhost", f"127.0.0.1:{guarded.port}", f"[::1]:{guarded.port}",
                 "app.localhost", "127.0.0.2:80"):
        assert httpx.get(guarded.base_url + "/api/tags", headers={**AUTH, "Host": host}).status_code == 200, host


# -- Origin --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("origin", ["http://localhost:3000", "http://127.0.0.1", "https://[::1]:8443",
                                    "app://obsidian.md", "file://", "tauri://localhost",
                                    "vscode-webview://1a2b3c", CONFIGURED_ORIGIN])
def test_an_allowed_origin_gets_cors_headers(guarded: Daemon, origin: str) -> None:
    answer = httpx.get(guarded.base_url + "/api/tags", headers={**AUTH, "Origin": origin})
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] == origin
    assert "Origin" in answer.headers["vary"]
    # an error it may read too (401 without the key)
    refused = httpx.get(guarded.base_url + "/api/tags", headers={"Origin": origin})
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == origin


@pytest.mark.parametrize("origin", [FOREIGN_ORIGIN, "http://localhost.evil.example.com", "null",
                                    "https://chat.example.org.evil.example.com", "http://127.0.0.1.nip.io:3000"])
def test_a_foreign_origin_is_403_before_anything(guarded: Daemon, origin: str) -> None:
    answer = httpx.get(guarded.base_url + "/api/tags", headers={**AUTH, "Origin": origin})
    assert answer.status_code == 403
    assert "access-control-allow-origin" not in answer.headers
    assert "MGR_ORIGINS" in answer.json()["error"]


def test_a_cross_site_text_plain_post_does_nothing(guarded: Daemon, model: str) -> None:
    """What `fetch(url, {mode: "no-cors", method: "POST", body})` sends: no preflight, text/plain, an Origin."""
    copy = {"model": "evil-copy", "from": model}
    pull = {"model": "hf.co/evil/never-pulled-GGUF", "stream": False}
    for path, body in (("/api/create", copy), ("/api/pull", pull), ("/api/copy", {"source": model,
                                                                                  "destination": "evil-copy"})):
        for key in ({}, AUTH):  # a key in the page would not help it either
            answer = httpx.post(guarded.base_url + path, content=_json(body),
                                headers={**key, "Origin": FOREIGN_ORIGIN, "Content-Type": "text/plain"})
            assert answer.status_code == 403, path
    names = [m["name"] for m in httpx.get(guarded.base_url + "/api/tags", headers=AUTH).json()["models"]]
    assert not any("evil" in name for name in names)
    assert not any("evil" in p.name for p in Path(guarded.env["MGR_MODELS"]).rglob("*"))
    # the same create from the CLI's side (no Origin, the key) does act: the 403 was the origin's
    made = httpx.post(guarded.base_url + "/api/create", content=_json(copy), headers=AUTH, timeout=60)
    assert made.status_code == 200, made.text
    assert httpx.request("DELETE", guarded.base_url + "/api/delete", json={"model": "evil-copy"},
                         headers=AUTH).status_code == 200


def _json(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


def test_preflight(guarded: Daemon) -> None:
    asked = {"Origin": "http://localhost:5173", "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"}
    for path in ("/api/chat", "/v1/chat/completions", "/v1/messages"):
        answer = httpx.options(guarded.base_url + path, headers=asked)  # a preflight never carries the key
        assert answer.status_code == 204, path
        assert answer.headers["access-control-allow-origin"] == "http://localhost:5173"
        assert "POST" in answer.headers["access-control-allow-methods"]
        assert re.search("authorization", answer.headers["access-control-allow-headers"], re.I)
        assert int(answer.headers["access-control-max-age"]) > 0
    foreign = httpx.options(guarded.base_url + "/api/chat", headers={**asked, "Origin": FOREIGN_ORIGIN})
    assert foreign.status_code == 403
    assert "access-control-allow-origin" not in foreign.headers


def test_a_vllm_runner_gets_its_secret_as_vllm_api_key(daemon_url: str) -> None:
    """vLLM checks VLLM_API_KEY on its /v1 routes: the daemon hands each vLLM runner its secret there (through the
    stand-in vllm package here; the real one on the GPU machine), and its own requests, control calls included
    (sleep, wake), carry it."""
    answer = httpx.post(daemon_url + "/api/generate", timeout=60, json={"model": "smol", "prompt": "hi",
                                                                        "keep_alive": "300ms", "stream": False})
    assert answer.status_code == 200, answer.text
    process = runner_process(daemon_url)
    secret = process.environ()["VLLM_API_KEY"]
    assert len(secret) >= 32 and not any(secret in arg for arg in process.cmdline())
    assert "MGR_RUNNER_SECRET" not in process.environ()  # vLLM's own variable only
    assert wait_for(lambda: httpx.get(daemon_url + "/api/ps").json()["models"][0]["state"] == "sleeping", timeout=10)
    woken = httpx.post(daemon_url + "/v1/chat/completions", timeout=60, json={"model": "smol", "messages": HI})
    assert woken.status_code == 200, woken.text
    assert runner_process(daemon_url).environ()["VLLM_API_KEY"] == secret  # the same runner, woken
