"""The store's imports without a copy (registry/store.py `link_file`), in-process on small files: a hard link is
the same inode; an external file is a symlink and a record, refused once it changes until verified again, and
never deleted by rm or garbage collection; a file whose bytes are not what its name says is refused. Also the
finders of registry/importers.py on layouts as Ollama, huggingface_hub and modelscope write them, and the
references of Ollama's registry."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
from fake_ollama_registry import MODEL, PARAMS, SYSTEM, TEMPLATE, write_ollama_store
from fakehub import safetensors_repo_files, tiny_gguf

from mgr.registry.importers import find_hf, find_modelscope, find_ollama, find_path, import_found, run_import
from mgr.registry.refs import InvalidReference, OllamaReference, parse_reference
from mgr.registry.store import DigestMismatch, ExternalFileChanged, Store, _reflink, hash_file


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "models")


@pytest.fixture
def gguf(tmp_path: Path) -> Path:
    path = tmp_path / "src" / "tiny.Q4_0.gguf"
    path.parent.mkdir()
    path.write_bytes(tiny_gguf("import", 64))
    return path


def test_a_hard_link_is_the_same_inode_and_rm_leaves_the_source(store: Store, gguf: Path) -> None:
    before = gguf.read_bytes()
    linked = store.link_file(gguf)
    assert linked.mode == "hardlink" and linked.digest == hash_file(gguf)
    assert store.blob_path(linked.digest).stat().st_ino == gguf.stat().st_ino
    store.create("tiny", {"tiny.Q4_0.gguf": linked.digest}, {"type": "import"})
    assert store.disk_usage()[0]["hardlink"] == gguf.stat().st_size and store.disk_usage()[0]["frees"] == 0
    store.delete("tiny")
    assert gguf.read_bytes() == before and gguf.stat().st_nlink == 1
    assert not os.path.lexists(store.blob_path(linked.digest)) and store.import_record(linked.digest) is None


def test_an_external_file_is_refused_once_changed_until_verified(store: Store, gguf: Path) -> None:
    linked = store.link_file(gguf, external=True)
    blob = store.blob_path(linked.digest)
    assert linked.mode == "external" and blob.is_symlink() and blob.resolve() == gguf.resolve()
    manifest = store.create("tiny", {"tiny.Q4_0.gguf": linked.digest}, {"type": "import"})
    assert store.model_path(manifest) == blob and store.disk_usage()[0]["external"] == manifest.size
    generation = store.generation
    os.utime(gguf, ns=(time.time_ns(), time.time_ns() + 10**9))  # touched: same bytes, another mtime
    with pytest.raises(ExternalFileChanged, match="mgr verify"):
        store.model_path(manifest)
    store._external_checked = 0.0  # the next read looks again (at most once a second otherwise)
    assert store.generation != generation  # so the daemon's cached load spec is built again, and refused
    assert store.verify("tiny") == [str(gguf.resolve())]
    assert store.model_path(manifest) == blob  # the same bytes: verified, served again
    data = bytearray(gguf.read_bytes())
    data[-1] ^= 0xFF
    gguf.write_bytes(bytes(data))  # other bytes now
    with pytest.raises(ExternalFileChanged):
        store.model_path(manifest)
    with pytest.raises(ExternalFileChanged, match="now hashes to"):
        store.verify("tiny")
    gguf.unlink()
    with pytest.raises(ExternalFileChanged, match="gone"):
        store.model_path(manifest)


def test_rm_and_garbage_collection_never_delete_an_external_file(store: Store, gguf: Path) -> None:
    before = gguf.read_bytes()
    linked = store.link_file(gguf, external=True)
    store.create("tiny", {"tiny.Q4_0.gguf": linked.digest}, {"type": "import"})
    store.delete("tiny")
    assert gguf.read_bytes() == before and not os.path.lexists(store.blob_path(linked.digest))
    linked = store.link_file(gguf, external=True)  # unreferenced now: garbage once old enough
    assert store.collect_garbage(grace_seconds=-1) == [linked.digest]
    assert gguf.read_bytes() == before and store.import_record(linked.digest) is None
    linked = store.link_file(gguf, external=True)
    gguf.rename(gguf.with_suffix(".moved"))  # a dangling symlink: collected by its own age, no error
    assert store.collect_garbage(grace_seconds=-1) == [linked.digest]


def test_a_file_whose_bytes_are_not_its_name_is_refused(store: Store, gguf: Path) -> None:
    with pytest.raises(DigestMismatch):
        store.link_file(gguf, "sha256:" + "0" * 64)
    assert list(store.blobs_dir.iterdir()) == []


def test_a_reflink_where_the_filesystem_has_them_else_nothing_left(tmp_path: Path, gguf: Path) -> None:
    target = tmp_path / "clone"
    if _reflink(gguf, target):  # btrfs, XFS: a copy-on-write clone with the same bytes
        assert target.read_bytes() == gguf.read_bytes()
    else:
        assert not target.exists()


def test_a_pulled_blob_replaces_an_external_one(store: Store, gguf: Path) -> None:
    linked = store.link_file(gguf, external=True)
    tmp = store.tmp_dir / "downloaded.partial"
    tmp.write_bytes(gguf.read_bytes())
    store.adopt_blob(tmp, linked.digest)
    blob = store.blob_path(linked.digest)
    assert not blob.is_symlink() and store.import_record(linked.digest) is None and gguf.exists()


def test_the_ollama_store_as_ollama_lays_it_out(store: Store, gguf: Path, tmp_path: Path) -> None:
    root = tmp_path / "ollama"
    layers = [(MODEL, gguf), (TEMPLATE, b"{{ .Prompt }}"), (SYSTEM, b"Be brief."),
              (PARAMS, json.dumps({"stop": ["<|im_end|>"], "temperature": 0.2, "made_up": 1}).encode())]
    write_ollama_store(root, "registry.ollama.ai", "library", "tiny", "1b", layers)
    write_ollama_store(root, "registry.ollama.ai", "someone", "tiny", "latest", layers[:1])
    write_ollama_store(root, "example.com", "ns", "other", "v1", [(MODEL, b"GGUF-but-not-here")])
    (root / "blobs" / ("sha256-" + hashlib.sha256(b"GGUF-but-not-here").hexdigest())).unlink()  # a pull under way
    found, skipped = find_ollama(root)
    assert sorted(f.name for f in found) == ["someone/tiny:latest", "tiny:1b"]
    assert len(skipped) == 1 and "missing" in skipped[0].why
    tiny = next(f for f in found if f.name == "tiny:1b")
    assert tiny.custom is not None and tiny.custom.system == "Be brief."
    assert dict(tiny.custom.parameters) == {"stop": ["<|im_end|>"], "temperature": 0.2}
    assert any("Go template" in n for n in tiny.notes) and any("made_up" in n for n in tiny.notes)
    line = import_found(store, tiny)
    assert line["modes"] == ["hardlink"] and store.get("tiny:1b").system == "Be brief."
    assert store.get("tiny:1b").source["from"] == "ollama"


def test_the_hf_cache_as_huggingface_hub_lays_it_out(tmp_path: Path, gguf: Path) -> None:
    hub = tmp_path / "hub"
    repo = hub / "models--owner--Tiny-GGUF"
    digest = hash_file(gguf).removeprefix("sha256:")
    (repo / "blobs").mkdir(parents=True)
    os.link(gguf, repo / "blobs" / digest)
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "tiny.Q4_0.gguf").symlink_to(f"../../blobs/{digest}")
    (snapshot / "tiny.Q8_0.gguf").symlink_to("../../blobs/" + "b" * 64)  # not downloaded (yet)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    st = hub / "models--owner--Tiny-ST" / "snapshots" / ("c" * 40)
    st.mkdir(parents=True)
    for name, data in safetensors_repo_files().items():
        (st / name).parent.mkdir(parents=True, exist_ok=True)
        (st / name).write_bytes(data)
    found, skipped = find_hf(hub)
    assert sorted(f.name for f in found) == ["hf.co/owner/Tiny-ST:latest"]
    assert skipped and "incomplete" in skipped[0].why  # one missing blob: the snapshot is not complete
    (snapshot / "tiny.Q8_0.gguf").unlink()
    found, _ = find_hf(hub)
    assert sorted(f.name for f in found) == ["hf.co/owner/Tiny-GGUF:Q4_0", "hf.co/owner/Tiny-ST:latest"]
    gguf_model = next(f for f in found if f.name.endswith("Q4_0"))
    assert gguf_model.expected == {"tiny.Q4_0.gguf": f"sha256:{digest}"}  # HF names LFS blobs by their sha256
    safetensors = next(f for f in found if f.name.endswith("latest"))
    assert "pytorch_model.bin" not in safetensors.files and "config.json" in safetensors.files


def test_the_modelscope_cache_in_both_of_its_layouts(tmp_path: Path, gguf: Path) -> None:
    cache = tmp_path / "modelscope"
    new = cache / "models" / "owner--Tiny-GGUF" / "snapshots" / "master"
    new.mkdir(parents=True)
    os.link(gguf, new / "tiny.Q4_0.gguf")
    legacy = cache / "hub" / "models" / "owner" / "Tiny___5-ST"  # dots written as ___ by older SDKs
    legacy.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        (legacy / name).write_bytes(safetensors_repo_files()[name])
    (cache / "models" / "owner--Partial" / "snapshots" / "master").mkdir(parents=True)
    (cache / "models" / "owner--Partial" / "snapshots" / "master" / "x.Q4_0.gguf.incomplete").write_bytes(b"G")
    found, skipped = find_modelscope(cache)
    assert sorted(f.name for f in found) == [
        "modelscope.cn/owner/Tiny-GGUF:Q4_0", "modelscope.cn/owner/Tiny.5-ST:latest"]
    assert skipped


def test_a_file_or_folder_anywhere_and_a_dry_run(store: Store, gguf: Path, tmp_path: Path) -> None:
    found = find_path(gguf, "mine:1")
    assert found.name == "mine:1" and list(found.files) == ["tiny.Q4_0.gguf"]
    lines = list(run_import(store, "file", gguf, name="mine:1", dry_run=True))
    assert lines[0]["status"] == "would import mine:1" and lines[0]["modes"] == ["hardlink"]
    assert lines[-1]["new_bytes"] == 0 and store.list() == []
    lines = list(run_import(store, "file", gguf, name="mine:1"))
    assert lines[-1]["imported"] == 1 and store.get("mine:1").source["path"] == str(gguf.resolve())
    with pytest.raises(ValueError, match="not a GGUF"):
        (tmp_path / "x.gguf").write_bytes(b"nope")
        find_path(tmp_path / "x.gguf", "x")


def test_ollama_references() -> None:
    for text in ("ollama://llama3.2:3b", "registry.ollama.ai/library/llama3.2:3b",
                 "https://registry.ollama.ai/library/llama3.2:3b"):
        ref = parse_reference(text)
        assert isinstance(ref, OllamaReference) and (ref.repo, ref.tag, ref.name) == ("library/llama3.2", "3b",
                                                                                      "llama3.2:3b"), text
    ref = parse_reference("ollama://someone/model")
    assert isinstance(ref, OllamaReference) and (ref.name, ref.tag) == ("someone/model:latest", "latest")
    for bad in ("ollama://a/b/c", "ollama://../x", "ollama://x@sha256:00"):
        with pytest.raises(InvalidReference):
            parse_reference(bad)
