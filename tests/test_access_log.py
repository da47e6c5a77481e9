"""The daemon's logs on stderr: one access line per request (model, API, status, tokens, durations), the runner's
load and unload with their reasons; MGR_LOG_FORMAT=json makes every line one JSON object; MGR_DEBUG=1 adds
DEBUG lines. Against the real daemon and the real SmolLM2 runner."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest
from conftest import Daemon, wait_for

MODEL = "smollm2:latest"


@pytest.fixture(scope="module")
def json_daemon(tmp_path_factory: pytest.TempPathFactory, gguf_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("jsonlog"), {"MGR_LOG_FORMAT": "json", "MGR_DEBUG": "1"})
    d.start()
    created = d.cli("create", "smollm2", "--from", str(gguf_path))
    assert created.returncode == 0, created.stderr
    yield d
    d.stop()


def json_lines(daemon: Daemon) -> list[dict[str, Any]]:
    lines = [line for line in daemon.log_path.read_text().splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # every line is JSON: uvicorn's own too


def access(daemon: Daemon, path: str) -> list[dict[str, Any]]:
    return [line["request"] for line in json_lines(daemon)
            if line["logger"] == "mgr.access" and "request" in line and line["request"]["path"] == path]


def test_one_json_line_per_request_with_its_tokens(json_daemon: Daemon) -> None:
    answer = ollama.Client(host=json_daemon.base_url).chat(
        model=MODEL, messages=[{"role": "user", "content": "Name a colour."}], options={"num_predict": 8})
    completion = openai.OpenAI(base_url=json_daemon.base_url + "/v1", api_key="unused").chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name a fruit."}], max_tokens=8)
    assert completion.usage is not None
    assert wait_for(lambda: access(json_daemon, "/v1/chat/completions"))

    [chat] = access(json_daemon, "/api/chat")
    assert chat["method"] == "POST" and chat["status"] == 200 and chat["api"] == "ollama"
    assert chat["model"] == MODEL
    assert chat["prompt_tokens"] == answer.prompt_eval_count and chat["completion_tokens"] == answer.eval_count
    assert chat["duration_ms"] * 1e6 >= answer.total_duration * 0.99  # the daemon's whole request, at least
    assert chat["load_ms"] > 0  # this request waited for the model's load
    assert 0 < chat["ttft_ms"] <= chat["duration_ms"]

    [relayed] = access(json_daemon, "/v1/chat/completions")
    assert relayed["api"] == "openai" and relayed["status"] == 200 and relayed["model"] == MODEL
    assert relayed["prompt_tokens"] == completion.usage.prompt_tokens
    assert relayed["completion_tokens"] == completion.usage.completion_tokens

    lines = json_lines(json_daemon)
    assert {"time", "level", "logger", "message"} <= set(lines[-1])
    loads = [line["message"] for line in lines if line["logger"] == "mgr.scheduler"]
    assert any(message.startswith(f"{MODEL}: loading on llama.cpp") for message in loads), loads
    assert any(message.startswith(f"{MODEL}: ready in") for message in loads), loads
    # MGR_DEBUG=1: a request that waits for its model, and each request's start, are there too
    debug = [line["message"] for line in lines if line["level"] == "debug"]
    assert any(message.startswith(f"{MODEL}: a request waits (pending, 1 in its queue)") for message in debug), debug
    assert "POST /api/chat begins" in debug


def test_errors_and_unloads_are_logged(json_daemon: Daemon) -> None:
    missing = httpx.post(json_daemon.base_url + "/api/chat", timeout=30,
                         json={"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]})
    assert missing.status_code == 404
    assert wait_for(lambda: access(json_daemon, "/api/chat") and
                    access(json_daemon, "/api/chat")[-1]["status"] == 404)
    assert access(json_daemon, "/api/chat")[-1]["model"] == ""  # it never got a model
    # the guards' refusals are logged too (the access log sits outside them): a rebinding page's Host
    foreign = httpx.get(json_daemon.base_url + "/api/tags", headers={"Host": "evil.example.com"})
    assert foreign.status_code == 403
    assert wait_for(lambda: any(line["status"] == 403 for line in access(json_daemon, "/api/tags")))
    scraped = httpx.get(json_daemon.base_url + "/metrics").text
    counted = [line for line in scraped.splitlines() if line.startswith("mgr_requests_total{")
               and 'endpoint="/api/tags"' in line and 'status="403"' in line]
    assert counted and float(counted[0].rsplit(" ", 1)[1]) == 1, scraped

    ollama.Client(host=json_daemon.base_url).generate(model=MODEL, prompt="", keep_alive=0)

    def unloaded() -> bool:
        return any(re.fullmatch(rf"{re.escape(MODEL)}: unloaded \(request\) in [0-9.]+s", line["message"])
                   for line in json_lines(json_daemon))

    assert wait_for(unloaded, timeout=30)


def test_text_lines_by_default(daemon: Daemon, smollm2: str) -> None:
    ollama.Client(host=daemon.base_url).generate(model=smollm2, prompt="Hi", options={"num_predict": 4})
    pattern = re.compile(rf" INFO mgr\.access: POST /api/generate 200 api=ollama model={re.escape(smollm2)} "
                         r"duration_ms=[0-9.]+ .*prompt_tokens=\d+ completion_tokens=\d+$")
    assert wait_for(lambda: any(pattern.search(line) for line in daemon.log_path.read_text().splitlines()))
    # no DEBUG without MGR_DEBUG, and the scrapes are not logged
    httpx.get(daemon.base_url + "/metrics", timeout=10)
    text = daemon.log_path.read_text()
    assert " DEBUG " not in text and "GET /metrics" not in text


def test_a_bad_log_format_is_refused(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path, {"MGR_LOG_FORMAT": "xml"})
    result = subprocess.run([sys.executable, "-m", "mgr.cli", "serve"], env=daemon.env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    assert "MGR_LOG_FORMAT: expected text or json, got 'xml'" in result.stderr
