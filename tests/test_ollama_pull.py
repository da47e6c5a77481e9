"""`mgr pull ollama://...` from a fake of Ollama's registry on loopback (tests/fake_ollama_registry.py), through the
real daemon: the manifest and its layers (model, template, params, system, license) become a model that answers
"Paris", with Ollama's progress events; the blobs come through the shared downloader (Range parts, followed
redirects); a short name not in the catalog falls back to the registry when MGR_SOURCES names it; a pull killed
with -9 resumes where it stood; bytes that do not match their digest are refused."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import QUESTION, Daemon, wait_for
from fake_ollama_registry import LICENSE, MODEL, PARAMS, SYSTEM, TEMPLATE, FakeOllamaRegistry
from fakehub import dead_endpoint, tiny_gguf

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
BIG = 12 << 20  # floats: a 48 MiB GGUF, two 32 MiB parts


@pytest.fixture(scope="module")
def registry(gguf_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeOllamaRegistry]:
    files = tmp_path_factory.mktemp("registry")
    big = files / "big.gguf"
    big.write_bytes(tiny_gguf("big", BIG, seed=7))
    with FakeOllamaRegistry() as registry:
        registry.add_model("library", "smollm2", "135m", [
            (MODEL, gguf_path), (TEMPLATE, b"{{ .Prompt }}"), (SYSTEM, b"You answer in one sentence."),
            (PARAMS, json.dumps({"stop": ["<|im_end|>"], "temperature": 0.1}).encode()),
            (LICENSE, b"Apache License 2.0")])
        registry.add_model("library", "tinyfallback", "latest", [(MODEL, tiny_gguf("fallback", 64, seed=1))])
        registry.add_model("library", "big", "latest", [(MODEL, big)])
        registry.add_model("library", "corrupt", "latest", [(MODEL, tiny_gguf("corrupt", 4096, seed=2))])
        registry.corrupt.add(registry.digest_of("library", "corrupt", "latest", MODEL))
        registry.add_model("library", "badparams", "latest", [(MODEL, tiny_gguf("bad", 64, seed=3)),
                                                              (PARAMS, b'{"temperature": 0.5}')])
        registry.corrupt.add(registry.digest_of("library", "badparams", "latest", PARAMS))
        yield registry


def daemon_on(root: Path, registry: FakeOllamaRegistry) -> Daemon:
    daemon = Daemon(root, extra_env={"MGR_OLLAMA_REGISTRY": registry.url, "MGR_SOURCES": "hf,ollama",
                                     "MGR_HF_ENDPOINT": dead_endpoint()})
    daemon.start()
    return daemon


@pytest.fixture(scope="module")
def daemon(registry: FakeOllamaRegistry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = daemon_on(tmp_path_factory.mktemp("mgr"), registry)
    yield d
    d.stop()


def pull(daemon: Daemon, reference: str, timeout: float = 120) -> tuple[int, list[dict[str, Any]]]:
    with httpx.stream("POST", daemon.base_url + "/api/pull", json={"model": reference}, timeout=timeout) as answer:
        if answer.status_code != 200:
            answer.read()
            return answer.status_code, [answer.json()]
        return 200, [json.loads(line) for line in answer.iter_lines() if line]


def test_pull_reads_the_manifest_and_layers_and_answers(daemon: Daemon, registry: FakeOllamaRegistry,
                                                        gguf_path: Path) -> None:
    status, events = pull(daemon, "ollama://smollm2:135m")
    assert status == 200 and events[-1] == {"status": "success"}, events[-3:]
    statuses = [e["status"] for e in events]
    assert statuses[0] == "pulling manifest"
    assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    model_digest = registry.digest_of("library", "smollm2", "135m", MODEL)
    progress = [e for e in events if e.get("digest") == model_digest]
    assert progress and progress[-1]["completed"] == progress[-1]["total"] == gguf_path.stat().st_size
    assert progress[0]["status"] == f"pulling {model_digest[7:19]}"
    assert any("Go template" in s for s in statuses)  # said, not hidden
    ranged = [r for r in registry.requests if r[1].startswith("/cdn/" + model_digest) and r[2]]
    assert ranged, "the model blob was not fetched in Range parts"
    show = httpx.post(daemon.base_url + "/api/show", json={"model": "smollm2:135m"}).json()
    assert show["source"]["hub"] == "ollama" and show["source"]["repo"] == "library/smollm2"
    assert show["source"]["endpoint"] == registry.url and show["source"]["quantization"] == "Q4_1"
    assert show["system"] == "You answer in one sentence." and show["license"] == "Apache License 2.0"
    assert "temperature" in show["parameters"]
    answer = httpx.post(daemon.base_url + "/api/chat", json={
        "model": "smollm2:135m", "stream": False, "options": {"temperature": 0, "num_predict": 24},
        "messages": [{"role": "user", "content": QUESTION}]}, timeout=120)
    assert answer.status_code == 200 and "paris" in answer.json()["message"]["content"].lower(), answer.text
    served = registry.served[model_digest]
    again = daemon.cli("pull", "registry.ollama.ai/library/smollm2:135m")  # the same model, the other spelling
    assert again.returncode == 0, again.stderr
    assert registry.served[model_digest] == served  # nothing fetched twice


def test_a_short_name_not_in_the_catalog_falls_back_to_the_registry(daemon: Daemon) -> None:
    status, events = pull(daemon, "tinyfallback")
    assert status == 200 and events[-1] == {"status": "success"}, events
    assert any(e.get("source") == "ollama" for e in events)
    names = [m["name"] for m in httpx.get(daemon.base_url + "/api/tags").json()["models"]]
    assert "tinyfallback:latest" in names
    status, body = pull(daemon, "nosuchmodel:7b")
    assert status == 404 and "nosuchmodel" in body[0]["error"], body


def test_bytes_that_do_not_match_their_digest_are_refused(daemon: Daemon) -> None:
    status, events = pull(daemon, "ollama://corrupt")
    assert status == 200 and "failed verification" in events[-1].get("error", ""), events[-2:]
    status, body = pull(daemon, "ollama://badparams")  # a text layer is read while planning: before the 200
    assert status == 502 and "other bytes" in body[0]["error"], body
    names = [m["name"] for m in httpx.get(daemon.base_url + "/api/tags").json()["models"]]
    assert "corrupt:latest" not in names and "badparams:latest" not in names


def test_a_pull_killed_with_9_resumes_where_it_stood(registry: FakeOllamaRegistry, tmp_path: Path) -> None:
    digest = registry.digest_of("library", "big", "latest", MODEL)
    size = registry.blobs[digest].size
    registry.rates[digest] = 4_000_000
    first = daemon_on(tmp_path, registry)
    try:
        thread = threading.Thread(target=lambda: _quietly(pull, first, "ollama://big"), daemon=True)
        thread.start()
        assert wait_for(lambda: registry.served[digest] >= size * 0.4, timeout=60, interval=0.01)
        assert first.process is not None
        os.kill(first.process.pid, signal.SIGKILL)
        first.process.wait()
        thread.join(30)
    finally:
        first.stop()
        registry.rates.pop(digest, None)
    sent_before = registry.served[digest]
    second = daemon_on(tmp_path, registry)
    try:
        status, events = pull(second, "ollama://big")
        assert status == 200 and events[-1] == {"status": "success"}, events[-3:]
        sent_again = registry.served[digest] - sent_before
        print(f"\nsent before the kill {sent_before} of {size}, sent again {sent_again}")
        assert sent_again <= (size - sent_before) * 1.05 + (4 << 20), (sent_again, size, sent_before)
        blob = Path(second.env["MGR_MODELS"]) / "blobs" / digest.replace(":", "-")
        assert blob.stat().st_size == size
    finally:
        second.stop()


def _quietly(function: Any, *args: Any) -> None:
    try:
        function(*args)
    except httpx.HTTPError:
        pass  # the daemon was killed under it
