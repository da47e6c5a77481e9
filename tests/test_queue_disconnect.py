"""Clients that leave while their request waits in the queue, through both APIs (the OpenAI relay runs
outside Starlette's router, so it watches for the disconnect itself): the waiter leaves the queue, no slot
leaks, and the next request is served. Real daemon, real llama.cpp runner, one slot (MGR_NUM_PARALLEL=1)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import QUESTION, Daemon, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def single_slot(tmp_path_factory: pytest.TempPathFactory, gguf_path: Path) -> Iterator[Daemon]:
    daemon = Daemon(tmp_path_factory.mktemp("mgr-queue"), {"MGR_NUM_PARALLEL": "1"})
    daemon.start()
    try:
        created = daemon.cli("create", "smollm2", "--from", str(gguf_path))
        assert created.returncode == 0, created.stderr
        yield daemon
    finally:
        daemon.stop()


def queue_of(daemon: Daemon) -> dict:  # type: ignore[type-arg]
    [model] = httpx.get(daemon.base_url + "/api/queue").json()["models"]
    return model


def send_and_keep_open(daemon: Daemon, path: str, body: dict) -> socket.socket:  # type: ignore[type-arg]
    """A raw HTTP request whose connection the test closes when it likes, without reading the answer."""
    payload = json.dumps(body).encode()
    connection = socket.create_connection(("127.0.0.1", daemon.port))
    connection.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return connection


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"model": "smollm2", "stream": True, "max_tokens": 5,
                              "messages": [{"role": "user", "content": QUESTION}]}),
    ("/v1/completions", {"model": "smollm2", "prompt": "Paris is", "max_tokens": 5}),
    ("/api/chat", {"model": "smollm2", "messages": [{"role": "user", "content": QUESTION}]}),
], ids=["openai-chat-stream", "openai-completions", "ollama-chat"])
def test_a_client_that_leaves_the_queue_is_forgotten(single_slot: Daemon, path: str, body: dict) -> None:  # type: ignore[type-arg]
    # One long answer holds the only slot.
    with httpx.stream("POST", single_slot.base_url + "/api/generate", timeout=120, json={
            "model": "smollm2", "prompt": "Write a very long story about a dragon.",
            "options": {"num_predict": 2000, "temperature": 0.8}}) as holder:
        lines = holder.iter_lines()
        next(lines)
        waiting = send_and_keep_open(single_slot, path, body)
        assert wait_for(lambda: queue_of(single_slot)["queued"] == 1, timeout=10)
        waiting.close()  # the client gives up while queued
        assert wait_for(lambda: queue_of(single_slot)["queued"] == 0, timeout=10)
        assert queue_of(single_slot)["active"] == 1  # the holder still runs
    # The holder has gone too: its slot comes back, and the next request is served at once.
    assert wait_for(lambda: queue_of(single_slot)["active"] == 0, timeout=15)
    answer = httpx.post(single_slot.base_url + "/v1/chat/completions", timeout=60, json={
        "model": "smollm2", "max_tokens": 20, "temperature": 0, "messages": [{"role": "user", "content": QUESTION}]})
    assert answer.status_code == 200 and "Paris" in answer.json()["choices"][0]["message"]["content"]
    assert queue_of(single_slot) | {"active": 0, "queued": 0} == queue_of(single_slot)


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"model": "smollm2", "max_tokens": 1500, "ignore_eos": True,
                              "messages": [{"role": "user", "content": "Write a very long story."}]}),
    ("/api/generate", {"model": "smollm2", "prompt": "Write a very long story.", "stream": False,
                       "options": {"num_predict": 1500}}),
], ids=["openai", "ollama"])
def test_a_client_that_leaves_a_non_streamed_answer_stops_it(single_slot: Daemon, path: str,
                                                             body: dict) -> None:  # type: ignore[type-arg]
    """1,500 tokens take this machine over 10 s; the slot must come back within seconds of the client leaving,
    which only happens if the daemon closed the runner connection and the runner stopped generating."""
    waiting = send_and_keep_open(single_slot, path, body)
    assert wait_for(lambda: queue_of(single_slot)["active"] == 1, timeout=30)
    [runner] = single_slot.runner_processes()
    port = runner.cmdline()[runner.cmdline().index("--port") + 1]
    assert wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/health").json()["active"] == 1, timeout=10)
    waiting.close()
    assert wait_for(lambda: queue_of(single_slot)["active"] == 0, timeout=4)
    assert wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/health").json()["active"] == 0, timeout=4)
