"""A runner that stops answering is detected: the daemon's requests to it fail within runner_timeout (before the
answer) or runner_idle_timeout (in the middle of a stream) with a 504 in the called API's shape (a stream's last
line), and the runner is killed and started again for the next request.

The daemon is the real app (create_app: the scheduler, the OpenAI relay, the Ollama adapter, the runner connection
pool) served by uvicorn on a loopback port, with the real clients' HTTP; the runner is the STAND-IN that stops
answering (tests/standin/hung_runner.py: it stops its own process with SIGSTOP, /health included)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from conftest import free_port, wait_for
from fakehub import import_file, tiny_gguf
from standin.factory import StandinFactory, StandinRunner
from standin.gpus import StaticGpus

from mgr.daemon.app import create_app
from mgr.daemon.placement import CPU, Placement
from mgr.daemon.runners.base import LoadSpec
from mgr.daemon.runners.http import RunnerPool
from mgr.registry.config import Settings
from mgr.registry.store import Store

pytestmark = pytest.mark.timeout(120)

HUNG_SCRIPT = Path(__file__).parent / "standin" / "hung_runner.py"
FIRST_BYTE_TIMEOUT = 2.0
IDLE_TIMEOUT = 1.0
SLACK = 1.5  # the watchdog looks every quarter of the shorter timeout; the rest is this loaded machine
REPLY = "Hello from the stand-in runner."


class HungStandinFactory(StandinFactory):
    """Starts the stand-in that can stop answering (hung_runner.py) in place of runner.py."""

    def __call__(self, spec: LoadSpec, placement: Placement = CPU) -> StandinRunner:
        runner = super().__call__(spec, placement)
        runner.process.argv[1] = str(HUNG_SCRIPT)
        return runner


class ServedDaemon:
    def __init__(self, root: Path) -> None:
        self.settings = Settings(models_dir=root / "models", state_dir=root / "state", keep_alive=300,
                                 runner_timeout=FIRST_BYTE_TIMEOUT, runner_idle_timeout=IDLE_TIMEOUT)
        store = Store(self.settings.models_dir)
        gguf = root / "stuck.gguf"
        gguf.write_bytes(tiny_gguf("stuck"))
        store.create("stuck", files={"stuck.gguf": import_file(store, gguf)}, source={"test": "stand-in"})
        self.factory = HungStandinFactory(self.settings)
        # the runners' connection pool is the factory's: it gets the daemon's timeouts, as create_app's does
        self.factory.pool = RunnerPool(self.settings.runner_timeout, self.settings.runner_idle_timeout)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        app = create_app(self.settings, runner_factory=self.factory, gpus=StaticGpus([]))
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, lifespan="on",
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="daemon", daemon=True)

    def pids(self) -> list[int]:
        return self.factory.pids("stuck")

    def alive(self, pid: int) -> bool:
        runner = next(r for r in self.factory.runners if r.pid == pid)
        return not runner.process.exited or not runner.process.exited.done()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[ServedDaemon]:
    served = ServedDaemon(tmp_path)
    served.thread.start()
    assert wait_for(lambda: served.server.started, timeout=20)
    yield served
    served.server.should_exit = True
    served.thread.join(30)


def chat(content: str, stream: bool = False) -> dict[str, object]:
    return {"model": "stuck", "stream": stream, "messages": [{"role": "user", "content": content}]}


def test_a_runner_that_sends_nothing_is_a_504_and_is_started_again(daemon: ServedDaemon) -> None:
    client = openai.OpenAI(base_url=daemon.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert client.chat.completions.create(**chat("hi")).choices[0].message.content == REPLY  # type: ignore[call-overload]
    [first] = daemon.pids()
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(**chat("hang before answering"))  # type: ignore[call-overload]
    waited = time.monotonic() - started
    assert caught.value.status_code == 504
    assert "runner_timeout" in caught.value.message and "hung" in caught.value.message
    assert FIRST_BYTE_TIMEOUT <= waited < FIRST_BYTE_TIMEOUT + SLACK
    # the hung runner was killed (SIGKILL reaches a stopped process); the next request starts a new one
    assert wait_for(lambda: not daemon.alive(first), timeout=5)
    answer = client.chat.completions.create(**chat("hi again"))  # type: ignore[call-overload]
    assert answer.choices[0].message.content == REPLY
    assert len(daemon.pids()) == 2 and daemon.pids()[0] == first


def test_a_stream_that_stops_ends_with_an_error_line(daemon: ServedDaemon) -> None:
    """Ollama's NDJSON: the text that came, then {"error": ...} once nothing came for runner_idle_timeout."""
    with httpx.stream("POST", daemon.base_url + "/api/chat", json=chat("hang mid-answer", stream=True),
                      timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        first = json.loads(next(lines))
        assert first["message"]["content"] == "Hello" and first["done"] is False
        went_quiet = time.monotonic()
        last = json.loads(next(lines))
        waited = time.monotonic() - went_quiet
        assert list(lines) == []
    assert "runner_idle_timeout" in last["error"]
    assert IDLE_TIMEOUT <= waited < IDLE_TIMEOUT + SLACK
    [hung] = daemon.pids()
    assert wait_for(lambda: not daemon.alive(hung), timeout=5)
    answer = httpx.post(daemon.base_url + "/api/chat", json=chat("hi"), timeout=60)
    assert answer.status_code == 200 and answer.json()["message"]["content"] == REPLY


def test_an_openai_stream_that_stops_ends_with_an_error_event(daemon: ServedDaemon) -> None:
    """The OpenAI relay passes the runner's bytes on as they come: the last event it passes is the 504."""
    events = []
    with httpx.stream("POST", daemon.base_url + "/v1/chat/completions", json=chat("hang mid-answer", stream=True),
                      timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert events[0]["choices"][0]["delta"]["content"] == "Hello"
    error = events[-1]["error"]
    assert error["code"] == 504 and "runner_idle_timeout" in error["message"]
    # through the openai client the same stream raises, after the text
    client = openai.OpenAI(base_url=daemon.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert wait_for(lambda: len(daemon.pids()) == 1 and not daemon.alive(daemon.pids()[0]), timeout=5)
    texts = []
    with pytest.raises(openai.APIError, match="runner_idle_timeout"):
        for chunk in client.chat.completions.create(**chat("hang mid-answer", stream=True)):  # type: ignore[call-overload]
            texts.append(chunk.choices[0].delta.content)
    assert texts == ["Hello"]
