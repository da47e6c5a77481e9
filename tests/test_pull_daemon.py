"""Pulls through the daemon: POST /api/pull (Ollama's progress stream, and its statuses for bad input) from a
local fake hub that speaks the Hugging Face and ModelScope protocols, with the real `ollama` client; then the
pulled GGUF answers through `mgr run`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import pytest
from conftest import QUESTION, Daemon
from fakehub import FakeHub, dead_endpoint

pytestmark = pytest.mark.slow
REPO = "test/SmolLM2-135M-Instruct-GGUF"


@pytest.fixture(scope="module")
def hub(gguf_path: Path) -> Iterator[FakeHub]:
    hub = FakeHub().start()
    files = {"SmolLM2-135M-Instruct.Q4_1.gguf": gguf_path, "README.md": b"# SmolLM2\n"}
    hub.add_repo("hf", REPO, files)
    hub.add_repo("modelscope", REPO, files)
    yield hub
    hub.stop()


@pytest.fixture(scope="module")
def pulling_daemon(hub: FakeHub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("pull"), extra_env={
        "MGR_HF_ENDPOINT": hub.hf_endpoint, "MGR_HF_MIRROR_ENDPOINT": dead_endpoint(),
        "MGR_MODELSCOPE_ENDPOINT": hub.modelscope_endpoint, "HF_HUB_DISABLE_XET": "1",
    })
    d.start()
    yield d
    d.stop()


def test_pull_streams_ollama_progress_then_the_model_answers(pulling_daemon: Daemon, gguf_path: Path) -> None:
    lines = []
    with httpx.stream("POST", pulling_daemon.base_url + "/api/pull", timeout=300,
                      json={"model": f"hf.co/{REPO}:Q4_1"}) as response:
        assert response.status_code == 200
        lines = [json.loads(line) for line in response.iter_lines() if line]
    statuses = [line.get("status", "") for line in lines]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    assert statuses.index("verifying sha256 digest") < statuses.index("writing manifest")
    progress = [line for line in lines if "digest" in line]
    assert progress and progress[-1]["completed"] == progress[-1]["total"] == gguf_path.stat().st_size
    assert progress[0]["status"] == "pulling " + progress[0]["digest"][7:19]
    listing = pulling_daemon.cli("list").stdout
    assert f"hf.co/{REPO}:Q4_1" in listing
    answer = pulling_daemon.cli("run", f"hf.co/{REPO}:Q4_1", QUESTION, "--temperature", "0")
    assert answer.returncode == 0 and "Paris" in answer.stdout
    shown = httpx.post(pulling_daemon.base_url + "/api/show", json={"model": f"hf.co/{REPO}:Q4_1"}).json()
    assert shown["source"]["hub"] == "hf" and shown["source"]["repo"] == REPO
    assert shown["details"]["quantization_level"] == "Q4_1"


def test_ollama_client_pulls_from_modelscope(pulling_daemon: Daemon) -> None:
    client = ollama.Client(host=pulling_daemon.base_url)
    events = list(client.pull(f"modelscope.cn/{REPO}", stream=True))
    assert events[-1].status == "success"
    assert any(e.completed for e in events)
    assert f"modelscope.cn/{REPO}:latest" in [m.model for m in client.list().models]
    # same bytes as the HF pull: one blob in the store for both models
    blobs = list((Path(pulling_daemon.env["MGR_MODELS"]) / "blobs").iterdir())
    assert len(blobs) == 1


def test_pull_errors_have_their_status(pulling_daemon: Daemon) -> None:
    url = pulling_daemon.base_url + "/api/pull"
    bad = httpx.post(url, json={"model": "hf.co/../../etc"})
    assert bad.status_code == 400 and "hf.co/" in bad.json()["error"]
    missing = httpx.post(url, json={"model": "hf.co/nobody/nothing"}, timeout=60)
    assert missing.status_code == 404 and "nobody/nothing" in missing.json()["error"]
    no_tag = httpx.post(url, json={"model": f"hf.co/{REPO}:Q2_K"}, timeout=60)
    assert no_tag.status_code == 404 and "Q4_1" in no_tag.json()["error"]  # lists the tags that exist
    quiet = httpx.post(url, json={"model": f"hf.co/{REPO}:Q4_1", "stream": False}, timeout=300)
    assert quiet.status_code == 200 and quiet.json() == {"status": "success"}
