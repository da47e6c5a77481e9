"""The store against other clients' failures and a hub's bad listings, through a real daemon (and a local fake
hub, tests/fakehub.py, speaking the Hugging Face and ModelScope protocols):

- an upload's grace period holds: a failing /api/create or a failing pull of one client never deletes another
  client's fresh upload (only a blob refused for its own bytes goes, and only after its own create failed);
- a client told "the store has it" (HEAD or POST /api/blobs) has the grace period started again;
- a hub listing a hash or a file name mgr refuses is a 502 saying which file and what, before any byte is
  downloaded; a listing mgr cannot read at all is a 502 too; a pull that fails once its stream has started
  ends with an error line, never a cut.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import httpx
import numpy as np
import pytest
from conftest import Daemon, wait_for
from fakehub import FakeHub, dead_endpoint, import_file, tiny_gguf

from mgr.registry.store import UPLOAD_GRACE_SECONDS, Store

pytestmark = pytest.mark.slow
REPO = "test/tiny-GGUF"


def tiny_lora(path: Path) -> bytes:
    """A GGUF LoRA adapter for llama models as llama.cpp's convert_lora_to_gguf.py writes one (general.type
    adapter, adapter.type lora), with one small A/B pair: what the store checks of an adapter, in a few KiB."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 1.0)
    writer.add_tensor("blk.0.attn_q.weight.lora_a", np.ones((1, 64), dtype=np.float32))
    writer.add_tensor("blk.0.attn_q.weight.lora_b", np.zeros((64, 1), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHub]:
    hub = FakeHub().start()
    yield hub
    hub.stop()


@pytest.fixture(scope="module")
def store_daemon(hub: FakeHub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("races"), extra_env={
        "MGR_HF_ENDPOINT": hub.hf_endpoint, "MGR_HF_MIRROR_ENDPOINT": dead_endpoint(),
        "MGR_MODELSCOPE_ENDPOINT": hub.modelscope_endpoint, "HF_HUB_DISABLE_XET": "1",
    })
    d.start()
    yield d
    d.stop()


def blobs(daemon: Daemon) -> set[str]:
    return {p.name.replace("-", ":", 1) for p in (Path(daemon.env["MGR_MODELS"]) / "blobs").iterdir()}


def upload(daemon: Daemon, data: bytes) -> str:
    digest = digest_of(data)
    response = httpx.post(daemon.base_url + f"/api/blobs/{digest}", content=data, timeout=60)
    assert response.status_code in (200, 201), response.text
    return digest


def create(daemon: Daemon, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(daemon.base_url + "/api/create", json={"stream": False, **body}, timeout=60)


# the upload's grace period -----------------------------------------------------------------------------------
def test_a_failing_create_keeps_another_clients_fresh_upload(store_daemon: Daemon, tmp_path: Path) -> None:
    mine = upload(store_daemon, tiny_gguf("mine", seed=1, tmp_dir=tmp_path))  # client A, about to create
    other = upload(store_daemon, tiny_gguf("other", seed=2, tmp_dir=tmp_path))
    junk = upload(store_daemon, b"not a model at all " * 50)
    # client B's creates name A's blob and fail, each for a reason of its own
    failures = [
        ({"model": "b1", "files": {"../evil.gguf": mine}}, "invalid file name"),
        ({"model": "b2", "files": {"a.gguf": mine, "b.gguf": other}}, "one GGUF"),
        ({"model": "b3", "files": {"a.gguf": mine, "config.json": "sha256:" + "e" * 64}}, "no blob"),
        ({"model": "b4\n", "files": {"a.gguf": mine}}, "invalid model name"),
        ({"model": "b5", "files": {"a.gguf": mine}, "adapters": {"x.gguf": other}}, "not a GGUF LoRA adapter"),
        ({"model": "b6", "files": {"a.gguf": mine}, "template": "{{ .Prompt }}"}, "Go template"),
        ({"model": "b7", "files": {"a.gguf": junk}}, "not a GGUF file"),
    ]
    for body, words in failures:
        response = create(store_daemon, body)
        assert response.status_code == 400 and words in response.json()["error"], (body, response.text)
        assert {mine, other} <= blobs(store_daemon), body
    # only the blob refused for its own bytes went (it can be no one's GGUF), after its own create failed
    assert junk not in blobs(store_daemon)
    made = create(store_daemon, {"model": "a-model", "files": {"model.gguf": mine}})
    assert made.status_code == 200, made.text
    assert "a-model:latest" in store_daemon.cli("list").stdout


def test_a_failing_pull_keeps_another_clients_fresh_upload(store_daemon: Daemon, hub: FakeHub,
                                                           tmp_path: Path) -> None:
    """A pull whose file is a LoRA adapter, not a model, fails after downloading it and drops the blobs it
    added; client A, who uploaded the same adapter while the pull was under way (to put it over its own
    model), keeps it."""
    adapter = tiny_lora(tmp_path / "lora.gguf")
    hub.add_repo("hf", "test/a-lora-GGUF", {"lora.gguf": adapter})
    hub.fail("lora.gguf", "stall", after=16, seconds=3.0)  # holds the pull's download for a while
    lines: list[dict[str, Any]] = []

    def pull() -> None:
        with httpx.stream("POST", store_daemon.base_url + "/api/pull", json={"model": "hf.co/test/a-lora-GGUF"},
                          timeout=120) as response:
            assert response.status_code == 200
            lines.extend(json.loads(line) for line in response.iter_lines() if line)

    puller = threading.Thread(target=pull)
    puller.start()
    assert wait_for(lambda: hub.bytes_served("lora.gguf") > 0, timeout=30)
    digest = upload(store_daemon, adapter)  # client A, while the pull downloads the same bytes
    puller.join(timeout=120)
    assert lines and "LoRA adapter, not a model" in lines[-1].get("error", ""), lines[-3:]
    assert digest in blobs(store_daemon)
    base = upload(store_daemon, tiny_gguf("base", seed=3, tmp_dir=tmp_path))
    made = create(store_daemon, {"model": "a-lora", "files": {"m.gguf": base}, "adapters": {"lora.gguf": digest}})
    assert made.status_code == 200, made.text


def test_a_failed_pull_drops_the_blobs_it_alone_added(store_daemon: Daemon, hub: FakeHub) -> None:
    """Nobody uploaded it: the pull's own download of a file that is not a model goes, and its stream ends
    with an error line."""
    junk = b"GGUF but not really" * 100
    hub.add_repo("hf", "test/junk-GGUF", {"junk-Q4_K_M.gguf": junk})
    with httpx.stream("POST", store_daemon.base_url + "/api/pull", json={"model": "hf.co/test/junk-GGUF"},
                      timeout=120) as response:
        assert response.status_code == 200
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert "error" in lines[-1] and "junk-Q4_K_M.gguf" in lines[-1]["error"], lines[-1]
    assert all("error" not in line for line in lines[:-1])
    assert digest_of(junk) not in blobs(store_daemon)
    assert "junk" not in store_daemon.cli("list").stdout


def test_a_client_told_the_store_has_a_blob_gets_the_grace_period_again(store_daemon: Daemon,
                                                                        tmp_path: Path) -> None:
    data = tiny_gguf("old", seed=4, tmp_dir=tmp_path)
    digest = upload(store_daemon, data)
    path = Path(store_daemon.env["MGR_MODELS"]) / "blobs" / digest.replace(":", "-")
    long_ago = time.time() - 2 * UPLOAD_GRACE_SECONDS
    for method, status in (("HEAD", 200), ("POST", 200)):
        os.utime(path, (long_ago, long_ago))
        response = httpx.request(method, store_daemon.base_url + f"/api/blobs/{digest}",
                                 content=data if method == "POST" else None)
        assert response.status_code == status
        assert time.time() - path.stat().st_mtime < 60  # garbage collection now keeps it another hour
    assert httpx.head(store_daemon.base_url + "/api/blobs/sha256:" + "1" * 64).status_code == 404


def test_garbage_collection_and_discards_keep_claimed_uploads(tmp_path: Path, gguf_path: Path) -> None:
    """The same rules on the Store itself: collection goes by the blob's age, a discard spares what a client
    claimed within the grace period unless the blob was refused for its own bytes."""
    store = Store(tmp_path / "models")
    digest = import_file(store, gguf_path)
    path = store.blob_path(digest)
    os.utime(path, (time.time() - 2 * UPLOAD_GRACE_SECONDS,) * 2)
    assert store.claim_upload(digest)
    assert store.collect_garbage() == [] and path.exists()
    assert store.discard_unreferenced([digest]) == [] and path.exists()
    assert store.discard_unreferenced([digest], spare_uploads=False) == [digest] and not path.exists()
    assert not store.claim_upload(digest)
    again = import_file(store, gguf_path)  # never claimed: a discard takes it, collection too once it is old
    assert store.discard_unreferenced([again]) == [again]


# a hub's bad listings ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("hub_name", ["hf", "modelscope"])
def test_a_listed_hash_mgr_refuses_is_a_502_naming_it(store_daemon: Daemon, hub: FakeHub, tmp_path: Path,
                                                      stream: bool, hub_name: str) -> None:
    repo = f"test/badhash-{hub_name}-{stream}"
    made = hub.add_repo(hub_name, repo, {"model-Q4_K_M.gguf": tiny_gguf("h", seed=5, tmp_dir=tmp_path)})
    made.files["model-Q4_K_M.gguf"].sha256 = "../../../../tmp/evil"
    host = "hf.co" if hub_name == "hf" else "modelscope.cn"
    hub.reset_counters()
    response = httpx.post(store_daemon.base_url + "/api/pull", json={"model": f"{host}/{repo}", "stream": stream},
                          timeout=60)
    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert "model-Q4_K_M.gguf" in error and "../../../../tmp/evil" in error and "not 64 hex digits" in error
    assert hub.bytes_served("model-Q4_K_M.gguf") == 0  # nothing was downloaded
    assert not any("evil" in p.name for p in (Path(store_daemon.env["MGR_MODELS"]) / "tmp").iterdir())


def test_a_listed_file_name_mgr_refuses_is_a_502_naming_it(store_daemon: Daemon, hub: FakeHub,
                                                          tmp_path: Path) -> None:
    hub.add_repo("hf", "test/badname-GGUF", {"my model-Q4_K_M.gguf": tiny_gguf("n", seed=6, tmp_dir=tmp_path)})
    for stream in (True, False):
        response = httpx.post(store_daemon.base_url + "/api/pull", timeout=60,
                              json={"model": "hf.co/test/badname-GGUF", "stream": stream})
        assert response.status_code == 502, response.text
        assert "'my model-Q4_K_M.gguf'" in response.json()["error"] and "refuses" in response.json()["error"]


@pytest.mark.parametrize("hub_name", ["hf", "modelscope"])
def test_a_listing_mgr_cannot_read_is_a_502(store_daemon: Daemon, hub: FakeHub, tmp_path: Path,
                                           hub_name: str) -> None:
    repo = f"test/badsize-{hub_name}-GGUF"
    made = hub.add_repo(hub_name, repo, {"m-Q4_K_M.gguf": tiny_gguf("s", seed=7, tmp_dir=tmp_path)})
    made.files["m-Q4_K_M.gguf"].size = "a lot"  # type: ignore[assignment]
    host = "hf.co" if hub_name == "hf" else "modelscope.cn"
    response = httpx.post(store_daemon.base_url + "/api/pull", timeout=60, json={"model": f"{host}/{repo}"})
    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert repo in error and "cannot read" in error and "a lot" in error, error
    # the daemon goes on serving pulls
    hub.add_repo("hf", f"{REPO}-{hub_name}", {"tiny-Q4_K_M.gguf": tiny_gguf("ok", seed=8, tmp_dir=tmp_path)})
    ok = httpx.post(store_daemon.base_url + "/api/pull", json={"model": f"hf.co/{REPO}-{hub_name}", "stream": False},
                    timeout=120)
    assert ok.status_code == 200 and ok.json() == {"status": "success"}, ok.text
