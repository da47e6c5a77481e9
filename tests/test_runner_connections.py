"""Every API keeps reusing its connection to the runner: an answer read up to its end ([DONE]) gives the
connection back to the daemon's pool, so that the next request starts on it instead of on a new TCP connection
(a connect here and a new connection in the runner's server, on each request's way to its first token).

The daemon is `mgr serve` with the real llama.cpp runner and SmolLM2; the daemon's own sockets to the runner's
port are read from the OS (psutil): a connection the daemon closes stays a minute in TIME_WAIT on its side,
and requests through each API may leave none."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import psutil
import pytest
from conftest import Daemon

HI = [{"role": "user", "content": "Say hi."}]
Call = Callable[[str, str], None]


def _ollama_chat_stream(url: str, model: str) -> None:
    with httpx.stream("POST", url + "/api/chat", timeout=120, json={
            "model": model, "messages": HI, "options": {"num_predict": 4}}) as response:
        assert response.status_code == 200 and b'"done": true' in response.read()


def _ollama_chat_whole(url: str, model: str) -> None:
    response = httpx.post(url + "/api/chat", timeout=120, json={
        "model": model, "messages": HI, "stream": False, "options": {"num_predict": 4}})
    assert response.status_code == 200 and response.json()["done"] is True


def _ollama_generate_stream(url: str, model: str) -> None:
    with httpx.stream("POST", url + "/api/generate", timeout=120, json={
            "model": model, "prompt": "Hi", "options": {"num_predict": 4}}) as response:
        assert response.status_code == 200 and b'"done": true' in response.read()


def _openai_stream(url: str, model: str) -> None:
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=120, json={
            "model": model, "messages": HI, "max_tokens": 4, "stream": True}) as response:
        assert response.status_code == 200 and response.read().rstrip().endswith(b"data: [DONE]")


def _anthropic_stream(url: str, model: str) -> None:
    with httpx.stream("POST", url + "/v1/messages", timeout=120, json={
            "model": model, "messages": HI, "max_tokens": 4, "stream": True}) as response:
        assert response.status_code == 200 and b"message_stop" in response.read()


def _anthropic_whole(url: str, model: str) -> None:
    response = httpx.post(url + "/v1/messages", timeout=120, json={"model": model, "messages": HI, "max_tokens": 4})
    assert response.status_code == 200 and response.json()["type"] == "message"


def _responses_whole(url: str, model: str) -> None:
    response = httpx.post(url + "/v1/responses", timeout=120, json={
        "model": model, "input": "Say hi.", "max_output_tokens": 4, "store": False})
    assert response.status_code == 200 and response.json()["status"] in ("completed", "incomplete")


CALLS: list[Call] = [_ollama_chat_stream, _ollama_chat_whole, _ollama_generate_stream, _openai_stream,
                     _anthropic_stream, _anthropic_whole, _responses_whole]


def _runner_port(daemon: Daemon) -> int:
    [runner] = daemon.runner_processes()
    argv = runner.cmdline()
    return int(argv[argv.index("--port") + 1])


def _closed_by_the_daemon(port: int) -> int:
    """Connections to the runner's port that the daemon's side closed (TIME_WAIT, kept by the OS for a minute):
    a connection not given back to the pool is closed there."""
    return sum(1 for c in psutil.net_connections("tcp")
               if c.status == psutil.CONN_TIME_WAIT and c.raddr and c.raddr.port == port)


@pytest.mark.parametrize("call", CALLS, ids=[c.__name__.strip("_") for c in CALLS])
def test_each_api_reuses_its_runner_connection(daemon: Daemon, smollm2: str, call: Call) -> None:
    call(daemon.base_url, smollm2)  # loaded, and a connection to the runner pooled
    port = _runner_port(daemon)
    closed = _closed_by_the_daemon(port)
    for _ in range(3):
        call(daemon.base_url, smollm2)
    assert _closed_by_the_daemon(port) == closed
