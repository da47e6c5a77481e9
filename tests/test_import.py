"""Models already on disk come into mgr without a copy, through the real daemon and CLI (issue 18): a fake
Ollama store, Hugging Face cache and ModelScope cache laid out as those tools lay them, built from the real
SmolLM2 GGUF and a small safetensors folder. The imported GGUF answers "Paris" through the real llama.cpp runner;
no byte is copied (the store's blob is the source's inode, or a symlink with its external record); rm leaves the
source untouched; an external file that changed is refused until `mgr verify` hashed it again."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import QUESTION, Daemon
from fake_ollama_registry import LICENSE, MODEL, PARAMS, SYSTEM, TEMPLATE, write_ollama_store
from fakehub import safetensors_repo_files

from mgr.registry.store import hash_file

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def blob_of(daemon: Daemon, digest: str) -> Path:
    return Path(daemon.env["MGR_MODELS"]) / "blobs" / digest.replace(":", "-")


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory, gguf_path: Path) -> dict[str, Path]:
    """The tools' folders. The GGUF is hard-linked into them where it can be, as the tools would have it once."""
    root = tmp_path_factory.mktemp("sources")
    model = root / "SmolLM2-135M-Instruct.Q4_1.gguf"
    try:
        os.link(gguf_path, model)
    except OSError:
        shutil.copyfile(gguf_path, model)
    ollama = root / "ollama" / "models"
    write_ollama_store(ollama, "registry.ollama.ai", "library", "smollm2", "135m", [
        (MODEL, model), (TEMPLATE, b"{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>{{ end }}"),
        (SYSTEM, b"You are a helpful geography assistant."),
        (PARAMS, json.dumps({"stop": ["<|im_end|>"], "temperature": 0}).encode()),
        (LICENSE, b"Apache License 2.0")])
    # the Hugging Face cache: a different file (one byte of its name changed) so its digest is its own
    variant = bytearray(model.read_bytes())
    at = variant.find(b"Smollm2 135M 8k")
    variant[at] = ord("T")
    hub = root / "hf" / "hub"
    repo = hub / "models--HuggingFaceTB--SmolLM2-135M-Instruct-GGUF"
    digest = hash_file_bytes(bytes(variant))
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / digest).write_bytes(bytes(variant))
    commit = "e" * 40
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "smollm2-135m-instruct-q4_1.gguf").symlink_to(f"../../blobs/{digest}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    st_repo = hub / "models--test--Tiny-Safetensors"
    (st_repo / "blobs").mkdir(parents=True)
    (st_repo / "snapshots" / commit).mkdir(parents=True)
    for name, data in safetensors_repo_files().items():
        if "/" in name or name.startswith("."):
            continue
        blob = hash_file_bytes(data)
        (st_repo / "blobs" / blob).write_bytes(data)
        (st_repo / "snapshots" / commit / name).symlink_to(f"../../blobs/{blob}")
    modelscope = root / "modelscope"
    snapshot = modelscope / "models" / "HuggingFaceTB--SmolLM2-135M-Instruct-GGUF" / "snapshots" / "master"
    snapshot.mkdir(parents=True)
    os.link(model, snapshot / "smollm2-135m-instruct-q4_1.gguf")
    return {"model": model, "ollama": ollama, "hf": hub, "modelscope": modelscope}


def hash_file_bytes(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, sources: dict[str, Path]) -> Iterator[Daemon]:
    root = sources["model"].parent  # the store on the sources' filesystem: hard links are possible
    d = Daemon(root / "mgr")
    (root / "mgr").mkdir()
    d.start()
    yield d
    d.stop()


def chat(daemon: Daemon, model: str) -> httpx.Response:
    return httpx.post(daemon.base_url + "/api/chat", json={
        "model": model, "stream": False, "options": {"temperature": 0, "num_predict": 24},
        "messages": [{"role": "user", "content": QUESTION}]}, timeout=120)


def test_ollama_store_dry_run_then_import_answers_paris_from_the_same_inode(
        daemon: Daemon, sources: dict[str, Path]) -> None:
    ollama = str(sources["ollama"])
    dry = daemon.cli("import", "ollama", ollama, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would import smollm2:135m" in dry.stdout and "0 B copied" in dry.stdout, dry.stdout
    assert httpx.get(daemon.base_url + "/api/tags").json()["models"] == []
    started = time.monotonic()
    done = daemon.cli("import", "ollama", ollama)
    assert done.returncode == 0, done.stderr
    print(f"\nimport of the Ollama store: {time.monotonic() - started:.2f} s (CLI included)")
    assert "imported smollm2:135m" in done.stdout and "hardlink" in done.stdout, done.stdout
    show = httpx.post(daemon.base_url + "/api/show", json={"model": "smollm2:135m"}).json()
    assert show["source"]["from"] == "ollama" and show["source"]["path"].endswith("library/smollm2/135m")
    assert show["system"] == "You are a helpful geography assistant." and show["license"] == "Apache License 2.0"
    assert "stop" in show["parameters"]
    digest = show["files"][0]["digest"]
    assert blob_of(daemon, digest).stat().st_ino == sources["model"].stat().st_ino  # no byte copied
    answer = chat(daemon, "smollm2:135m")
    assert answer.status_code == 200, answer.text
    assert "paris" in answer.json()["message"]["content"].lower(), answer.text
    again = daemon.cli("import", "ollama", ollama)
    assert "already imported" in again.stdout, again.stdout


def test_cp_and_rm_leave_the_source_untouched(daemon: Daemon, sources: dict[str, Path]) -> None:
    before = (sources["model"].stat().st_size, sources["model"].stat().st_mtime_ns)
    blob_source = next((sources["ollama"] / "blobs").glob("sha256-*"))
    assert daemon.cli("cp", "smollm2:135m", "geo").returncode == 0
    assert daemon.cli("rm", "smollm2:135m").returncode == 0
    assert chat(daemon, "geo").status_code == 200  # the copy still has its link
    assert daemon.cli("rm", "geo").returncode == 0
    assert (sources["model"].stat().st_size, sources["model"].stat().st_mtime_ns) == before
    assert blob_source.exists() and sources["model"].exists()
    assert list((Path(daemon.env["MGR_MODELS"]) / "blobs").iterdir()) == []


def test_hf_cache_as_external_files_answers_and_a_changed_file_waits_for_verify(
        daemon: Daemon, sources: dict[str, Path]) -> None:
    done = daemon.cli("import", "hf", str(sources["hf"]), "--external")
    assert done.returncode == 0, done.stderr
    name = "hf.co/HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:Q4_1"
    assert f"imported {name}" in done.stdout and "imported hf.co/test/Tiny-Safetensors:latest" in done.stdout
    show = httpx.post(daemon.base_url + "/api/show", json={"model": name}).json()
    blob = blob_of(daemon, show["files"][0]["digest"])
    target = blob.resolve()
    assert blob.is_symlink() and target.parent.name == "blobs" and "models--HuggingFaceTB" in str(target)
    assert chat(daemon, name).status_code == 200
    st = httpx.post(daemon.base_url + "/api/show", json={"model": "hf.co/test/Tiny-Safetensors:latest"}).json()
    assert st["details"]["format"] == "safetensors" and {f["path"] for f in st["files"]} >= {"config.json",
                                                                                           "model.safetensors"}
    os.utime(target, ns=(time.time_ns(), time.time_ns() + 10**9))  # touched: it has to be looked at again
    time.sleep(1.2)
    refused = chat(daemon, name)
    assert refused.status_code == 409 and "mgr verify" in refused.json()["error"], refused.text
    verified = daemon.cli("verify", name)
    assert verified.returncode == 0 and "hashed again" in verified.stdout, verified.stderr
    answer = chat(daemon, name)
    assert answer.status_code == 200 and "paris" in answer.json()["message"]["content"].lower(), answer.text
    disk = {m["name"]: m for m in httpx.get(daemon.base_url + "/api/disk").json()["models"]}
    assert disk[name]["external"] == disk[name]["size"] and disk[name]["frees"] == 0
    du = daemon.cli("du")
    assert du.returncode == 0 and name in du.stdout and "RM FREES" in du.stdout
    before = target.read_bytes()
    assert daemon.cli("rm", name).returncode == 0
    assert target.read_bytes() == before and not os.path.lexists(blob)


def test_modelscope_cache_and_create_link(daemon: Daemon, sources: dict[str, Path]) -> None:
    done = daemon.cli("import", "modelscope", str(sources["modelscope"]))
    assert done.returncode == 0, done.stderr
    assert "imported modelscope.cn/HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:Q4_1" in done.stdout, done.stdout
    linked = daemon.cli("create", "mine", "--from", str(sources["model"]), "--link")
    assert linked.returncode == 0, linked.stderr
    show = httpx.post(daemon.base_url + "/api/show", json={"model": "mine"}).json()
    assert show["source"] == {"type": "import", "from": "file", "path": str(sources["model"].resolve())}
    assert blob_of(daemon, show["files"][0]["digest"]).stat().st_ino == sources["model"].stat().st_ino
    assert show["files"][0]["digest"] == hash_file(sources["model"])
    missing = daemon.cli("import", "ollama", str(sources["model"].parent / "nowhere"))
    assert missing.returncode == 1 and "does not exist" in missing.stderr
