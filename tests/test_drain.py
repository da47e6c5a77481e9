"""SIGTERM drains the daemon: it stops taking connections, answers what is still queued with a 503 at once, lets
the answers in flight go on until MGR_SHUTDOWN_TIMEOUT, then ends them with a last line that says why (Ollama's
{"error": ...}, an OpenAI error event), stops every runner and exits 0. Real daemon, real llama.cpp runner."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import QUESTION, Daemon, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
GRACE = 3.0  # MGR_SHUTDOWN_TIMEOUT
SLACK = 4.0  # ending the streams, stopping the runner, on a loaded machine


def draining_daemon(root: Path, gguf_path: Path, parallel: int) -> Daemon:
    daemon = Daemon(root, {"MGR_SHUTDOWN_TIMEOUT": str(GRACE), "MGR_NUM_PARALLEL": str(parallel),
                           "MGR_CONTEXT_LENGTH": "2048"})
    daemon.start()
    created = daemon.cli("create", "smollm2", "--from", str(gguf_path))
    assert created.returncode == 0, created.stderr
    loaded = httpx.post(daemon.base_url + "/api/generate", json={"model": "smollm2"}, timeout=120)
    assert loaded.status_code == 200
    return daemon


@pytest.fixture
def two_slots(tmp_path: Path, gguf_path: Path) -> Iterator[Daemon]:
    daemon = draining_daemon(tmp_path, gguf_path, 2)
    yield daemon
    daemon.stop()


@pytest.fixture
def one_slot(tmp_path: Path, gguf_path: Path) -> Iterator[Daemon]:
    daemon = draining_daemon(tmp_path, gguf_path, 1)
    yield daemon
    daemon.stop()


class Stream(threading.Thread):
    """A streamed answer read in a thread: its lines, each with the time it came."""

    def __init__(self, url: str, body: dict[str, object]) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.lines: list[tuple[float, str]] = []
        self.status = 0

    def run(self) -> None:
        with httpx.stream("POST", self.url, json=self.body, timeout=120) as response:
            self.status = response.status_code
            for line in response.iter_lines():
                if line.strip():
                    self.lines.append((time.monotonic(), line))

    def after(self, moment: float) -> list[str]:
        return [line for when, line in self.lines if when > moment]


def ollama_counting(daemon: Daemon) -> Stream:
    """An answer that goes on for as long as it is let: a raw prompt the model continues, no token limit."""
    return Stream(daemon.base_url + "/api/generate", {
        "model": "smollm2", "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", "raw": True,
        "options": {"num_predict": -1, "temperature": 0}})


def openai_story(daemon: Daemon) -> Stream:
    return Stream(daemon.base_url + "/v1/chat/completions", {
        "model": "smollm2", "stream": True, "max_tokens": 100_000, "ignore_eos": True,
        "messages": [{"role": "user", "content": "Write a very long story about a dragon."}]})


def refused(daemon: Daemon) -> bool:
    try:
        socket.create_connection(("127.0.0.1", daemon.port), timeout=1).close()
    except OSError:
        return True
    return False


def test_sigterm_lets_streams_go_on_until_the_deadline_then_ends_them_with_a_last_line(two_slots: Daemon) -> None:
    runners = two_slots.runner_pids()
    assert runners
    streams = [ollama_counting(two_slots), openai_story(two_slots)]
    for stream in streams:
        stream.start()
    assert wait_for(lambda: all(len(s.lines) >= 3 for s in streams), timeout=60)
    assert two_slots.process is not None
    signalled = time.monotonic()
    two_slots.process.send_signal(signal.SIGTERM)
    assert wait_for(lambda: refused(two_slots), timeout=5)  # no new connections
    for stream in streams:
        stream.join(GRACE + SLACK + 10)
        assert not stream.is_alive()
    ollama, relay = streams
    assert ollama.status == relay.status == 200
    for stream in streams:
        ended = stream.lines[-1][0] - signalled
        assert GRACE - 0.5 <= ended < GRACE + SLACK, ended  # they went on until the deadline, then ended
    # tokens kept coming after the signal (how many, on this shared 2-core machine, varies by the second)
    assert any(len(stream.after(signalled)) >= 2 for stream in streams)
    assert json.loads(ollama.lines[-1][1]) == {"error": "the server is shutting down"}
    last_event = json.loads(relay.lines[-1][1].removeprefix("data: "))
    assert last_event["error"]["code"] == 503 and "shutting down" in last_event["error"]["message"]
    assert two_slots.process.wait(timeout=GRACE + SLACK + 10) == 0
    assert wait_for(lambda: not any(psutil.pid_exists(pid) for pid in runners), timeout=5)


def test_queued_requests_are_answered_at_once_and_a_cancelled_one_does_not_hold_the_stop(one_slot: Daemon) -> None:
    """One slot, held by a long answer; two requests queue behind it and one of them leaves. SIGTERM answers the
    other 503 at once, the long answer ends at the deadline, and the daemon exits 0."""
    holder = openai_story(one_slot)
    holder.start()
    assert wait_for(lambda: len(holder.lines) >= 2, timeout=60)
    body = json.dumps({"model": "smollm2", "messages": [{"role": "user", "content": QUESTION}]}).encode()
    request = (b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n" % len(body) + body)
    leaving, staying = (socket.create_connection(("127.0.0.1", one_slot.port)) for _ in range(2))
    for connection in (leaving, staying):
        connection.sendall(request)

    def queued() -> int:
        [model] = httpx.get(one_slot.base_url + "/api/queue").json()["models"]
        return int(model["queued"])

    assert wait_for(lambda: queued() == 2, timeout=10)
    leaving.close()
    assert wait_for(lambda: queued() == 1, timeout=10)
    assert one_slot.process is not None
    signalled = time.monotonic()
    one_slot.process.send_signal(signal.SIGTERM)
    staying.settimeout(GRACE)
    answer = staying.recv(65536)  # long before the deadline
    assert time.monotonic() - signalled < GRACE - 1
    while b"shutting down" not in answer:  # the body may come in a segment of its own (the connection then closes)
        more = staying.recv(65536)
        if not more:
            break
        answer += more
    assert answer.startswith(b"HTTP/1.1 503") and b"shutting down" in answer
    staying.close()
    holder.join(GRACE + SLACK + 10)
    assert "shutting down" in holder.lines[-1][1]
    assert one_slot.process.wait(timeout=GRACE + SLACK + 10) == 0
    assert time.monotonic() - signalled < GRACE + SLACK
