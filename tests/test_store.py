"""The store's view for engines: a split GGUF opens as its first part with the others beside it under their
own names, as llama.cpp looks for them; a single GGUF opens as its blob."""

from __future__ import annotations

from pathlib import Path

from fakehub import import_file, tiny_gguf

from mgr.registry.store import Store


def test_split_gguf_parts_sit_side_by_side(tmp_path: Path) -> None:
    store = Store(tmp_path / "models")
    files = {}
    for i in (1, 2):
        part = tmp_path / f"m-0000{i}-of-00002.gguf"
        part.write_bytes(tiny_gguf(f"part{i}", seed=i))
        files[part.name] = import_file(store, part)
    manifest = store.create("split", files, {"test": "split"})
    path = store.model_path(manifest)
    assert path.name == "m-00001-of-00002.gguf"
    sibling = path.with_name("m-00002-of-00002.gguf")
    assert sibling.resolve() == store.blob_path(files["m-00002-of-00002.gguf"])
    assert path.read_bytes() == (tmp_path / "m-00001-of-00002.gguf").read_bytes()
    single = store.create("one", {"m-00001-of-00002.gguf": files["m-00001-of-00002.gguf"]}, {})
    assert store.model_path(single) == store.blob_path(files["m-00001-of-00002.gguf"])
